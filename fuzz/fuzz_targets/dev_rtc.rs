#![no_main]
use kvmsim_fuzz::devices::{run, RtcRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<RtcRig>(data));
