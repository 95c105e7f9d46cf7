//! Fuzz target: see `nip_fuzz_entries::xds_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nip_fuzz_entries::xds_response(data));
