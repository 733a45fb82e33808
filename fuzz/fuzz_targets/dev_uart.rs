#![no_main]
use kvmsim_fuzz::devices::{run, UartRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<UartRig>(data));
