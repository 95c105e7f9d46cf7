//! Fuzz target: see `nip_fuzz_entries::header_map`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nip_fuzz_entries::header_map(data));
