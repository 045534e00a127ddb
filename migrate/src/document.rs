//! A Redis value seen as a schema document: a string holding a JSON object, or a hash whose
//! fields are the schema's fields. Transforms work on the JSON object either way; writing
//! back keeps the Redis type the value had.
//!
//! # Knowing a value's version
//!
//! A document the tool has written carries its schema version in a marker field,
//! [`VERSION_FIELD`] (`"_schemaVersion": "3.0.0"`), so a later run knows exactly where it
//! stands and never applies a step twice. Values written by the application (before the
//! registry existed, or by code that does not know about the marker) carry nothing; their
//! version is found by validation: the schemas of the key pattern the value satisfies, and
//! among them the one that declares the most of its fields (fewest unknown ones). A value
//! that fits two versions equally well is taken to be at the version recorded in Redis as
//! the pattern's current one (`twincache-migrate:current`, written when a transform run
//! finishes cleanly), else at the target version if that is one of them (which leaves it
//! alone: doing nothing is the safe mistake), and otherwise it is reported as ambiguous and
//! left alone. See [`crate::registry::Registry::detect`].

use serde_json::{Map, Value};

/// The field that records a document's schema version once the tool has written it.
pub const VERSION_FIELD: &str = "_schemaVersion";

/// How the document is stored in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A string holding a JSON object.
    Json,
    /// A hash; each field's value is a string (numbers, booleans and nested values are
    /// stored as their JSON text).
    Hash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub storage: Storage,
    pub body: Map<String, Value>,
}

impl Document {
    /// A string value; it must hold a JSON object.
    pub fn from_json(bytes: &[u8]) -> Result<Document, String> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(body)) => Ok(Document {
                storage: Storage::Json,
                body,
            }),
            Ok(_) => Err("the value is JSON but not an object".into()),
            Err(e) => Err(format!("the value is not JSON: {e}")),
        }
    }

    /// A hash value, as field/value pairs; fields and values must be UTF-8.
    pub fn from_hash<'a>(
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Document, String> {
        let mut body = Map::new();
        for (f, v) in pairs {
            let f =
                std::str::from_utf8(f).map_err(|_| "a hash field name is not UTF-8".to_string())?;
            let v = std::str::from_utf8(v).map_err(|_| format!("hash field `{f}` is not UTF-8"))?;
            body.insert(f.to_string(), Value::String(v.to_string()));
        }
        Ok(Document {
            storage: Storage::Hash,
            body,
        })
    }

    /// The version marker, if the value has one.
    pub fn marker(&self) -> Option<&str> {
        self.body.get(VERSION_FIELD).and_then(Value::as_str)
    }

    pub fn set_marker(&mut self, version: &str) {
        self.body.insert(
            VERSION_FIELD.to_string(),
            Value::String(version.to_string()),
        );
    }

    /// The string value to store (for [`Storage::Json`]).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a map of JSON values cannot fail (keys are strings).
        serde_json::to_vec(&self.body).unwrap_or_default()
    }

    /// The Redis type to store the document as, and the items to write: the JSON text of a
    /// string, or a hash's field/value pairs.
    pub fn redis_items(&self) -> (&'static str, Vec<Vec<u8>>) {
        match self.storage {
            Storage::Json => ("string", vec![self.to_json()]),
            Storage::Hash => (
                "hash",
                self.to_hash()
                    .into_iter()
                    .flat_map(|(f, v)| [f.into_bytes(), v])
                    .collect(),
            ),
        }
    }

    /// The hash fields to store (for [`Storage::Hash`]).
    pub fn to_hash(&self) -> Vec<(String, Vec<u8>)> {
        self.body
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone().into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_only() {
        assert!(Document::from_json(br#"{"a":1}"#).is_ok());
        assert!(Document::from_json(b"[1]")
            .unwrap_err()
            .contains("not an object"));
        assert!(Document::from_json(b"\xff")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn keeps_field_order_and_marks_versions() {
        let mut d = Document::from_json(br#"{"z":1,"a":"x"}"#).unwrap();
        assert_eq!(d.marker(), None);
        d.set_marker("2.0.0");
        assert_eq!(
            String::from_utf8(d.to_json()).unwrap(),
            r#"{"z":1,"a":"x","_schemaVersion":"2.0.0"}"#
        );
    }

    #[test]
    fn hashes_store_text() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"n", b"x"), (b"age", b"4")];
        let mut d = Document::from_hash(pairs.into_iter()).unwrap();
        d.body.insert("tags".into(), serde_json::json!(["a"]));
        let out = d.to_hash();
        assert_eq!(out[2], ("tags".to_string(), br#"["a"]"#.to_vec()));
        let bad: Vec<(&[u8], &[u8])> = vec![(b"n", b"\xff")];
        assert!(Document::from_hash(bad.into_iter()).is_err());
    }
}
