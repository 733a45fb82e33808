#![no_main]
use kvmsim_fuzz::devices::{run, VirtioBlkRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<VirtioBlkRig>(data));
