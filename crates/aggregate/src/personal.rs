//! Personal data an application marks for crypto-shredding.
//!
//! An aggregate lists, per event type, which fields of the event's data
//! (JSON pointers) are personal and whose data they are: the *data
//! subject*, e.g. the user. The runtime encrypts those fields with that
//! subject's own key before the event is stored; forgetting the subject
//! (`jetsource forget <subject>`) destroys the key, and from then on every
//! reader sees the fields as JSON `null`, never as ciphertext. The rest of
//! the event, and the history, stay as they were.
//!
//! A field the domain reads back must accept `null`: [`erased_text`] reads
//! a personal string as [`ERASED`] once it is gone.

use serde::{Deserialize, Deserializer};

/// The personal fields of one event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonalData {
    pub event_type: &'static str,
    /// Whose data the fields are.
    pub subject: Subject,
    /// JSON pointers into the event's data, e.g. `/name`, `/address/street`.
    /// A pointer the event does not have (or that is `null`) is skipped.
    pub fields: &'static [&'static str],
}

/// Who the data subject of an event is: a name of 1 to 64 characters
/// `A-Z a-z 0-9 _ -` (it names the key, in a header and a key-value key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// `<prefix><aggregate id>`, e.g. `user-` and user `u1`: `user-u1`.
    AggregateId { prefix: &'static str },
    /// The string at this JSON pointer of the event's data (stored in the
    /// clear, like the header that repeats it).
    Field(&'static str),
}

/// What a personal string reads as after its subject was forgotten.
pub const ERASED: &str = "[erased]";

/// Deserializes a personal string field: the string, or [`ERASED`] for the
/// `null` a forgotten subject's field reads as. Use as
/// `#[serde(deserialize_with = "erased_text")]`.
pub fn erased_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_else(|| ERASED.to_owned()))
}

/// The fields of one event that are to be sealed, and for whom: what the
/// runtime stores in the event's `Jetsource-Data-Subject` and
/// `Jetsource-Sealed` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealing {
    pub subject: String,
    pub fields: Vec<String>,
}

impl PersonalData {
    /// The subject and fields of an event of this type with `data`, for an
    /// aggregate `aggregate_id`; `None` when no marked field is there. An
    /// event with personal fields but no subject is an error (its data
    /// would otherwise be stored in the clear): the subject's field as
    /// the error.
    pub fn sealing(
        &self,
        aggregate_id: &str,
        data: &serde_json::Value,
    ) -> Result<Option<Sealing>, String> {
        let fields: Vec<String> = self
            .fields
            .iter()
            .filter(|p| data.pointer(p).is_some_and(|v| !v.is_null()))
            .map(|p| (*p).to_owned())
            .collect();
        if fields.is_empty() {
            return Ok(None);
        }
        let subject = match self.subject {
            Subject::AggregateId { prefix } => format!("{prefix}{aggregate_id}"),
            Subject::Field(pointer) => match data.pointer(pointer).and_then(|v| v.as_str()) {
                Some(subject) => subject.to_owned(),
                None => return Err(format!("{} at {pointer} (no string)", self.event_type)),
            },
        };
        Ok(Some(Sealing { subject, fields }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const BY_FIELD: PersonalData = PersonalData {
        event_type: "Signed",
        subject: Subject::Field("/user"),
        fields: &["/name", "/address/street"],
    };

    #[test]
    fn present_fields_are_sealed_for_their_subject() {
        let data = json!({"user": "u-7", "name": "Ann", "address": {"street": null}});
        let sealing = BY_FIELD.sealing("x", &data).unwrap().unwrap();
        assert_eq!(sealing.subject, "u-7");
        assert_eq!(
            sealing.fields,
            ["/name"],
            "null and missing fields are skipped"
        );
        assert_eq!(
            BY_FIELD.sealing("x", &json!({"user": "u-7"})).unwrap(),
            None
        );
    }

    #[test]
    fn personal_data_without_a_subject_is_an_error_not_plaintext() {
        for data in [json!({"name": "Ann"}), json!({"user": 42, "name": "Ann"})] {
            assert!(BY_FIELD.sealing("x", &data).is_err(), "{data}");
        }
    }
}
