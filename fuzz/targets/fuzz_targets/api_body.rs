//! Fuzz target: see `nip_fuzz_entries::api_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nip_fuzz_entries::api_body(data));
