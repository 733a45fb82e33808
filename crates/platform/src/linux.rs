//! Linux kernel images: a bzImage's setup header and compressed payload, or
//! a plain vmlinux ELF.
//!
//! A bzImage is not run as shipped: its payload (the compressed vmlinux ELF)
//! is decompressed on the host and the kernel is entered directly at its
//! 64-bit entry, because a guest decompressing itself in emulated kernel
//! mode takes minutes on a software-assisted KVM. Every parser here treats
//! the image as hostile: bounds-checked, with a cap on decompressed size.

use std::io::Read;

/// Largest decompressed kernel accepted (a defence against decompression bombs).
pub const MAX_KERNEL: usize = 512 << 20;

/// A payload compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Lzma,
    Zstd,
    Lz4,
    Bzip2,
    Lzo,
}

impl Compression {
    /// Recognises the format by its magic bytes.
    pub fn detect(data: &[u8]) -> Option<Self> {
        let m = |magic: &[u8]| data.starts_with(magic);
        Some(if m(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if m(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else if m(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if m(&[0x02, 0x21, 0x4c, 0x18]) {
            Compression::Lz4
        } else if m(b"BZh") {
            Compression::Bzip2
        } else if m(&[0x89, b'L', b'Z', b'O']) {
            Compression::Lzo
        } else if m(&[0x5d, 0x00, 0x00]) {
            Compression::Lzma
        } else {
            return None;
        })
    }
}

/// A kernel image that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{0}: not a bzImage (no \"HdrS\" setup header) and not an ELF file")]
    Unknown(String),
    #[error("{0}: bzImage boot protocol {1}.{2:02} is too old (2.08 or later is needed for the payload fields)")]
    OldProtocol(String, u8, u8),
    #[error("{0}: the setup header's payload [{1:#x}, +{2:#x}) lies outside the file")]
    BadPayload(String, u64, u64),
    #[error("{0}: the payload is compressed with {1:?}, which kvmsim does not decompress (gzip, xz, lzma, zstd and lz4 are supported)")]
    Unsupported(String, Compression),
    #[error("{0}: the payload's compression is not recognised (magic {1:02x?})")]
    UnknownCompression(String, Vec<u8>),
    #[error("{0}: decompressing the {1:?} payload failed: {2}")]
    Decompress(String, Compression, String),
    #[error("{0}: the decompressed kernel exceeds the 512 MiB limit")]
    TooLarge(String),
}

/// What a kernel image contained.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// The vmlinux ELF to load.
    pub elf: Vec<u8>,
    /// The bzImage's setup header (bytes 0x1F1 up to its end), if any.
    pub setup_header: Option<Vec<u8>>,
    /// How the payload was compressed (None for a plain ELF).
    pub compression: Option<Compression>,
    /// The boot protocol version (e.g. 0x020f).
    pub protocol: u16,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// True if `image` looks like a bzImage.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS")
}

/// Output of a decompressor: at most [`MAX_KERNEL`] bytes, and an error as
/// soon as the user interrupts the run, so that neither a decompression
/// bomb nor a slow stream holds the set-up.
struct CappedOutput {
    out: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if crate::console::interrupted() {
            // Not ErrorKind::Interrupted: write_all and copy retry that.
            return Err(std::io::Error::other("interrupted by the user"));
        }
        if self.out.len() + buf.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other(format!(
                "more than {} bytes",
                self.cap
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decompresses with `run` into a [`CappedOutput`].
fn capped<E: std::fmt::Display>(
    name: &str,
    c: Compression,
    cap: usize,
    run: impl FnOnce(&mut CappedOutput) -> Result<(), E>,
) -> Result<Vec<u8>, KernelError> {
    let mut out = CappedOutput {
        out: Vec::new(),
        cap,
        over: false,
    };
    let r = run(&mut out);
    if out.over {
        return Err(KernelError::TooLarge(name.into()));
    }
    r.map_err(|e| KernelError::Decompress(name.into(), c, e.to_string()))?;
    Ok(out.out)
}

/// Reads at most `cap` bytes from `r`.
fn read_capped(
    mut r: impl Read,
    name: &str,
    c: Compression,
    cap: usize,
) -> Result<Vec<u8>, KernelError> {
    capped(name, c, cap, |out| std::io::copy(&mut r, out).map(|_| ()))
}

/// Decompresses a kernel payload (at most [`MAX_KERNEL`] bytes).
pub fn decompress(data: &[u8], name: &str) -> Result<(Compression, Vec<u8>), KernelError> {
    decompress_capped(data, name, MAX_KERNEL)
}

/// Decompresses a payload of at most `cap` bytes: every decoder stops as
/// soon as its output would exceed it (or the user interrupts the run).
fn decompress_capped(
    data: &[u8],
    name: &str,
    cap: usize,
) -> Result<(Compression, Vec<u8>), KernelError> {
    let c = Compression::detect(data).ok_or_else(|| {
        KernelError::UnknownCompression(name.into(), data.iter().take(6).copied().collect())
    })?;
    let err = |e: String| KernelError::Decompress(name.into(), c, e);
    let out = match c {
        Compression::Gzip => read_capped(flate2::read::GzDecoder::new(data), name, c, cap)?,
        Compression::Zstd => {
            let d =
                ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| err(e.to_string()))?;
            read_capped(d, name, c, cap)?
        }
        Compression::Xz | Compression::Lzma => {
            // lzma-rs decodes an xz block's run of chunks in memory before
            // writing any of it out: the sizes the chunks declare are checked
            // first.
            if c == Compression::Xz && xz_declared_size(data, cap as u64) > cap as u64 {
                return Err(KernelError::TooLarge(name.into()));
            }
            capped(name, c, cap, |out| {
                let mut input = std::io::BufReader::new(data);
                let r = if c == Compression::Xz {
                    lzma_rs::xz_decompress(&mut input, out)
                } else {
                    lzma_rs::lzma_decompress(&mut input, out)
                };
                r.map_err(|e| format!("{e:?}"))
            })?
        }
        Compression::Lz4 => lz4_legacy(data, cap).map_err(|e| match e {
            Lz4Error::TooLarge => KernelError::TooLarge(name.into()),
            Lz4Error::Other(e) => err(e),
        })?,
        Compression::Bzip2 | Compression::Lzo => {
            return Err(KernelError::Unsupported(name.into(), c))
        }
    };
    Ok((c, out))
}

/// The decompressed size the LZMA2 chunks of an xz stream declare, summed
/// (stopping once past `cap`). Where the layout is not as expected
/// it counts what it found; the decoder then says what is wrong.
fn xz_declared_size(data: &[u8], cap: u64) -> u64 {
    let be16 = |i: usize| data.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    // Stream flags: the size of each block's check.
    let check = match data.get(7).map(|f| f & 0x0f) {
        Some(0) => 0,
        Some(1) => 4,
        Some(4) => 8,
        Some(10) => 32,
        _ => return 0,
    };
    let mut total = 0u64;
    // Past the stream header, blocks: each a header (size byte * 4 + 4),
    // LZMA2 chunks up to a 0 byte, padding to 4 bytes, the check. A 0
    // header size byte starts the index.
    let mut pos = 12usize;
    while let Some(&h) = data.get(pos).filter(|&&h| h != 0) {
        pos += (usize::from(h) + 1) * 4;
        loop {
            let Some(&control) = data.get(pos) else {
                return total;
            };
            let (unpacked, len) = match control {
                0x00 => break,
                // Uncompressed chunk: size - 1 (16 bits), the data.
                0x01 | 0x02 => match be16(pos + 1) {
                    Some(n) => (u64::from(n) + 1, 3 + usize::from(n) + 1),
                    None => return total,
                },
                // LZMA chunk: unpacked size - 1 (21 bits), packed size - 1
                // (16 bits), a properties byte on a properties reset, the data.
                0x80..=0xff => match (be16(pos + 1), be16(pos + 3)) {
                    (Some(u), Some(p)) => (
                        (u64::from(control & 0x1f) << 16) + u64::from(u) + 1,
                        5 + usize::from(control >= 0xc0) + usize::from(p) + 1,
                    ),
                    _ => return total,
                },
                _ => return total,
            };
            total += unpacked;
            if total > cap {
                return total;
            }
            pos += len;
        }
        pos = (pos + 1).next_multiple_of(4) + check;
    }
    total
}

/// Why an LZ4 stream was not decompressed.
enum Lz4Error {
    TooLarge,
    Other(String),
}

/// The LZ4 "legacy" frame the kernel uses: magic, then blocks of
/// (u32 compressed size, data), each decompressing to at most 8 MiB.
/// The output stays within `cap` bytes.
fn lz4_legacy(data: &[u8], cap: usize) -> Result<Vec<u8>, Lz4Error> {
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut pos = 4;
    while pos + 4 <= data.len() {
        let size = u32_at(data, pos).unwrap_or(0) as usize;
        // The kernel appends the uncompressed size (or a new magic) after
        // the last block; a size that is a magic or overruns ends the stream.
        if size == 0x184c_2102 || size == 0 {
            break;
        }
        pos += 4;
        let Some(block) = data.get(pos..pos + size) else {
            break;
        };
        if crate::console::interrupted() {
            return Err(Lz4Error::Other("interrupted by the user".into()));
        }
        buf.resize(BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut buf)
            .map_err(|e| Lz4Error::Other(e.to_string()))?;
        if out.len() + n > cap {
            return Err(Lz4Error::TooLarge);
        }
        out.extend_from_slice(&buf[..n]);
        pos += size;
    }
    if out.is_empty() {
        return Err(Lz4Error::Other("no LZ4 blocks".into()));
    }
    Ok(out)
}

/// Parses a kernel image: a bzImage (decompressing its payload) or an ELF.
pub fn parse(image: &[u8], name: &str) -> Result<KernelImage, KernelError> {
    if image.starts_with(b"\x7fELF") {
        return Ok(KernelImage {
            elf: image.to_vec(),
            setup_header: None,
            compression: None,
            protocol: 0x020f,
        });
    }
    if !is_bzimage(image) {
        return Err(KernelError::Unknown(name.into()));
    }
    let protocol = u16_at(image, 0x206).unwrap_or(0);
    if protocol < 0x0208 {
        return Err(KernelError::OldProtocol(
            name.into(),
            (protocol >> 8) as u8,
            protocol as u8,
        ));
    }
    let setup_sects = match image.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = u64::from(u32_at(image, 0x248).unwrap_or(0));
    let len = u64::from(u32_at(image, 0x24c).unwrap_or(0));
    let start = pm_start as u64 + off;
    let payload = usize::try_from(start)
        .ok()
        .zip(usize::try_from(start + len).ok())
        .and_then(|(s, e)| image.get(s..e))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| KernelError::BadPayload(name.into(), start, len))?;
    let (compression, elf) = decompress(payload, name)?;
    // The setup header runs from 0x1F1 to 0x202 + the byte at 0x201.
    let hdr_end = (0x202 + usize::from(image.get(0x201).copied().unwrap_or(0))).min(image.len());
    Ok(KernelImage {
        elf,
        setup_header: image.get(0x1f1..hdr_end).map(<[u8]>::to_vec),
        compression: Some(compression),
        protocol,
    })
}

/// The `kvmsim doctor` finding that tells whether kernel-mode code runs
/// natively (its failure: this host's KVM emulates kernel mode).
pub const KERNEL_SPEED_PROBE: &str = "native speed at CPL0 and CPL3";

/// True if `kvmsim doctor`'s probes (run once per process) find that this
/// host's KVM emulates kernel-mode code.
pub fn kernel_mode_emulated() -> bool {
    kvm::doctor::cached()
        .findings
        .iter()
        .any(|f| f.name == KERNEL_SPEED_PROBE && !f.ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4; // setup sectors
        img[0x201] = 0x62; // header length
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img
    }

    const KERNEL: &[u8] = b"\x7fELF pretend this is a vmlinux, repeated repeated repeated";

    #[test]
    fn gzip_payload() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(KERNEL).unwrap();
        let img = fake_bzimage(&e.finish().unwrap());
        let k = parse(&img, "k").unwrap();
        assert_eq!(k.elf, KERNEL);
        assert_eq!(k.compression, Some(Compression::Gzip));
        assert_eq!(k.protocol, 0x020f);
        assert_eq!(
            &k.setup_header.unwrap()[0x202 - 0x1f1..0x206 - 0x1f1],
            b"HdrS"
        );
    }

