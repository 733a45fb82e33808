#![no_main]
use kvmsim_fuzz::devices::{run, IoApicRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<IoApicRig>(data));
