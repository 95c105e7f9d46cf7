//! Watching a request head go by without parsing it: where it ends, how
//! big it got, and whether its request line names HTTP/1.0 or HTTP/1.1.
//!
//! The guarded stream (`stream.rs`) feeds every byte a client sends while a request head
//! is due, so the head's deadline stops when the head is complete, a head past
//! `max_request_headers_kb` is refused with 431 before it is buffered, and an HTTP/0.9 line
//! (`GET /`, which a parser waits on forever) is refused with 400 at once.

/// What the bytes fed so far say about the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProgress {
    /// More is due.
    Incomplete,
    /// The blank line after the fields arrived; `used` bytes of the last chunk belong to
    /// the head.
    Complete {
        /// Bytes of the last chunk up to and including the blank line.
        used: usize,
    },
    /// The head grew past the limit before it ended.
    TooLarge,
    /// The request line does not end in `HTTP/1.0` or `HTTP/1.1`.
    NotHttp1,
}

/// The longest version suffix checked: `HTTP/1.1`.
const VERSION_LEN: usize = 8;

/// Incremental scanner of one request head.
#[derive(Debug, Clone)]
pub struct HeadScanner {
    limit: usize,
    seen: usize,
    /// Something other than CR/LF arrived (empty lines before a request line are skipped,
    /// RFC 9112 §2.2).
    started: bool,
    at_line_start: bool,
    cr_at_line_start: bool,
    request_line_done: bool,
    /// The last bytes of the request line, for its version.
    line_tail: [u8; VERSION_LEN + 2],
    line_tail_len: usize,
}

