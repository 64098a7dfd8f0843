#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| metapass_fuzz::policy_file(data));
