//! Fuzz target: see `nip_fuzz_entries::config_yaml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nip_fuzz_entries::config_yaml(data));
