//! The 64-bit hash behind `ring_hash`: ring points of endpoints and the hash of each
//! request's key. FNV-1a over the bytes, then MurmurHash3's 64-bit finalizer so that keys
//! differing in a byte land far apart on the ring. Fixed and seedless on purpose: every
//! NIP proxy maps the same key to the same endpoint.

/// Hashes `bytes`.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    finalize(h)
}

/// MurmurHash3's fmix64: every input bit affects every output bit.
fn finalize(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Folds one more hash into a request's hash, as Envoy combines hash policies.
pub fn combine(previous: Option<u64>, next: u64) -> u64 {
    previous.map_or(next, |p| p.rotate_left(1) ^ next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        assert_eq!(hash64(b"user-1"), hash64(b"user-1"));
        assert_ne!(hash64(b"user-1"), hash64(b"user-2"));
        // Keys one byte apart fall in different halves about half of the time.
        let high = (0..1000u32)
            .filter(|i| hash64(format!("key-{i}").as_bytes()) >> 63 == 1)
            .count();
        assert!((400..600).contains(&high), "{high}");
        assert_eq!(combine(None, 5), 5);
        assert_eq!(combine(Some(1), 4), 2 ^ 4);
    }
}
