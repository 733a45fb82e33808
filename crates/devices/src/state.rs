//! Helpers for the devices' saved state (checkpoints).
//!
//! Each device module owns one `#[derive(Serialize, Deserialize)]` struct
//! with `#[serde(deny_unknown_fields)]`: its whole state, converted to and
//! from a [`SavedState`] here. A restore parses the struct (a wrong type,
//! a missing or unknown field, a truncated array is an error naming the
//! field's path), validates every value against the device's invariants,
//! and only then assigns, so that a refused state leaves the device as it
//! was.

use mem::{RestoreError, SavedState};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `state` as a [`SavedState`]. The devices' state structs hold only
/// numbers, booleans, strings, options, sequences and structs, which
/// always convert; should one ever fail, the state is null, which the
/// device's restore refuses (naming the device), rather than a panic.
pub(crate) fn save<T: Serialize>(state: &T) -> SavedState {
    serde_json::to_value(state).unwrap_or_else(|e| {
        tracing::error!("a device state did not serialize: {e}");
        SavedState::Null
    })
}

/// Parses `state` into `T`; the error names the path of the bad field.
pub(crate) fn parse<T: DeserializeOwned>(state: &SavedState) -> Result<T, RestoreError> {
    serde_path_to_error::deserialize(state).map_err(|e| {
        let path = e.path().to_string();
        RestoreError(format!("{path}: {}", e.into_inner()))
    })
}

/// `Ok` if `ok`, else an error naming `field` and what is wrong.
pub(crate) fn check(
    ok: bool,
    field: &str,
    what: impl std::fmt::Display,
) -> Result<(), RestoreError> {
    if ok {
        Ok(())
    } else {
        Err(RestoreError(format!("{field}: {what}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mem::BusDevice;

    /// Saves `dev`, sends the state through a JSON string (as a
    /// checkpoint file holds it) and restores it into `fresh`.
    pub fn round_trip(dev: &dyn BusDevice, fresh: &mut dyn BusDevice) {
        let text = serde_json::to_string(&dev.save()).unwrap();
        let back: SavedState = serde_json::from_str(&text).unwrap();
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), dev.save(), "restored state saves the same");
    }

    /// Restoring `state` into `dev` fails with an error containing
    /// `needle`, and leaves `dev` as it was.
    pub fn refused(dev: &mut dyn BusDevice, state: SavedState, needle: &str) {
        let before = dev.save();
        let err = dev.restore(&state).expect_err("a bad state is refused");
        assert!(err.0.contains(needle), "{err} (wanted {needle:?})");
        assert_eq!(dev.save(), before, "a refused state changes nothing");
    }

    /// Restoring `dev`'s saved state with `path` set to `value` fails
    /// with an error containing `needle` and changes nothing.
    pub fn refused_edit(dev: &mut dyn BusDevice, path: &[&str], value: SavedState, needle: &str) {
        let state = edited(dev, path, value);
        refused(dev, state, needle);
    }

    /// `dev`'s saved state with `path` (object keys, or array indices as
    /// numbers) replaced by `value`.
    pub fn edited(dev: &dyn BusDevice, path: &[&str], value: SavedState) -> SavedState {
        let mut s = dev.save();
        let mut at = &mut s;
        for p in path {
            at = match p.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*p],
            };
        }
        *at = value;
        s
    }

    /// Hostile shapes every device must refuse: not an object, and an
    /// object with a field no device has.
    pub fn refuses_garbage(dev: &mut dyn BusDevice) {
        refused(dev, serde_json::json!("text"), "");
        refused(dev, serde_json::json!([1, 2, 3]), "");
        let mut s = dev.save();
        if let Some(o) = s.as_object_mut() {
            o.insert("no_such_field".into(), serde_json::json!(1));
            refused(dev, s, "no_such_field");
        }
    }

    #[test]
    fn errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            a: u8,
            b: [u32; 2],
        }
        let e = parse::<S>(&serde_json::json!({"a": 300, "b": [1, 2]})).unwrap_err();
        assert!(e.0.starts_with("a:"), "{e}");
        let e = parse::<S>(&serde_json::json!({"a": 1, "b": [1]})).unwrap_err();
        assert!(e.0.starts_with("b:"), "{e}");
        let e = parse::<S>(&serde_json::json!({"a": 1, "b": [1, "x"]})).unwrap_err();
        assert!(e.0.starts_with("b[1]:"), "{e}");
        let e = parse::<S>(&serde_json::json!({"a": 1, "b": [1, 2], "c": 0})).unwrap_err();
        assert!(e.0.contains('c'), "{e}");
        assert_eq!(
            check(false, "x.y", "too big").unwrap_err().0,
            "x.y: too big"
        );
    }
}
