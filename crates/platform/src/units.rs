//! Quantities in config files: sizes, frequencies and durations, written as
//! numbers or as strings with units ("64MiB", "2.6GHz", "10ms").

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use sim::Tick;

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let num: String = s[..end].chars().filter(|&c| c != '_').collect();
    let v: f64 = num.parse().ok()?;
    v.is_finite().then_some((v, s[end..].trim()))
}

/// Parses a size in bytes: `4096`, `64KiB`, `64MiB`, `2GiB`, `64M`, `1G`
/// (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; KB/MB/GB are powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (v, unit) = split_number(s).ok_or_else(|| format!("{s:?} is not a size"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (use B, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = v * mult;
    if bytes.fract() != 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Parses a bandwidth in bytes per second: a size per second, `500MiB/s`,
/// `1GB/s` (the `/s` may be left out), or a bit rate, `1Gbit/s`, `100Mbps`
/// (powers of 1000, eight bits a byte). At least one byte per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    // Bit rates, as networks are given: 1Gbit/s, 100Mbps (powers of 1000).
    if let Some((v, unit)) = split_number(t) {
        let unit = unit.to_ascii_lowercase();
        let bits = match unit.trim_end_matches("/s").trim_end_matches("ps") {
            "bit" | "b" if unit.ends_with("bit/s") || unit == "bps" => Some(1.0),
            "kbit" | "kb" if unit.ends_with("bit/s") || unit == "kbps" => Some(1e3),
            "mbit" | "mb" if unit.ends_with("bit/s") || unit == "mbps" => Some(1e6),
            "gbit" | "gb" if unit.ends_with("bit/s") || unit == "gbps" => Some(1e9),
            "tbit" | "tb" if unit.ends_with("bit/s") || unit == "tbps" => Some(1e12),
            _ => None,
        };
        if let Some(m) = bits {
            let bytes = v * m / 8.0;
            if !(1.0..=1e18).contains(&bytes) {
                return Err(format!(
                    "{s:?}: a bandwidth must be between 8 bit/s and 8 Ebit/s"
                ));
            }
            return Ok(bytes as u64);
        }
    }
    let size = t.strip_suffix("/s").unwrap_or(t);
    let v =
        parse_size(size).map_err(|e| format!("{s:?} is not a bandwidth ({e}); e.g. 500MiB/s"))?;
    if v == 0 {
        return Err(format!("{s:?}: a bandwidth must be at least 1 B/s"));
    }
    Ok(v)
}

