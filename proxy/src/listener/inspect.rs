//! What the first bytes of a connection say, before any filter chain is chosen: Envoy's
//! `tls_inspector` (a TLS ClientHello: its server name and ALPN list) and `http_inspector`
//! (an HTTP/1.x request line or the HTTP/2 connection preface). Pure functions over the
//! bytes read so far; the dispatcher reads more while they answer [`Inspection::NeedMore`].

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest ClientHello waited for (Envoy's `max_client_hello_size` default).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// The longest HTTP/1 request line waited for; anything longer is not taken for HTTP.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// How many bytes the dispatcher may hold while inspecting (a ClientHello in records).
pub const MAX_INSPECTED: usize = MAX_CLIENT_HELLO + 5 * 4;

/// What the connection turned out to carry, as Envoy's listener filters report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    /// `transport_protocol` for filter chain matching: `tls` or `raw_buffer`.
    pub tls: bool,
    /// The ClientHello's server name (SNI), lower-cased.
    pub server_name: Option<String>,
    /// `application_protocols`: the ClientHello's ALPN list, or `http/1.0`, `http/1.1` or
    /// `h2c` from the HTTP inspector.
    pub application_protocols: Vec<String>,
}

/// The answer for the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// Known: choose the filter chain with this.
    Done(Detected),
    /// The bytes so far could still be a ClientHello or a request line: read more.
    NeedMore,
}

impl Inspection {
    /// What was found, or nothing: for bytes that must be decided on as they are (the
    /// inspection timed out, or the most a ClientHello may take has been read).
    pub fn done_or_default(self) -> Detected {
        match self {
            Inspection::Done(detected) => detected,
            Inspection::NeedMore => Detected::default(),
        }
    }
}

/// Inspects `bytes` with the listener filters a listener has (`tls`: `tls_inspector`,
/// `http`: `http_inspector`). `closed`: the client sent all it will (EOF).
pub fn inspect(bytes: &[u8], tls: bool, http: bool, closed: bool) -> Inspection {
    let mut detected = Detected::default();
    if tls {
        match client_hello(bytes) {
            Hello::Parsed { server_name, alpn } => {
                detected.tls = true;
                detected.server_name = server_name;
                detected.application_protocols = alpn;
                return Inspection::Done(detected);
            }
            Hello::Incomplete if !closed => return Inspection::NeedMore,
            // Records that are TLS but not a ClientHello we can read: TLS all the same.
            Hello::Malformed if bytes.first() == Some(&HANDSHAKE) => {
                detected.tls = true;
                return Inspection::Done(detected);
            }
            Hello::Incomplete | Hello::Malformed | Hello::NotTls => {}
        }
    }
    if http {
        match http_protocol(bytes) {
            Some(Ok(protocol)) => detected.application_protocols = vec![protocol.to_string()],
            None if !closed => return Inspection::NeedMore,
            None | Some(Err(())) => {}
        }
    }
    Inspection::Done(detected)
}

/// TLS record type of handshake messages.
const HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;

enum Hello {
    Parsed {
        server_name: Option<String>,
        alpn: Vec<String>,
    },
    Incomplete,
    Malformed,
    NotTls,
}

/// Reassembles the handshake bytes of the leading handshake records and parses the
/// ClientHello they start with.
fn client_hello(bytes: &[u8]) -> Hello {
    if bytes.is_empty() {
        return Hello::Incomplete;
    }
    if bytes[0] != HANDSHAKE {
        return Hello::NotTls;
    }
    // Record header: type, version (3.x), length.
    if bytes.len() >= 2 && bytes[1] != 3 {
        return Hello::NotTls;
    }
    let mut handshake = Vec::new();
    let mut rest = bytes;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != HANDSHAKE {
            return Hello::Malformed;
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if length == 0 || length > 16384 + 2048 {
            return Hello::Malformed;
        }
        let Some(fragment) = rest.get(5..5 + length) else {
            // The part of this record that came is used; the message may be whole already.
            handshake.extend_from_slice(&rest[5..]);
            return match message_length(&handshake) {
                Some(needed) if handshake.len() >= needed => parse_hello(&handshake[..needed]),
                _ => Hello::Incomplete,
            };
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[5 + length..];
        match message_length(&handshake) {
            Some(needed) if needed > MAX_CLIENT_HELLO => return Hello::Malformed,
            Some(needed) if handshake.len() >= needed => return parse_hello(&handshake[..needed]),
            _ => {}
        }
    }
}

/// The length of the handshake message in `handshake` with its 4-byte header, once known.
fn message_length(handshake: &[u8]) -> Option<usize> {
    let header = handshake.get(..4)?;
    let length =
        (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]);
    Some(4 + length)
}

