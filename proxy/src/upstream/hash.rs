//! The 64-bit hash behind `ring_hash`: ring points of endpoints and the hash of each
//! request's key. xxHash64 with seed 0, as Envoy (`HashUtil::xxHash64`) and gRPC use for
//! `RING_HASH`, so NIP, Envoy and proxyless gRPC clients put the same key on the same
//! endpoint.

/// Hashes `bytes` (xxHash64, seed 0).
pub fn hash64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

/// Folds one more hash into a request's hash, as Envoy combines hash policies.
pub fn combine(previous: Option<u64>, next: u64) -> u64 {
    previous.map_or(next, |p| p.rotate_left(1) ^ next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxhash64_reference_values() {
        // The reference vectors of xxHash64 (seed 0).
        assert_eq!(hash64(b""), 0xef46_db37_51d8_e999);
        assert_eq!(hash64(b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(hash64(b"abc"), 0x44bc_2cf5_ad77_0999);
        assert_eq!(combine(None, 5), 5);
        assert_eq!(combine(Some(1), 4), 2 ^ 4);
    }
}
