//! Ctrl-C (SIGINT/SIGTERM) during set-up: every slow phase stops at the
//! interrupt flag instead of running to its end. Its own test binary: the
//! flag is process-wide.

use std::io::Write;

use platform::input::{read_file, InputError, Limit};
use platform::{Config, PlatformError, Simulation};

#[test]
fn set_up_stops_when_the_user_interrupts() {
    let dir = std::env::temp_dir().join(format!("kvmsim-setup-int-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("kernel");
    // Sparse: a large image that takes long to read.
    std::fs::File::create(&image)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&[0u8; 1 << 16]).unwrap();
    let gz = gz.finish().unwrap();
    // Before the interrupt all of this works.
    assert!(read_file(image.to_str().unwrap(), "kernel", &Limit::kernel()).is_ok());
    assert!(platform::linux::decompress(&gz, "k").is_ok());

    platform::console::request_interrupt();

    let e = read_file(image.to_str().unwrap(), "kernel", &Limit::kernel()).unwrap_err();
    assert!(matches!(e, InputError::Interrupted { .. }), "{e}");
    assert!(e.to_string().contains("interrupted by the user"), "{e}");
    let e = platform::linux::decompress(&gz, "k").unwrap_err();
    assert!(e.to_string().contains("interrupted by the user"), "{e}");
    // Building systems stops before the first one (no KVM is opened).
    let mut cfg = Config::for_kernel("builtin:hello");
    let out = platform::OutDir::stage(&dir.join("out")).unwrap();
    assert!(matches!(
        Simulation::build(&mut cfg, out),
        Err(PlatformError::Interrupted)
    ));
    // The run never committed: the folder it created is gone again.
    assert!(!dir.join("out").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
