//! A userspace WAN emulator for multi-region tests (this machine has no `tc netem`): a TCP
//! relay on 127.0.0.1 in front of a target that delays each direction by half the
//! configured round-trip time (plus jitter, order kept), can be changed while connections
//! are open, and can black-hole the region (nothing goes through either way; connections
//! hang like packets that are dropped).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What a link does to traffic, changeable at run time.
#[derive(Debug, Default)]
pub struct LinkControl {
    one_way_us: AtomicU64,
    jitter_us: AtomicU64,
    black_hole: AtomicBool,
}

/// One region's link: connect to `address` to reach the target through it.
pub struct WanLink {
    /// Where the link listens.
    pub address: SocketAddr,
    control: Arc<LinkControl>,
}

impl WanLink {
    /// A link to `target` with round-trip time `rtt`, on the current tokio runtime.
    pub async fn start(target: SocketAddr, rtt: Duration) -> WanLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let control = Arc::new(LinkControl::default());
        let link = WanLink { address, control };
        link.set_rtt(rtt);
        let control = Arc::clone(&link.control);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let control = Arc::clone(&control);
                tokio::spawn(async move {
                    if control.black_hole.load(Ordering::Relaxed) {
                        // Hold the connection and say nothing, as a dead network would.
                        hang(client).await;
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pipe(client_read, server_write, Arc::clone(&control)),
                        pipe(server_read, client_write, control),
                    );
                });
            }
        });
        link
    }

    /// Sets the round-trip time (each direction gets half).
    pub fn set_rtt(&self, rtt: Duration) {
        let half = u64::try_from(rtt.as_micros() / 2).unwrap_or(u64::MAX);
        self.control.one_way_us.store(half, Ordering::Relaxed);
    }

    /// Adds up to `jitter` of random extra delay per chunk (order is kept).
    pub fn set_jitter(&self, jitter: Duration) {
        let us = u64::try_from(jitter.as_micros()).unwrap_or(u64::MAX);
        self.control.jitter_us.store(us, Ordering::Relaxed);
    }

    /// Drops everything (true) or lets traffic through again (false).
    pub fn black_hole(&self, on: bool) {
        self.control.black_hole.store(on, Ordering::Relaxed);
    }
}

async fn hang(mut stream: TcpStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

impl LinkControl {
    fn delay(&self) -> Duration {
        let base = self.one_way_us.load(Ordering::Relaxed);
        let jitter = self.jitter_us.load(Ordering::Relaxed);
        let extra = if jitter == 0 { 0 } else { fastrand_u64(jitter) };
        Duration::from_micros(base + extra)
    }
}

/// A small random number below `bound` (xorshift on a per-thread seed; no dependency).
fn fastrand_u64(bound: u64) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x % bound
    })
}

/// Copies one direction, each chunk delivered no sooner than its delay after it was read
/// and never before the chunk ahead of it.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    control: Arc<LinkControl>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let control = Arc::clone(&control);
        async move {
            let mut buffer = vec![0u8; 16 * 1024];
            let mut last = Instant::now();
            loop {
                let n = match from.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if control.black_hole.load(Ordering::Relaxed) {
                    continue;
                }
                let at = (Instant::now() + control.delay()).max(last);
                last = at;
                if tx.send((at, buffer[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
