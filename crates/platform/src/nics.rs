//! NICs: virtio-mmio network devices on the PC platform, one per end of an
//! Ethernet `[[link]]` in the system.
//!
//! NIC `k` takes the virtio slot after the disks: register window at
//! [`crate::disks::VIRTIO_MMIO_BASE`] + (disks + `k`) * 4 KiB, interrupt on
//! I/O APIC pin 16 + disks + `k`, a `LNRO0005` device in the DSDT (see
//! [`crate::disks::layout`], which counts both). Its statistics are under
//! `{system}.nic{k}`.

use std::sync::{Arc, Mutex};

use devices::ioapic::IoApic;
use devices::virtio::net::{Net, Wire};
use devices::virtio::VirtioMmio;
use mem::{GuestRam, IoBus, TimedHandle};
use sim::{Stats, Tick};

use crate::PlatformError;

/// A NIC as the system holds it.
pub type NicHandle = Arc<Mutex<VirtioMmio<Net>>>;

/// One Ethernet end of a system: its link port, address and wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicEnd {
    pub mac: [u8; 6],
    pub latency: Tick,
    pub bandwidth: u64,
}

/// Puts a NIC for each of `nics` (with its link port) on `bus` after
/// `disks` disks, interrupting through `ioapic`; returns them with their
/// ports.
#[allow(clippy::too_many_arguments)]
pub fn attach(
    name: &str,
    disks: usize,
    nics: &[(u32, NicEnd)],
    ram: &GuestRam,
    ioapic: &Arc<Mutex<IoApic>>,
    bus: &mut IoBus,
    stats: &mut Stats,
    timed: &mut Vec<TimedHandle>,
) -> Result<Vec<(u32, NicHandle)>, PlatformError> {
    let slots = crate::disks::layout(disks + nics.len());
    let mut board = crate::disks::VirtioBoard {
        ram,
        ioapic,
        bus,
        stats,
        timed,
    };
    let mut out = Vec::new();
    for (k, ((port, end), at)) in nics.iter().zip(&slots[disks..]).enumerate() {
        let prefix = format!("{name}.nic{k}");
        let net = Net::new(
            end.mac,
            Some(Wire {
                latency: end.latency,
                bandwidth: end.bandwidth,
            }),
            board.stats,
            &prefix,
        )?;
        let dev = board.attach(net, *at, &format!("nic{k}"), &prefix)?;
        out.push((*port, dev));
    }
    Ok(out)
}

/// A frame in a saved event queue (a checkpoint): a hex string.
pub(crate) mod frame_hex {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(frame: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        let hex = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("a frame is a hex string, not {hex:?}"));
        if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
            return Err(bad());
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, _>>()
            .map(Arc::from)
    }
}
