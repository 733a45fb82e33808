//! Device models. Every device implements [`mem::BusDevice`]; it sees the
//! current tick and the requests list of its [`mem::AccessCtx`], never KVM,
//! so each is unit-tested with a fake clock and no VM at all. Every device is
//! written for a hostile guest: any offset, any size, any value.

pub mod disk;
pub mod i8042;
pub mod intc;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod mailbox;
pub mod pic;
pub mod pit;
pub mod qemu;
pub mod rtc;
pub mod simops;
pub(crate) mod state;
pub mod timer;
pub mod uart;
pub mod virtio;

pub use intc::VectorIntc;
pub use mailbox::Mailbox;
pub use simops::SimOps;
pub use timer::IntervalTimer;
pub use uart::Uart16550;

/// Reads up to 8 bytes of `data` as a little-endian value.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Writes `value` little-endian into `data` (bytes beyond 8 are zero).
pub(crate) fn put_le_value(data: &mut [u8], value: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 8 { (value >> (8 * i)) as u8 } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn le_helpers() {
        assert_eq!(super::le_value(&[0x34, 0x12]), 0x1234);
        let mut d = [0u8; 10];
        super::put_le_value(&mut d, 0x0807_0605_0403_0201);
        assert_eq!(d, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]);
    }
}
