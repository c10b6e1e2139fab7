//! Event schema evolution: upcasters turn an event stored under an older
//! schema version into the shape the current code reads.
//!
//! Events are immutable, so a changed event shape is never migrated in the
//! store. Instead every reader (command loading, snapshots, projections,
//! their rebuilds, dead-letter replay, the CLI's history and temporal state)
//! passes stored data through the aggregate's upcasters before decoding it.
//!
//! Versions belong to the aggregate ([`crate::Aggregate::EVENT_SCHEMA_VERSION`]),
//! not to each event type: bumping it from 1 to 2 needs an upcaster only
//! for the event types whose data changed at 2. An event stored at version
//! `v` goes through the upcasters registered for its type at `v`, `v + 1`,
//! ... up to the current version; versions with no upcaster for its type
//! leave it as it is.

use std::borrow::Cow;

use serde_json::Value;

/// One step: the data of `event_type` at `from_version`, rewritten into its
/// shape at `from_version + 1`. A pure function: no clock, no I/O, the same
/// output for the same input on every reader, forever.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u32,
    pub upcast: fn(Value) -> Result<Value, String>,
}

impl Upcaster {
    pub const fn new(
        event_type: &'static str,
        from_version: u32,
        upcast: fn(Value) -> Result<Value, String>,
    ) -> Self {
        Self {
            event_type,
            from_version,
            upcast,
        }
    }
}

/// Checks an aggregate's upcasters once, at registration: each step starts
/// below the current version and no step is declared twice. Panics, like a
/// duplicate aggregate type: a programming error that must not reach
/// production.
pub(crate) fn check(aggregate_type: &str, current: u32, upcasters: &[Upcaster]) {
    for (i, u) in upcasters.iter().enumerate() {
        assert!(
            u.from_version >= 1 && u.from_version < current,
            "{aggregate_type}: upcaster of {} from version {} must start at 1..{current} (EVENT_SCHEMA_VERSION is {current})",
            u.event_type,
            u.from_version,
        );
        assert!(
            !upcasters[..i]
                .iter()
                .any(|o| o.event_type == u.event_type && o.from_version == u.from_version),
            "{aggregate_type}: two upcasters of {} from version {}",
            u.event_type,
            u.from_version,
        );
    }
}

/// `data` of `event_type` stored at `stored` in the shape of `current`.
/// Borrows when nothing applies, so current events cost nothing.
pub(crate) fn upcast<'a>(
    upcasters: &[Upcaster],
    current: u32,
    event_type: &str,
    stored: u32,
    data: &'a [u8],
) -> Result<Cow<'a, [u8]>, String> {
    if stored >= current
        || !upcasters
            .iter()
            .any(|u| u.event_type == event_type && u.from_version >= stored)
    {
        return Ok(Cow::Borrowed(data));
    }
    let mut value: Value = if data.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(data).map_err(|e| format!("data is not JSON: {e}"))?
    };
    for version in stored..current {
        if let Some(u) = upcasters
            .iter()
            .find(|u| u.event_type == event_type && u.from_version == version)
        {
            value = (u.upcast)(value)
                .map_err(|e| format!("upcast from version {version} failed: {e}"))?;
        }
    }
    serde_json::to_vec(&value)
        .map(Cow::Owned)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rename_qty(mut v: Value) -> Result<Value, String> {
        let q = v.get("qty").cloned().ok_or_else(|| "no qty".to_string())?;
        v["quantity"] = q;
        v.as_object_mut().map(|m| m.remove("qty"));
        Ok(v)
    }

    fn add_unit(mut v: Value) -> Result<Value, String> {
        v["unit"] = json!("piece");
        Ok(v)
    }

    const CHAIN: &[Upcaster] = &[
        Upcaster::new("Added", 1, rename_qty),
        Upcaster::new("Added", 2, add_unit),
    ];

    fn up(stored: u32, data: &str) -> Result<Value, String> {
        let out = upcast(CHAIN, 3, "Added", stored, data.as_bytes())?;
        Ok(serde_json::from_slice(&out).unwrap_or(Value::Null))
    }

    #[test]
    fn each_step_from_the_stored_version_applies_in_order() {
        assert_eq!(
            up(1, r#"{"qty":2}"#),
            Ok(json!({"quantity": 2, "unit": "piece"}))
        );
        assert_eq!(
            up(2, r#"{"quantity":2}"#),
            Ok(json!({"quantity": 2, "unit": "piece"}))
        );
    }

    #[test]
    fn current_events_and_other_types_are_borrowed_untouched() {
        let data = br#"{"quantity":2,"unit":"kg"}"#;
        assert!(matches!(
            upcast(CHAIN, 3, "Added", 3, data),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            upcast(CHAIN, 3, "Removed", 1, data),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn a_failing_step_names_its_version() {
        let err = up(1, r#"{"quantity":2}"#).expect_err("must fail");
        assert!(err.contains("version 1") && err.contains("no qty"), "{err}");
        assert!(up(1, "not json")
            .expect_err("must fail")
            .contains("not JSON"));
    }

    #[test]
    #[should_panic(expected = "must start at")]
    fn a_step_at_the_current_version_is_refused() {
        check("item", 2, &[Upcaster::new("Added", 2, add_unit)]);
    }

    #[test]
    #[should_panic(expected = "two upcasters")]
    fn a_step_declared_twice_is_refused() {
        check(
            "item",
            3,
            &[
                Upcaster::new("Added", 1, add_unit),
                Upcaster::new("Added", 1, rename_qty),
            ],
        );
    }
}
