//! The byte format of a device access script.
//!
//! An input is an 8-byte header (a little-endian `u64` parameter, used by
//! the devices that take one at construction: the RTC's start time, the
//! mailbox's port and latency) followed by 24-byte records, one per step.
//! Trailing bytes that do not fill a record are ignored.
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0 | kind, window | bits 0-1: 0 read, 1 write, 2 event, 3 time only; bits 2-7: which of the device's address windows |
//! | 1 | size | access size: 1 + (byte % 8), then at most the window's length |
//! | 2-3 | offset | offset in the window (modulo the room left for the access) |
//! | 4-7 | advance | simulated time that passes before the step: bits 0-23 a mantissa, bits 24-31 a left shift (saturating) |
//! | 8-15 | value | the value written (little-endian, its low `size` bytes), or the event's argument |
//! | 16-23 | aux | the event's second argument; sim-ops call arguments |
//!
//! The offset and size are reduced the way the IO bus routes accesses: an
//! access always lies inside one window of the device (the bus never hands
//! a device anything else), at any offset and with any size from 1 to 8.

use sim::Tick;

/// Length of the header.
pub const HEADER: usize = 8;
/// Length of one record.
pub const RECORD: usize = 24;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A guest read through the bus.
    Read,
    /// A guest write through the bus.
    Write,
    /// Something that does not come from the bus: an interrupt line
    /// changing, the CPU acknowledging an interrupt, input arriving.
    Event,
    /// Only the time advance.
    Idle,
}

/// One step of a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: Kind,
    pub window: u8,
    pub size: u8,
    pub offset: u16,
    pub advance: u32,
    pub value: u64,
    pub aux: u64,
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Op {
    /// Decodes one record.
    pub fn decode(r: &[u8; RECORD]) -> Op {
        Op {
            kind: match r[0] & 3 {
                0 => Kind::Read,
                1 => Kind::Write,
                2 => Kind::Event,
                _ => Kind::Idle,
            },
            window: r[0] >> 2,
            size: 1 + r[1] % 8,
            offset: u16::from_le_bytes([r[2], r[3]]),
            advance: u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
            value: u64_le(&r[8..16]),
            aux: u64_le(&r[16..24]),
        }
    }

    /// The record for this step (the inverse of [`Op::decode`] for sizes 1..=8).
    pub fn encode(&self) -> [u8; RECORD] {
        let mut r = [0u8; RECORD];
        let kind = match self.kind {
            Kind::Read => 0,
            Kind::Write => 1,
            Kind::Event => 2,
            Kind::Idle => 3,
        };
        r[0] = kind | (self.window << 2);
        r[1] = self.size.wrapping_sub(1) % 8;
        r[2..4].copy_from_slice(&self.offset.to_le_bytes());
        r[4..8].copy_from_slice(&self.advance.to_le_bytes());
        r[8..16].copy_from_slice(&self.value.to_le_bytes());
        r[16..24].copy_from_slice(&self.aux.to_le_bytes());
        r
    }

    /// The time advance in ticks: mantissa << shift, saturating.
    pub fn advance_ticks(&self) -> Tick {
        let mantissa = u128::from(self.advance & 0x00ff_ffff);
        let shift = self.advance >> 24;
        if mantissa == 0 {
            return 0;
        }
        if shift >= 64 {
            return Tick::MAX;
        }
        (mantissa << shift).min(u128::from(Tick::MAX)) as Tick
    }
}

/// The advance field for `ticks` (rounded down to 24 significant bits).
pub fn encode_advance(ticks: Tick) -> u32 {
    let mut shift = 0u32;
    let mut m = ticks;
    while m > 0x00ff_ffff {
        m >>= 1;
        shift += 1;
    }
    (shift << 24) | m as u32
}

/// A decoded script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub param: u64,
    pub ops: Vec<Op>,
}

impl Script {
    /// Decodes `data` (any bytes are a script; a short header reads as zeros).
    pub fn decode(data: &[u8]) -> Script {
        let mut h = [0u8; HEADER];
        let n = data.len().min(HEADER);
        h[..n].copy_from_slice(&data[..n]);
        let ops = data
            .get(HEADER..)
            .unwrap_or(&[])
            .chunks_exact(RECORD)
            .map(|c| {
                let mut r = [0u8; RECORD];
                r.copy_from_slice(c);
                Op::decode(&r)
            })
            .collect();
        Script {
            param: u64::from_le_bytes(h),
            ops,
        }
    }

    /// The bytes of this script.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.param.to_le_bytes().to_vec();
        for op in &self.ops {
            v.extend_from_slice(&op.encode());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let op = Op {
            kind: Kind::Event,
            window: 5,
            size: 8,
            offset: 0x1234,
            advance: encode_advance(1_000_000),
            value: 0x0102_0304_0506_0708,
            aux: u64::MAX,
        };
        let s = Script {
            param: 42,
            ops: vec![
                op,
                Op {
                    kind: Kind::Read,
                    size: 1,
                    ..op
                },
            ],
        };
        assert_eq!(Script::decode(&s.encode()), s);
        assert_eq!(op.advance_ticks(), 1_000_000);
        assert_eq!(
            Op {
                advance: encode_advance(u64::MAX),
                ..op
            }
            .advance_ticks(),
            !((1u64 << 40) - 1)
        );
        assert_eq!(
            Op {
                advance: 0xff00_0001,
                ..op
            }
            .advance_ticks(),
            u64::MAX
        );
    }

    #[test]
    fn short_inputs_decode() {
        assert_eq!(
            Script::decode(&[]),
            Script {
                param: 0,
                ops: vec![]
            }
        );
        assert_eq!(Script::decode(&[1, 2]).param, 0x0201);
        assert_eq!(Script::decode(&[0; HEADER + RECORD + 5]).ops.len(), 1);
    }
}
