//! What a run reports when it ends: the process status and exit.json.
//! Shared by a single system and a simulation of several.

use sim::ExitEvent;

use crate::output::OutDir;
use crate::{exit_status, PlatformError};

/// The process status of a run whose systems ended with `exits`: that of
/// the first system to fail (earliest tick, then lowest index), and which
/// system that was; 0 and `None` if none failed.
pub fn status(exits: &[ExitEvent]) -> (i32, Option<usize>) {
    exits
        .iter()
        .enumerate()
        .map(|(i, e)| (exit_status(e.cause, e.code), e.tick, i))
        .filter(|(s, ..)| *s != 0)
        .min_by_key(|&(_, t, i)| (t, i))
        .map_or((0, None), |(s, _, i)| (s, Some(i)))
}

/// Writes exit.json: the deciding exit's fields at the top, every system's
/// exit in `systems`.
pub fn write_exit_json(
    out: &OutDir,
    exits: &[(String, ExitEvent)],
    status: i32,
) -> Result<(), PlatformError> {
    let each = |(name, e): &(String, ExitEvent)| {
        serde_json::json!({
            "system": name,
            "cause": e.cause,
            "code": e.code,
            "tick": e.tick,
            "sim_seconds": sim::tick::ticks_to_seconds(e.tick),
            "status": exit_status(e.cause, e.code),
            "message": e.message,
        })
    };
    let (_, deciding) = self::status(&exits.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>());
    let top = &exits[deciding.unwrap_or(0)];
    let mut v = each(top);
    v["status"] = serde_json::json!(status);
    v["systems"] = serde_json::Value::Array(exits.iter().map(each).collect());
    out.write_json("exit.json", &v)?;
    Ok(())
}
