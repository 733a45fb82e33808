#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kvmsim_fuzz::targets::dev_restore(data));
