//! Decides whether this crate's integration tests can use KVM, by the rule
//! crates/kvmsim/build.rs uses (support/kvm_cfg.rs): tests that need KVM
//! are counted as ignored where it was unusable at build time.

include!("../../support/kvm_cfg.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../../support/kvm_cfg.rs");
    decide_kvm_cfg();
}
