#![no_main]
use kvmsim_fuzz::devices::{run, VirtioNetRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<VirtioNetRig>(data));
