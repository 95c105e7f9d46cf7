//! Timers and queues: every `period_ms` (default 50) each worker's instance gets `on_tick`
//! and enqueues the tick on the shared queue `ticks`; whichever instance is woken by
//! `on_queue_ready` drains it and counts the ticks in shared data. Requests carry the count
//! in `x-ticks` (request and response), so a client sees background work happen with no
//! traffic in between.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Ticker { queue: 0 }));
}}

const COUNT_KEY: &str = "ticker.count";

struct Ticker {
    queue: u32,
}

impl Context for Ticker {}

impl RootContext for Ticker {
    fn on_configure(&mut self, _size: usize) -> bool {
        let mut period = 50;
        if let Some(config) = self.get_plugin_configuration() {
            let text = String::from_utf8_lossy(&config).to_string();
            match text.trim().strip_prefix("period_ms=").and_then(|v| v.parse::<u64>().ok()) {
                Some(ms) if ms > 0 => period = ms,
                _ => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, "config must be period_ms=<positive number>").ok();
                    return false;
                }
            }
        }
        self.queue = self.register_shared_queue("ticks");
        self.set_tick_period(Duration::from_millis(period));
        true
    }

    fn on_tick(&mut self) {
        let now = self.get_current_time().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let _ = self.enqueue_shared_queue(self.queue, Some(&now.to_le_bytes()));
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut drained = 0u64;
        while let Ok(Some(_tick)) = self.dequeue_shared_queue(queue_id) {
            drained += 1;
        }
        if drained == 0 {
            return;
        }
        // Several instances may count at once: retry on CAS mismatch.
        loop {
            let (value, cas) = self.get_shared_data(COUNT_KEY);
            let count = value.and_then(|v| v.try_into().ok()).map_or(0, u64::from_le_bytes);
            if self.set_shared_data(COUNT_KEY, Some(&(count + drained).to_le_bytes()), cas).is_ok() {
                break;
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Report))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Report;

impl Context for Report {}

impl Report {
    fn count(&self) -> String {
        let (value, _) = self.get_shared_data(COUNT_KEY);
        value.and_then(|v| v.try_into().ok()).map_or(0, u64::from_le_bytes).to_string()
    }
}

impl HttpContext for Report {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header("x-ticks", Some(&self.count()));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("x-ticks", Some(&self.count()));
        Action::Continue
    }
}
