//! Counts requests two ways: a shared-data key updated with compare-and-swap (every worker
//! thread's instance sees the same number) and a plugin counter metric. The count after
//! this request is returned in `x-request-count`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

const KEY: &str = "requests";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(CounterRoot { metric: 0 }));
}}

struct CounterRoot {
    metric: u32,
}

impl Context for CounterRoot {}

impl RootContext for CounterRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        // Create the key once, so that every later update is a CAS on an existing value (a
        // write with no CAS token cannot tell "absent" from "someone just created it"). The
        // host runs a canary instance at load, before any worker, so this does not race.
        if self.get_shared_data(KEY).0.is_none()
            && self.set_shared_data(KEY, Some(&0u64.to_le_bytes()), None).is_err()
        {
            return false;
        }
        match hostcalls::define_metric(MetricType::Counter, "requests") {
            Ok(id) => {
                self.metric = id;
                true
            }
            Err(_) => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Counter { metric: self.metric, count: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Counter {
    metric: u32,
    count: u64,
}

impl Context for Counter {}

impl Counter {
    /// Adds one with CAS, retrying when another instance got there first.
    fn bump(&self) -> u64 {
        loop {
            let (value, cas) = self.get_shared_data(KEY);
            let current = value
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_le_bytes);
            let next = current + 1;
            match self.set_shared_data(KEY, Some(&next.to_le_bytes()), cas) {
                Ok(()) => return next,
                Err(Status::CasMismatch) => continue,
                Err(_) => return 0,
            }
        }
    }
}

impl HttpContext for Counter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.count = self.bump();
        let _ = hostcalls::increment_metric(self.metric, 1);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-request-count", Some(&self.count.to_string()));
        Action::Continue
    }
}
