//! HTTP/2 frame floods (CVE-2019-9512/9515/9518 class): a client that makes the server
//! answer or process frames for free. The h2 crate bounds resets, headers and windows, but
//! acknowledges SETTINGS and PING without limit and accepts any number of empty frames.
//!
//! [`H2FloodGuard`] reads the frame headers of a connection's inbound bytes (after the
//! 24-byte preface) without buffering payloads and says when a client went past:
//! * control frames that demand an answer (SETTINGS, PING, not ACKs): a bucket of
//!   [`CONTROL_FRAME_BURST`] refilled at [`CONTROL_FRAMES_PER_SECOND`];
//! * frames with an empty payload and no END_STREAM (DATA, HEADERS, CONTINUATION): more than
//!   [`MAX_CONSECUTIVE_EMPTY_FRAMES`] in a row (Envoy's
//!   `max_consecutive_inbound_frames_with_empty_payload`, default 1).
//!
//! The connection is then ended with GOAWAY `ENHANCE_YOUR_CALM`, as Envoy does.

use std::time::Instant;

/// Control frames a client may send at once.
pub const CONTROL_FRAME_BURST: f64 = 100.0;
/// Control frames a client may send per second after its burst.
pub const CONTROL_FRAMES_PER_SECOND: f64 = 20.0;
/// Empty DATA/HEADERS/CONTINUATION frames in a row before the connection is ended.
pub const MAX_CONSECUTIVE_EMPTY_FRAMES: u32 = 1;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;

/// Which flood ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Flood {
    /// SETTINGS/PING faster than the bucket allows.
    ControlFrames,
    /// Empty frames in a row.
    EmptyFrames,
}

/// Frame-header tracker of one connection's inbound bytes.
#[derive(Debug, Clone)]
pub struct H2FloodGuard {
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload_left: usize,
    tokens: f64,
    refilled_at: Instant,
    consecutive_empty: u32,
    /// The highest stream a client opened (the GOAWAY's last stream id).
    last_stream: u32,
}

impl H2FloodGuard {
    /// A guard for a connection that starts with the client preface.
    pub fn new(now: Instant) -> Self {
        H2FloodGuard {
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            tokens: CONTROL_FRAME_BURST,
            refilled_at: now,
            consecutive_empty: 0,
            last_stream: 0,
        }
    }

    /// Feeds inbound bytes.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), H2Flood> {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                self.on_frame(now)?;
            }
        }
        Ok(())
    }

    /// The GOAWAY frame that ends the connection: last stream id, `ENHANCE_YOUR_CALM`.
    pub fn goaway(&self) -> [u8; 17] {
        let mut frame = [0u8; 17];
        frame[..FRAME_HEADER_LEN].copy_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
        frame[9..13].copy_from_slice(&(self.last_stream & 0x7fff_ffff).to_be_bytes());
        frame[13..17].copy_from_slice(&0xbu32.to_be_bytes());
        frame
    }

    fn on_frame(&mut self, now: Instant) -> Result<(), H2Flood> {
        let h = self.header;
        let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        self.payload_left = length;
        match kind {
            SETTINGS | PING if flags & FLAG_ACK == 0 => {
                let elapsed = now
                    .saturating_duration_since(self.refilled_at)
                    .as_secs_f64();
                self.refilled_at = now;
                self.tokens =
                    (self.tokens + elapsed * CONTROL_FRAMES_PER_SECOND).min(CONTROL_FRAME_BURST);
                if self.tokens < 1.0 {
                    return Err(H2Flood::ControlFrames);
                }
                self.tokens -= 1.0;
            }
            DATA | HEADERS | CONTINUATION => {
                if kind == HEADERS {
                    self.last_stream = self.last_stream.max(stream);
                }
                let ends_stream = kind != CONTINUATION && flags & FLAG_END_STREAM != 0;
                if length == 0 && !ends_stream {
                    self.consecutive_empty += 1;
                    if self.consecutive_empty > MAX_CONSECUTIVE_EMPTY_FRAMES {
                        return Err(H2Flood::EmptyFrames);
                    }
                } else {
                    self.consecutive_empty = 0;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_settings_flood_is_stopped_and_a_normal_client_is_not() {
        let start = Instant::now();
        let mut guard = H2FloodGuard::new(start);
        guard.feed(PREFACE, start).unwrap();
        guard.feed(&frame(SETTINGS, 0, 0, &[0; 6]), start).unwrap();
        guard
            .feed(&frame(SETTINGS, FLAG_ACK, 0, &[]), start)
            .unwrap();
        guard.feed(&frame(HEADERS, 0x5, 1, &[0x82]), start).unwrap();
        // A flood in one read, split at odd places.
        let flood: Vec<u8> = (0..500)
            .flat_map(|_| frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]))
            .collect();
        let result = flood
            .chunks(7)
            .try_for_each(|chunk| guard.feed(chunk, start));
        assert_eq!(result, Err(H2Flood::ControlFrames));
        assert_eq!(&guard.goaway()[9..13], &1u32.to_be_bytes());
    }

    #[test]
    fn pings_at_a_steady_pace_pass() {
        let start = Instant::now();
        let mut guard = H2FloodGuard::new(start);
        guard.feed(PREFACE, start).unwrap();
        for i in 0..1000u64 {
            let now = start + Duration::from_millis(i * 100);
            guard.feed(&frame(PING, 0, 0, &[0; 8]), now).unwrap();
        }
    }

    #[test]
    fn empty_frames_in_a_row_end_the_connection() {
        let now = Instant::now();
        let mut guard = H2FloodGuard::new(now);
        guard.feed(PREFACE, now).unwrap();
        guard.feed(&frame(HEADERS, 0x4, 1, &[0x82]), now).unwrap();
        guard.feed(&frame(DATA, 0, 1, &[]), now).unwrap();
        guard.feed(&frame(DATA, 0, 1, b"x"), now).unwrap();
        guard.feed(&frame(DATA, 0, 1, &[]), now).unwrap();
        assert_eq!(
            guard.feed(&frame(DATA, 0, 1, &[]), now),
            Err(H2Flood::EmptyFrames)
        );
        // An empty DATA frame that ends the stream is normal.
        let mut guard = H2FloodGuard::new(now);
        guard.feed(PREFACE, now).unwrap();
        for stream in (1..100).step_by(2) {
            guard
                .feed(&frame(HEADERS, 0x4, stream, &[0x82]), now)
                .unwrap();
            guard
                .feed(&frame(DATA, FLAG_END_STREAM, stream, &[]), now)
                .unwrap();
        }
    }
}
