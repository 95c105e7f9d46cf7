//! The proxy-wasm ABI 0.2.1 as numbers and bytes: status codes, enumerations, and the
//! header-map wire format. Nothing here touches wasmtime.

/// A host function's result, as the guest SDKs expect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The thing asked for does not exist.
    NotFound = 1,
    /// An argument is out of range or malformed.
    BadArgument = 2,
    /// Data could not be serialized.
    SerializationFailure = 3,
    /// Data could not be parsed.
    ParseFailure = 4,
    /// A pointer or length points outside guest memory.
    InvalidMemoryAccess = 6,
    /// A queue is empty.
    Empty = 7,
    /// Compare-and-swap lost.
    CasMismatch = 8,
    /// Host-side failure.
    InternalFailure = 10,
    /// The host does not implement this.
    Unimplemented = 12,
}

/// What a filter callback asks the host to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next filter / phase.
    Continue,
    /// Stop until the plugin resumes the stream (or answered locally).
    Pause,
}

impl Action {
    /// Decodes a callback's return value; anything but 1 continues.
    pub fn from_raw(value: i32) -> Action {
        if value == 1 {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// Buffers a plugin can read.
pub mod buffer {
    /// Request body.
    pub const HTTP_REQUEST_BODY: i32 = 0;
    /// Response body.
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    /// L4 downstream data.
    pub const DOWNSTREAM_DATA: i32 = 2;
    /// L4 upstream data.
    pub const UPSTREAM_DATA: i32 = 3;
    /// Body of an `proxy_http_call` response.
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    /// A gRPC call message.
    pub const GRPC_CALL_MESSAGE: i32 = 5;
    /// The VM configuration (given to `on_vm_start`).
    pub const VM_CONFIGURATION: i32 = 6;
    /// The plugin configuration (given to `on_configure`).
    pub const PLUGIN_CONFIGURATION: i32 = 7;
    /// Arguments of a foreign function call.
    pub const FOREIGN_FUNCTION_ARGUMENTS: i32 = 8;
}

/// Header maps a plugin can read and write.
pub mod map {
    /// Request headers (with `:method`, `:path`, `:authority`, `:scheme`).
    pub const HTTP_REQUEST_HEADERS: i32 = 0;
    /// Request trailers.
    pub const HTTP_REQUEST_TRAILERS: i32 = 1;
    /// Response headers (with `:status`).
    pub const HTTP_RESPONSE_HEADERS: i32 = 2;
    /// Response trailers.
    pub const HTTP_RESPONSE_TRAILERS: i32 = 3;
    /// gRPC initial metadata.
    pub const GRPC_CALL_INITIAL_METADATA: i32 = 4;
    /// gRPC trailing metadata.
    pub const GRPC_CALL_TRAILING_METADATA: i32 = 5;
    /// Headers of an `proxy_http_call` response.
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    /// Trailers of an `proxy_http_call` response.
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// Streams `proxy_continue_stream` / `proxy_close_stream` act on.
pub mod stream {
    /// The request.
    pub const HTTP_REQUEST: i32 = 0;
    /// The response.
    pub const HTTP_RESPONSE: i32 = 1;
    /// L4 downstream.
    pub const DOWNSTREAM: i32 = 2;
    /// L4 upstream.
    pub const UPSTREAM: i32 = 3;
}

/// Log levels, TRACE 0 … CRITICAL 5.
pub mod log_level {
    /// Trace.
    pub const TRACE: i32 = 0;
    /// Debug.
    pub const DEBUG: i32 = 1;
    /// Info.
    pub const INFO: i32 = 2;
    /// Warn.
    pub const WARN: i32 = 3;
    /// Error.
    pub const ERROR: i32 = 4;
    /// Critical.
    pub const CRITICAL: i32 = 5;
}

/// A header map as plugins see it: ordered (name, value) pairs, pseudo-headers included.
pub type Pairs = Vec<(String, String)>;

/// Why bytes are not a valid header map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed header map: {0}")]
pub struct MapFormatError(&'static str);

/// Encodes pairs in the ABI wire format: `u32 count`, then `(u32 key_len, u32 value_len)`
/// per pair, then each key and value followed by a NUL byte. All integers little-endian.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone) -> Vec<u8> {
    let count = pairs.clone().into_iter().count() as u32;
    let mut out = Vec::with_capacity(encoded_len(pairs.clone()));
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The size [`encode_pairs`] would produce, without encoding.
pub fn encoded_len<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> usize {
    4 + pairs
        .into_iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>()
}

/// Decodes the wire format; an empty input (or a lone NUL) is an empty map.
pub fn decode_pairs(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, MapFormatError> {
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let read_u32 = |at: usize| -> Result<usize, MapFormatError> {
        let slice = bytes
            .get(at..at + 4)
            .ok_or(MapFormatError("truncated length"))?;
        let mut word = [0u8; 4];
        word.copy_from_slice(slice);
        Ok(u32::from_le_bytes(word) as usize)
    };
    let count = read_u32(0)?;
    // Each pair needs at least 8 bytes of lengths and 2 NULs: reject absurd counts early.
    if count > bytes.len() / 10 + 1 {
        return Err(MapFormatError("count larger than the data"));
    }
    let mut lengths = Vec::with_capacity(count);
    for i in 0..count {
        lengths.push((read_u32(4 + i * 8)?, read_u32(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut take = |len: usize| -> Result<&[u8], MapFormatError> {
        let end = at
            .checked_add(len)
            .ok_or(MapFormatError("length overflow"))?;
        let slice = bytes.get(at..end).ok_or(MapFormatError("truncated data"))?;
        if bytes.get(end) != Some(&0) {
            return Err(MapFormatError("missing NUL terminator"));
        }
        at = end + 1;
        Ok(slice)
    };
    let mut pairs = Vec::with_capacity(count);
    for (key_len, value_len) in lengths {
        let key = std::str::from_utf8(take(key_len)?)
            .map_err(|_| MapFormatError("header name is not UTF-8"))?
            .to_string();
        let value = take(value_len)?.to_vec();
        pairs.push((key, value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encoding() {
        let encoded = encode_pairs([(":path", &b"/a"[..]), ("x", &b""[..])]);
        let mut expected = vec![2, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b":path\0/a\0x\0\0");
        assert_eq!(encoded, expected);
        assert_eq!(decode_pairs(&[]).unwrap(), vec![]);
        assert_eq!(decode_pairs(&[0]).unwrap(), vec![]);
    }

    #[test]
    fn malformed_maps_are_errors() {
        assert!(decode_pairs(&[1, 0, 0, 0]).is_err());
        assert!(decode_pairs(&[255, 255, 255, 255, 0, 0]).is_err());
        let mut bad = encode_pairs([("a", &b"b"[..])]);
        let last = bad.len() - 1;
        bad[last] = b'x';
        assert!(decode_pairs(&bad).is_err());
    }

    proptest! {
        #[test]
        fn header_maps_round_trip(pairs in proptest::collection::vec(("[:a-zA-Z0-9-]{0,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..20)) {
            let encoded = encode_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
            prop_assert_eq!(
                encoded.len(),
                encoded_len(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            );
            let decoded = decode_pairs(&encoded).unwrap();
            prop_assert_eq!(decoded, pairs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_pairs(&bytes);
        }
    }
}