/// A reader over a ClientHello that fails (returns `None`) instead of reading past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    /// A vector with a one- or two-byte length prefix.
    fn vector(&mut self, prefix: usize) -> Option<Reader<'a>> {
        let n = if prefix == 1 { self.u8()? } else { self.u16()? };
        self.take(n).map(Reader)
    }
}

fn parse_hello(message: &[u8]) -> Hello {
    parse_hello_fields(message).unwrap_or(Hello::Malformed)
}

fn parse_hello_fields(message: &[u8]) -> Option<Hello> {
    let mut r = Reader(message);
    if r.u8()? != usize::from(CLIENT_HELLO) {
        return None;
    }
    r.take(3)?; // length, already checked
    r.take(2 + 32)?; // client_version, random
    r.vector(1)?; // legacy_session_id
    r.vector(2)?; // cipher_suites
    r.vector(1)?; // legacy_compression_methods
    let mut server_name = None;
    let mut alpn = Vec::new();
    if r.0.is_empty() {
        return Some(Hello::Parsed { server_name, alpn });
    }
    let mut extensions = r.vector(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vector(2)?;
        match kind {
            // server_name (RFC 6066 §3): a list of (type, name); type 0 is a host name.
            0 => {
                let mut names = data.vector(2)?;
                while !names.0.is_empty() {
                    let name_type = names.u8()?;
                    let name = names.vector(2)?.0;
                    if name_type == 0 && server_name.is_none() {
                        let name = std::str::from_utf8(name).ok()?;
                        server_name = Some(name.to_ascii_lowercase());
                    }
                }
            }
            // application_layer_protocol_negotiation (RFC 7301 §3.1).
            16 => {
                let mut protocols = data.vector(2)?;
                while !protocols.0.is_empty() {
                    let protocol = protocols.vector(1)?.0;
                    if let Ok(protocol) = std::str::from_utf8(protocol) {
                        alpn.push(protocol.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Some(Hello::Parsed { server_name, alpn })
}

/// Envoy's `http_inspector`: `h2c` for the HTTP/2 preface, `http/1.1` or `http/1.0` for a
/// request line; `None` while the bytes could still become either, `Err` when they cannot.
fn http_protocol(bytes: &[u8]) -> Option<Result<&'static str, ()>> {
    let preface_part = &bytes[..bytes.len().min(H2_PREFACE.len())];
    if H2_PREFACE.starts_with(preface_part) {
        if bytes.len() >= H2_PREFACE.len() {
            return Some(Ok("h2c"));
        }
        // "PRI" is a method name too, so a short "PRI …" waits for more.
        return None;
    }
    let line_end = bytes.windows(2).position(|w| w == b"\r\n");
    let line = match line_end {
        Some(end) => &bytes[..end],
        None if bytes.len() > MAX_REQUEST_LINE => return Some(Err(())),
        None => bytes,
    };
    // method SP request-target SP HTTP-version
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let valid_method = |m: &[u8]| m.iter().all(|&b| is_token(b));
    let Some(target) = parts.next() else {
        // Only the method so far.
        return if line_end.is_none() && valid_method(method) {
            None
        } else {
            Some(Err(()))
        };
    };
    if method.is_empty() || !valid_method(method) || target.iter().any(|&b| b <= b' ' || b == 0x7f)
    {
        return Some(Err(()));
    }
    let Some(version) = parts.next() else {
        return if line_end.is_none() {
            None
        } else {
            Some(Err(()))
        };
    };
    if line_end.is_none() {
        let partial = |full: &[u8]| full.starts_with(version);
        return if partial(b"HTTP/1.1") || partial(b"HTTP/1.0") {
            None
        } else {
            Some(Err(()))
        };
    }
    match version {
        b"HTTP/1.1" => Some(Ok("http/1.1")),
        b"HTTP/1.0" => Some(Ok("http/1.0")),
        _ => Some(Err(())),
    }
}

/// RFC 9110 token characters (a method is a token).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, with `server_name` and `alpn`.
    fn rustls_client_hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("write");
        out
    }

    fn done(bytes: &[u8]) -> Detected {
        match inspect(bytes, true, true, false) {
            Inspection::Done(d) => d,
            Inspection::NeedMore => panic!("needs more: {bytes:?}"),
        }
    }

    #[test]
    fn a_client_hello_gives_its_server_name_and_alpn() {
        let hello = rustls_client_hello("Backend.Example", &["h2", "http/1.1"]);
        let detected = done(&hello);
        assert!(detected.tls);
        assert_eq!(detected.server_name.as_deref(), Some("backend.example"));
        assert_eq!(detected.application_protocols, ["h2", "http/1.1"]);
    }

    #[test]
    fn a_client_hello_in_pieces_waits_for_the_rest() {
        let hello = rustls_client_hello("a.test", &[]);
        for cut in [1, 3, 5, 6, 40, hello.len() - 1] {
            assert_eq!(
                inspect(&hello[..cut], true, true, false),
                Inspection::NeedMore,
                "{cut}"
            );
        }
        assert_eq!(done(&hello).server_name.as_deref(), Some("a.test"));
        // Cut short by the client: TLS all the same, no name.
        let cut = inspect(&hello[..40], true, true, true);
        assert_eq!(cut, Inspection::Done(Detected::default()));
    }

    #[test]
    fn a_client_hello_split_over_two_records_is_reassembled() {
        let hello = rustls_client_hello("split.test", &["h2"]);
        let body = &hello[5..];
        let (first, second) = body.split_at(30);
        let mut records = Vec::new();
        for part in [first, second] {
            records.extend_from_slice(&[0x16, 3, 1]);
            records.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            records.extend_from_slice(part);
        }
        let detected = done(&records);
        assert_eq!(detected.server_name.as_deref(), Some("split.test"));
        assert_eq!(detected.application_protocols, ["h2"]);
    }

    #[test]
    fn http_requests_and_the_h2_preface_are_recognised() {
        let protocols = |b: &[u8]| done(b).application_protocols;
        assert_eq!(
            protocols(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            ["http/1.1"]
        );
        assert_eq!(protocols(b"POST /x?y HTTP/1.0\r\n"), ["http/1.0"]);
        assert_eq!(protocols(H2_PREFACE), ["h2c"]);
        assert!(!done(H2_PREFACE).tls);
        for partial in [&b"GE"[..], b"GET", b"GET /", b"GET / HT", b"PRI * HTTP/2"] {
            assert_eq!(
                inspect(partial, true, true, false),
                Inspection::NeedMore,
                "{partial:?}"
            );
        }
    }

    #[test]
    fn other_protocols_are_opaque_tcp_at_once() {
        for bytes in [
            &b"*1\r\n$4\r\nPING\r\n"[..],        // redis
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // postgres SSLRequest
            b"GET / SPDY/3\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            assert_eq!(done(bytes), Detected::default(), "{bytes:?}");
        }
        // Without the HTTP inspector a request line is opaque too.
        assert_eq!(
            inspect(b"GET / HTTP/1.1\r\n", true, false, false),
            Inspection::Done(Detected::default())
        );
    }

    #[test]
    fn garbage_after_a_handshake_record_header_is_tls_without_a_name() {
        let mut bytes = vec![0x16, 3, 1, 0, 8];
        bytes.extend_from_slice(&[0x01, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        let detected = done(&bytes);
        assert!(detected.tls);
        assert_eq!(detected.server_name, None);
    }
}
