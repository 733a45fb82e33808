#![no_main]
use kvmsim_fuzz::devices::{run, MailboxRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<MailboxRig>(data));
