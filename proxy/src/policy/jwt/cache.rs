//! Verified tokens, remembered per worker thread (Envoy's `jwt_cache_config`): a client
//! sends the same token with every request, and checking an RS256 signature costs tens of
//! microseconds. A token is remembered with the provider and the key set that verified it
//! and its claims; a hit skips parsing and the signature, never the claims' checks (issuer,
//! audience, expiry run on every request). A provider or key set that changes (a reload,
//! a JWKS refetch) has a new id, so its tokens are verified afresh.

use serde_json::{Map, Value};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Envoy's default `jwt_cache_size`.
pub const DEFAULT_SIZE: usize = 100;
/// Providers whose tokens a thread remembers at once (older providers — replaced by a
/// reload — are forgotten first).
const PROVIDERS: usize = 8;

/// A fresh id for a provider or a key set (never reused in a process).
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct Entry {
    keys: u64,
    hash: u64,
    token: Box<str>,
    claims: Arc<Map<String, Value>>,
}

/// One provider's tokens on one thread.
#[derive(Default)]
struct Cache {
    provider: u64,
    entries: Vec<Entry>,
    next: usize,
}

thread_local! {
    /// Most recently used provider last.
    static CACHES: RefCell<Vec<Cache>> = const { RefCell::new(Vec::new()) };
}

fn hash(token: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(token.as_bytes(), 0)
}

/// The claims of `token` if this thread verified it with this provider and key set.
pub fn get(provider: u64, keys: u64, token: &str) -> Option<Arc<Map<String, Value>>> {
    let hash = hash(token);
    CACHES.with(|caches| {
        caches
            .borrow()
            .iter()
            .rev()
            .find(|c| c.provider == provider)?
            .entries
            .iter()
            .find(|e| e.hash == hash && e.keys == keys && &*e.token == token)
            .map(|e| Arc::clone(&e.claims))
    })
}

/// Remembers a token this provider verified with this key set, keeping at most `size`
/// of the provider's tokens (the oldest goes first).
pub fn put(provider: u64, size: usize, keys: u64, token: &str, claims: Arc<Map<String, Value>>) {
    let size = size.max(1);
    let entry = Entry {
        keys,
        hash: hash(token),
        token: token.into(),
        claims,
    };
    CACHES.with(|caches| {
        let mut caches = caches.borrow_mut();
        let index = match caches.iter().position(|c| c.provider == provider) {
            Some(i) => i,
            None => {
                if caches.len() == PROVIDERS {
                    caches.remove(0);
                }
                caches.push(Cache {
                    provider,
                    ..Cache::default()
                });
                caches.len() - 1
            }
        };
        let cache = &mut caches[index];
        if cache.entries.len() < size {
            cache.entries.push(entry);
        } else {
            let slot = cache.next % cache.entries.len();
            cache.entries[slot] = entry;
            cache.next = (slot + 1) % size;
        }
        // Most recently used last.
        let used = caches.remove(index);
        caches.push(used);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_only_with_its_provider_and_keys() {
        let claims = Arc::new(Map::new());
        put(1, 4, 2, "a.b.c", Arc::clone(&claims));
        assert!(get(1, 2, "a.b.c").is_some());
        assert!(get(1, 3, "a.b.c").is_none(), "other keys");
        assert!(get(9, 2, "a.b.c").is_none(), "another provider");
        assert!(get(1, 2, "a.b.d").is_none());
        for i in 0..4 {
            put(1, 4, 2, &format!("t{i}"), Arc::clone(&claims));
        }
        assert!(get(1, 2, "a.b.c").is_none(), "the oldest went first");
        assert!(get(1, 2, "t3").is_some() && get(1, 2, "t0").is_some());
        for provider in 10..10 + PROVIDERS as u64 {
            put(provider, 4, 2, "x.y.z", Arc::clone(&claims));
        }
        assert!(
            get(1, 2, "t3").is_none(),
            "the least recently used provider went"
        );
    }
}