/// Parses a frequency in Hz: `2GHz`, `2.6 GHz`, `100MHz`, `32768Hz`, `1e9`.
pub fn parse_freq(s: &str) -> Result<f64, String> {
    let (v, unit) = split_number(s).ok_or_else(|| format!("{s:?} is not a frequency"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "hz" => 1.0,
        "khz" => 1e3,
        "mhz" => 1e6,
        "ghz" => 1e9,
        _ => {
            return Err(format!(
                "{s:?}: unknown frequency unit {unit:?} (use Hz, kHz, MHz, GHz)"
            ))
        }
    };
    let hz = v * mult;
    if hz <= 0.0 || hz.is_nan() {
        return Err(format!("{s:?}: a frequency must be positive"));
    }
    // A tick is a picosecond: a clock faster than 1 THz has no period.
    if hz > 1e12 {
        return Err(format!(
            "{s:?}: a frequency can be at most 1THz (simulated time counts picoseconds)"
        ));
    }
    Ok(hz)
}

/// Parses a simulated duration into ticks (picoseconds): `2h`, `5min`,
/// `10s`, `5ms`, `100us`, `20ns`, `1000ps`.
pub fn parse_duration(s: &str) -> Result<Tick, String> {
    let (v, unit) = split_number(s).ok_or_else(|| format!("{s:?} is not a duration"))?;
    let ps_per_unit = match unit {
        "h" => 3600e12,
        "min" => 60e12,
        "s" => 1e12,
        "ms" => 1e9,
        "us" | "µs" => 1e6,
        "ns" => 1e3,
        "ps" => 1.0,
        "" => {
            return Err(format!(
                "{s:?}: a duration needs a unit (h, min, s, ms, us, ns, ps)"
            ))
        }
        _ => {
            return Err(format!(
                "{s:?}: unknown time unit {unit:?} (use h, min, s, ms, us, ns, ps)"
            ))
        }
    };
    let t = v * ps_per_unit;
    if t > u64::MAX as f64 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(t.round() as Tick)
}

macro_rules! quantity {
    ($name:ident, $inner:ty, $parse:ident, $what:literal) => {
        #[doc = concat!("A ", $what, " from a config file.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(
                            f,
                            concat!("a ", $what, " (a number or a string with a unit)")
                        )
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$name, E> {
                        $parse(s).map($name).map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        $parse(&v.to_string()).map($name).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        $parse(&v.to_string()).map($name).map_err(E::custom)
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$name, E> {
                        $parse(&v.to_string()).map($name).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

quantity!(Size, u64, parse_size, "size in bytes");
quantity!(Frequency, f64, parse_freq, "frequency");
quantity!(Duration, Tick, parse_duration, "simulated duration");
quantity!(
    Bandwidth,
    u64,
    parse_bandwidth,
    "bandwidth in bytes per second"
);

/// Sizes, frequencies and bandwidths are written as plain numbers (bytes,
/// Hz, bytes per second), which read back as the same.
macro_rules! plain_number {
    ($($name:ident),*) => {$(
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }
    )*};
}
plain_number!(Size, Frequency, Bandwidth);

/// A duration is written in picoseconds with its unit ("5500000000ps"): a
/// bare number is not a duration (a config must say its unit), and
/// config.json and checkpoints read back as written.
impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        format!("{}ps", self.0).serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_are_bounded_by_the_tick() {
        assert_eq!(parse_freq("1THz").ok(), None);
        assert_eq!(parse_freq("1000GHz"), Ok(1e12));
        let huge = format!("1{}GHz", "0".repeat(308));
        let e = parse_freq(&huge).unwrap_err();
        assert!(e.contains("at most 1THz"), "{e}");
        assert!(parse_freq("1001GHz").is_err());
    }

    #[test]
    fn quantities_read_back_as_written() {
        let d = Duration(5_500_000_000);
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(j, "\"5500000000ps\"");
        assert_eq!(serde_json::from_str::<Duration>(&j).unwrap(), d);
        let s = Size(64 << 20);
        assert_eq!(
            serde_json::from_str::<Size>(&serde_json::to_string(&s).unwrap()).unwrap(),
            s
        );
        let f = Frequency(2.5e9);
        assert_eq!(
            serde_json::from_str::<Frequency>(&serde_json::to_string(&f).unwrap()).unwrap(),
            f
        );
        let b = Bandwidth(500 << 20);
        assert_eq!(
            serde_json::from_str::<Bandwidth>(&serde_json::to_string(&b).unwrap()).unwrap(),
            b
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 M"), Ok(64 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("12XB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0.5").is_err());
        assert!(parse_size("1e400").is_err());
    }

    #[test]
    fn frequencies() {
        assert_eq!(parse_freq("2GHz"), Ok(2e9));
        assert_eq!(parse_freq("2.6 ghz"), Ok(2.6e9));
        assert_eq!(parse_freq("1000"), Ok(1000.0));
        assert!(parse_freq("0Hz").is_err());
        assert!(parse_freq("3 parsecs").is_err());
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("500MiB/s"), Ok(500 << 20));
        assert_eq!(parse_bandwidth("1GB/s"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert!(parse_bandwidth("0/s").unwrap_err().contains("at least"));
        assert!(parse_bandwidth("fast").is_err());
        // Bit rates: powers of 1000, eight bits a byte.
        assert_eq!(parse_bandwidth("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("100Mbps"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("10 Gbps"), Ok(1_250_000_000));
        assert_eq!(parse_bandwidth("8bit/s"), Ok(1));
        assert!(parse_bandwidth("1bit/s").unwrap_err().contains("between"));
        assert!(parse_bandwidth("1e30Gbps").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(1_000_000_000_000));
        assert_eq!(parse_duration("2.5ms"), Ok(2_500_000_000));
        assert_eq!(parse_duration("100us"), Ok(100_000_000));
        assert_eq!(parse_duration("7ns"), Ok(7000));
        assert_eq!(parse_duration("3ps"), Ok(3));
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("1e30s").is_err());
        assert_eq!(parse_duration("2min"), Ok(120_000_000_000_000));
        assert_eq!(parse_duration("1.5h"), Ok(5_400_000_000_000_000));
        // "m" could be minutes or a typo for "ms": refused, with the units that exist.
        assert!(parse_duration("3m").unwrap_err().contains("min"));
        // 2^64 ps is about 213 days.
        assert!(parse_duration("5200h").unwrap_err().contains("too long"));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,20}") {
            let _ = parse_size(&s);
            let _ = parse_freq(&s);
            let _ = parse_duration(&s);
        }
    }
}
