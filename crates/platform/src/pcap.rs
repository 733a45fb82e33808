//! Packet captures: the classic pcap file format (what `tcpdump -w`
//! writes) with nanosecond timestamps (magic `0xa1b23c4d`), link type
//! Ethernet. Timestamps are simulated time: a frame at tick `t` is
//! stamped `t / 10^12` seconds and the nanoseconds after (tcpdump and
//! Wireshark print them from the start of the simulation, 1970-01-01).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use sim::tick::{TICKS_PER_NS, TICKS_PER_SECOND};
use sim::Tick;

/// pcap with nanosecond timestamps.
pub const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Bytes of a frame kept at most (a whole frame always fits).
pub const SNAPLEN: u32 = 65_535;

/// The 24-byte file header.
pub fn file_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&MAGIC_NS.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs: 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// One record: header (seconds, nanoseconds, captured and original
/// length) and the frame.
pub fn record(at: Tick, frame: &[u8]) -> Vec<u8> {
    let secs = at / TICKS_PER_SECOND;
    let nanos = (at % TICKS_PER_SECOND) / TICKS_PER_NS;
    let len = frame.len().min(SNAPLEN as usize);
    let mut r = Vec::with_capacity(16 + len);
    // pcap's seconds are 32 bits: past 136 years of simulated time they wrap.
    r.extend_from_slice(&(secs as u32).to_le_bytes());
    r.extend_from_slice(&(nanos as u32).to_le_bytes());
    r.extend_from_slice(&(len as u32).to_le_bytes());
    r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    r.extend_from_slice(&frame[..len]);
    r
}

/// A capture file being written.
pub struct Capture {
    out: BufWriter<File>,
    path: String,
}

impl Capture {
    /// Creates `path` and writes the file header.
    pub fn create(path: &Path) -> std::io::Result<Capture> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&file_header())?;
        Ok(Capture {
            out,
            path: path.display().to_string(),
        })
    }

    /// Appends a frame stamped `at`.
    pub fn write(&mut self, at: Tick, frame: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&record(at, frame))
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_records_follow_the_format() {
        let h = file_header();
        assert_eq!(&h[0..4], &[0x4d, 0x3c, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 1);
        // 2.5 s and 7 ns plus 999 ps (dropped: nanosecond resolution).
        let at = 2 * TICKS_PER_SECOND + TICKS_PER_SECOND / 2 + 7 * TICKS_PER_NS + 999;
        let r = record(at, &[1, 2, 3]);
        let w = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap());
        assert_eq!((w(0), w(4), w(8), w(12)), (2, 500_000_007, 3, 3));
        assert_eq!(&r[16..], &[1, 2, 3]);
    }

    /// tcpdump (when the host has it) reads what we write, with the
    /// simulated timestamps.
    #[test]
    fn tcpdump_reads_a_capture() {
        let Ok(out) = std::process::Command::new("tcpdump")
            .arg("--version")
            .output()
        else {
            eprintln!("no tcpdump on this host: skipped");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("kvmsim-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.pcap");
        let mut c = Capture::create(&path).unwrap();
        // An ARP request from 02:6b:76:00:00:00 for 10.0.0.2, 1.5 ms in.
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[0x02, 0x6b, 0x76, 0, 0, 0, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0x02, 0x6b, 0x76, 0, 0, 0, 10, 0, 0, 1]);
        arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        c.write(1_500 * sim::tick::TICKS_PER_US, &arp).unwrap();
        c.flush().unwrap();
        drop(c);
        let out = std::process::Command::new("tcpdump")
            .args(["-n", "-tt", "--nano", "-r"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.starts_with("0.001500000 ARP, Request who-has 10.0.0.2 tell 10.0.0.1"),
            "{text}"
        );
    }
}