impl HeadScanner {
    /// A scanner that refuses heads longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        HeadScanner {
            limit,
            seen: 0,
            started: false,
            at_line_start: false,
            cr_at_line_start: false,
            request_line_done: false,
            line_tail: [0; VERSION_LEN + 2],
            line_tail_len: 0,
        }
    }

    /// Feeds the next bytes the client sent.
    ///
    /// Lines are skipped with `memchr` rather than byte by byte: a typical head is a handful
    /// of lines, so this costs a few hundred instructions a request instead of thousands.
    pub fn feed(&mut self, chunk: &[u8]) -> HeadProgress {
        let base = self.seen;
        // Bytes of `chunk` up to index `end` (exclusive) fit in the limit.
        let limit = self.limit;
        let within_limit = |end: usize| base + end <= limit;
        let mut pos = 0;
        if !self.started {
            while let Some(&byte) = chunk.get(pos) {
                if byte != b'\r' && byte != b'\n' {
                    self.started = true;
                    break;
                }
                pos += 1;
            }
        }
        if self.started && !self.request_line_done {
            match memchr::memchr(b'\n', &chunk[pos..]) {
                Some(offset) => {
                    let newline = pos + offset;
                    if !within_limit(newline + 1) {
                        return HeadProgress::TooLarge;
                    }
                    self.push_line_bytes(&chunk[pos..newline]);
                    self.request_line_done = true;
                    if !self.request_line_is_http1() {
                        return HeadProgress::NotHttp1;
                    }
                    self.at_line_start = true;
                    pos = newline + 1;
                }
                None => {
                    self.push_line_bytes(&chunk[pos..]);
                    pos = chunk.len();
                }
            }
        }
        if self.request_line_done {
            while let Some(&byte) = chunk.get(pos) {
                if self.at_line_start {
                    match byte {
                        b'\n' => {
                            if !within_limit(pos + 1) {
                                return HeadProgress::TooLarge;
                            }
                            return HeadProgress::Complete { used: pos + 1 };
                        }
                        b'\r' if !self.cr_at_line_start => {
                            self.cr_at_line_start = true;
                            pos += 1;
                            continue;
                        }
                        _ => {}
                    }
                }
                // Inside a field line: on to the byte after its line feed.
                self.cr_at_line_start = false;
                match memchr::memchr(b'\n', &chunk[pos..]) {
                    Some(offset) => {
                        pos += offset + 1;
                        self.at_line_start = true;
                    }
                    None => {
                        pos = chunk.len();
                        self.at_line_start = false;
                    }
                }
            }
        }
        self.seen = base + chunk.len();
        if self.seen > self.limit {
            return HeadProgress::TooLarge;
        }
        HeadProgress::Incomplete
    }

    /// Keeps the last [`VERSION_LEN`] + 2 bytes of the request line seen so far.
    fn push_line_bytes(&mut self, bytes: &[u8]) {
        let capacity = self.line_tail.len();
        if bytes.len() >= capacity {
            self.line_tail
                .copy_from_slice(&bytes[bytes.len() - capacity..]);
            self.line_tail_len = capacity;
            return;
        }
        for &byte in bytes {
            self.push_line_byte(byte);
        }
    }

    fn push_line_byte(&mut self, byte: u8) {
        if self.line_tail_len == self.line_tail.len() {
            self.line_tail.copy_within(1.., 0);
            self.line_tail_len -= 1;
        }
        self.line_tail[self.line_tail_len] = byte;
        self.line_tail_len += 1;
    }

    fn request_line_is_http1(&self) -> bool {
        let mut tail = &self.line_tail[..self.line_tail_len];
        if let [rest @ .., b'\r'] = tail {
            tail = rest;
        }
        tail.ends_with(b" HTTP/1.1") || tail.ends_with(b" HTTP/1.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(limit: usize, chunks: &[&[u8]]) -> HeadProgress {
        let mut scanner = HeadScanner::new(limit);
        let mut last = HeadProgress::Incomplete;
        for chunk in chunks {
            last = scanner.feed(chunk);
            if last != HeadProgress::Incomplete {
                return last;
            }
        }
        last
    }

    #[test]
    fn finds_the_end_of_a_head_across_chunks() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(
            scan_all(1024, &[head]),
            HeadProgress::Complete {
                used: head.len() - 4
            }
        );
        // One byte at a time.
        let mut scanner = HeadScanner::new(1024);
        let mut ended_at = None;
        for (i, byte) in head.iter().enumerate() {
            if let HeadProgress::Complete { .. } = scanner.feed(std::slice::from_ref(byte)) {
                ended_at = Some(i);
                break;
            }
        }
        assert_eq!(ended_at, Some(head.len() - 5));
        // Bare LF line endings, which httparse accepts too.
        assert_eq!(
            scan_all(1024, &[b"GET / HTTP/1.0\nHost: a\n\n"]),
            HeadProgress::Complete { used: 24 }
        );
    }

    #[test]
    fn empty_lines_before_the_request_line_do_not_end_it() {
        assert_eq!(
            scan_all(1024, &[b"\r\n\r\n", b"GET / HTTP/1.1\r\n"]),
            HeadProgress::Incomplete
        );
    }

    #[test]
    fn refuses_http09_and_other_versions() {
        assert_eq!(scan_all(1024, &[b"GET /\r\n"]), HeadProgress::NotHttp1);
        assert_eq!(scan_all(1024, &[b"GET /\n"]), HeadProgress::NotHttp1);
        assert_eq!(
            scan_all(1024, &[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
            HeadProgress::NotHttp1
        );
        assert_eq!(
            scan_all(
                1024,
                &[b"GET /a-long-path-", b"that-spans HTTP/1", b".1\r\n"]
            ),
            HeadProgress::Incomplete
        );
    }

    /// The scanner as first written, one byte at a time: the oracle `feed` must agree with.
    fn reference_feed(scanner: &mut HeadScanner, chunk: &[u8]) -> HeadProgress {
        for (i, &byte) in chunk.iter().enumerate() {
            scanner.seen += 1;
            if scanner.seen > scanner.limit {
                return HeadProgress::TooLarge;
            }
            if !scanner.started {
                if byte == b'\r' || byte == b'\n' {
                    continue;
                }
                scanner.started = true;
            }
            if !scanner.request_line_done {
                if byte == b'\n' {
                    scanner.request_line_done = true;
                    if !scanner.request_line_is_http1() {
                        return HeadProgress::NotHttp1;
                    }
                    scanner.at_line_start = true;
                    continue;
                }
                scanner.push_line_byte(byte);
                continue;
            }
            match byte {
                b'\n' if scanner.at_line_start => return HeadProgress::Complete { used: i + 1 },
                b'\n' => {
                    scanner.at_line_start = true;
                    scanner.cr_at_line_start = false;
                }
                b'\r' if scanner.at_line_start && !scanner.cr_at_line_start => {
                    scanner.cr_at_line_start = true;
                }
                _ => {
                    scanner.at_line_start = false;
                    scanner.cr_at_line_start = false;
                }
            }
        }
        HeadProgress::Incomplete
    }

    #[test]
    fn agrees_with_the_byte_at_a_time_scanner_on_random_heads_and_splits() {
        let alphabet: &[&[u8]] = &[
            b"\r",
            b"\n",
            b"\r\n",
            b" HTTP/1.1",
            b" HTTP/1.0",
            b"GET /",
            b"a",
            b": ",
            b"x",
            b"HTTP/2.0",
            b"\r\r",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..rng.usize(0..24) {
                input.extend_from_slice(alphabet[rng.usize(..alphabet.len())]);
            }
            let limit = rng.usize(0..input.len() + 8);
            let mut fast = HeadScanner::new(limit);
            let mut slow = HeadScanner::new(limit);
            let mut rest = &input[..];
            while !rest.is_empty() {
                let cut = rng.usize(1..=rest.len());
                let (chunk, tail) = rest.split_at(cut);
                rest = tail;
                let expected = reference_feed(&mut slow, chunk);
                let got = fast.feed(chunk);
                assert_eq!(
                    got,
                    expected,
                    "input {:?} limit {limit}",
                    String::from_utf8_lossy(&input)
                );
                if expected != HeadProgress::Incomplete {
                    break;
                }
            }
        }
    }

    #[test]
    fn a_head_past_the_limit_is_too_large() {
        let mut head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(scan_all(64, &[&head]), HeadProgress::TooLarge);
        assert_eq!(scan_all(200, &[&head]), HeadProgress::Incomplete);
    }
}