    #[test]
    fn lz4_legacy_payload() {
        let block = lz4_flex::block::compress(KERNEL);
        let mut p = vec![0x02, 0x21, 0x4c, 0x18];
        p.extend_from_slice(&(block.len() as u32).to_le_bytes());
        p.extend_from_slice(&block);
        p.extend_from_slice(&(KERNEL.len() as u32).to_le_bytes()); // trailing size
        let k = parse(&fake_bzimage(&p), "k").unwrap();
        assert_eq!(k.elf, KERNEL);
        assert_eq!(k.compression, Some(Compression::Lz4));
    }

    #[test]
    fn xz_and_lzma_payloads() {
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(KERNEL), &mut xz).unwrap();
        assert_eq!(parse(&fake_bzimage(&xz), "k").unwrap().elf, KERNEL);
        let mut lz = Vec::new();
        lzma_rs::lzma_compress(&mut std::io::BufReader::new(KERNEL), &mut lz).unwrap();
        let (c, out) = decompress(&lz, "k").unwrap();
        assert_eq!((c, out.as_slice()), (Compression::Lzma, KERNEL));
    }

    #[test]
    fn xz_declared_sizes_are_checked_before_decoding() {
        // An xz stream's chunks say how much they decode to: lzma-rs would
        // hold all of it in memory before kvmsim could count it.
        let mut xz = Vec::new();
        let data = KERNEL.repeat(5000);
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&data[..]), &mut xz).unwrap();
        assert_eq!(xz_declared_size(&xz, u64::MAX), data.len() as u64);
        // A stream header (CRC32 check), a block header, then LZMA chunks
        // of 2 MiB each, 300 of them (600 MiB).
        let mut bomb = vec![0xfd, b'7', b'z', b'X', b'Z', 0, 0, 1, 0, 0, 0, 0];
        bomb.extend_from_slice(&[2, 0, 0x21, 1, 0x16, 0, 0, 0, 0, 0, 0, 0]);
        for _ in 0..300 {
            bomb.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x5d, 0x00]);
        }
        assert!(xz_declared_size(&bomb, u64::MAX) > MAX_KERNEL as u64);
        assert_eq!(
            decompress(&bomb, "k").unwrap_err(),
            KernelError::TooLarge("k".into())
        );
    }

    #[test]
    fn an_xz_footer_with_the_largest_index_size_is_an_error() {
        // Found by fuzzing (fuzz/, target decompress_xz): lzma-rs adds 1 to
        // the footer's backward size, which overflowed (a panic in debug
        // builds) for 0xffffffff.
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(KERNEL), &mut xz).unwrap();
        let n = xz.len();
        xz[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&xz, "k"),
            Err(KernelError::Decompress(_, Compression::Xz, _))
        ));
    }

    #[test]
    fn bad_images_are_clear_errors() {
        assert!(matches!(
            parse(b"nothing", "k"),
            Err(KernelError::Unknown(_))
        ));
        let mut img = fake_bzimage(b"BZh91AY&SY");
        assert!(matches!(
            parse(&img, "k"),
            Err(KernelError::Unsupported(_, Compression::Bzip2))
        ));
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&img, "k"), Err(KernelError::BadPayload(..))));
        let img = fake_bzimage(&[0x1f, 0x8b, 1, 2, 3]);
        assert!(matches!(parse(&img, "k"), Err(KernelError::Decompress(..))));
        let mut old = fake_bzimage(&[0x1f, 0x8b]);
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(
            parse(&old, "k"),
            Err(KernelError::OldProtocol(..))
        ));
    }

    #[test]
    fn every_decoder_stops_at_the_cap() {
        // 1 MiB of zeros: each decoder must stop as its output passes the
        // cap (here 64 KiB), holding no more than that.
        let zeros = vec![0u8; 1 << 20];
        let cap = 64 << 10;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&zeros).unwrap();
        let gz = gz.finish().unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&zeros[..]), &mut xz).unwrap();
        let mut lzma = Vec::new();
        lzma_rs::lzma_compress(&mut std::io::BufReader::new(&zeros[..]), &mut lzma).unwrap();
        let block = lz4_flex::block::compress(&zeros);
        let mut lz4 = vec![0x02, 0x21, 0x4c, 0x18];
        lz4.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz4.extend_from_slice(&block);
        for (what, data) in [("gzip", &gz), ("xz", &xz), ("lzma", &lzma), ("lz4", &lz4)] {
            assert_eq!(
                decompress_capped(data, "k", 1 << 20).unwrap().1.len(),
                1 << 20,
                "{what}"
            );
            assert!(
                matches!(
                    decompress_capped(data, "k", cap),
                    Err(KernelError::TooLarge(_))
                ),
                "{what}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096), flip in 0usize..4096, v: u8) {
            let _ = parse(&bytes, "fuzz");
            let mut img = fake_bzimage(&[0x02, 0x21, 0x4c, 0x18, 9, 0, 0, 0, 1, 2, 3]);
            let i = flip % img.len();
            img[i] = v;
            let _ = parse(&img, "fuzz");
        }
    }
}
