//! Fuzz target: see `nip_fuzz_entries::host_calls`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nip_fuzz_entries::host_calls(data));
