#![no_main]
use kvmsim_fuzz::devices::{run, I8042Rig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<I8042Rig>(data));
