#![no_main]
use kvmsim_fuzz::devices::{run, PicRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<PicRig>(data));
