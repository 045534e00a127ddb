//! Schema files (seed 003's format), validation of a document against one, and the
//! difference between two versions with each change classified as breaking or not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::document::VERSION_FIELD;

/// One schema version: `{"version": "1.0.0", "keyPattern": "user:*", "fields": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SchemaFile {
    pub version: String,
    pub key_pattern: String,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A field: its type, whether it must be there, its default, and for objects and arrays
/// what they hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// For `object`: its own fields, validated the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, FieldSpec>>,
    /// For `array`: what each item is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Box<FieldSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The types of seed 003. `hash` is a flat map of scalar values: what a Redis hash holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Boolean,
    Object,
    Array,
    Hash,
}

impl FieldType {
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
            FieldType::Hash => "hash",
        }
    }
}

/// Whether `v` is of type `kind`. `lenient` is for values read from a Redis hash, where every
/// value is a string: a number field then accepts `"42"`, an object field a JSON text.
fn type_matches(kind: FieldType, v: &Value, lenient: bool) -> Option<Value> {
    let ok = match (kind, v) {
        (FieldType::String, Value::String(_)) => true,
        (FieldType::Number, Value::Number(_)) => true,
        (FieldType::Boolean, Value::Bool(_)) => true,
        (FieldType::Object, Value::Object(_)) => true,
        (FieldType::Array, Value::Array(_)) => true,
        (FieldType::Hash, Value::Object(m)) => m.values().all(|x| !x.is_object() && !x.is_array()),
        (_, Value::String(s)) if lenient => {
            let parsed: Option<Value> = match kind {
                FieldType::Number => s
                    .parse::<f64>()
                    .ok()
                    .and_then(|_| serde_json::from_str(s).ok()),
                FieldType::Boolean => {
                    matches!(s.as_str(), "true" | "false").then(|| Value::Bool(s == "true"))
                }
                _ => serde_json::from_str(s).ok(),
            };
            return parsed.and_then(|p| type_matches(kind, &p, false).map(|_| p));
        }
        _ => false,
    };
    ok.then(|| v.clone())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `body` against `fields`; the first problems found, joined, if any.
pub fn validate(
    fields: &BTreeMap<String, FieldSpec>,
    body: &Map<String, Value>,
    lenient: bool,
) -> Result<(), String> {
    let mut problems = Vec::new();
    check_fields(fields, body, lenient, "", &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        problems.truncate(3);
        Err(problems.join("; "))
    }
}

fn check_fields(
    fields: &BTreeMap<String, FieldSpec>,
    body: &Map<String, Value>,
    lenient: bool,
    prefix: &str,
    out: &mut Vec<String>,
) {
    for (name, spec) in fields {
        let path = format!("{prefix}{name}");
        match body.get(name) {
            None | Some(Value::Null) => {
                if spec.required {
                    out.push(format!("missing required field `{path}`"));
                }
            }
            Some(v) => check_value(spec, v, lenient, &path, out),
        }
    }
}

fn check_value(spec: &FieldSpec, v: &Value, lenient: bool, path: &str, out: &mut Vec<String>) {
    let Some(v) = type_matches(spec.kind, v, lenient) else {
        out.push(format!(
            "`{path}` is {} where the schema says {}",
            kind_of(v),
            spec.kind.name()
        ));
        return;
    };
    match (&v, &spec.fields, &spec.items) {
        (Value::Object(m), Some(fields), _) => {
            check_fields(fields, m, false, &format!("{path}."), out)
        }
        (Value::Array(items), _, Some(item)) => {
            for (i, x) in items.iter().enumerate() {
                check_value(item, x, false, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// How many fields of `body` the schema does not declare (the version marker aside), nested
/// objects with declared fields included: the measure of how well a value fits a version.
pub fn unknown_fields(fields: &BTreeMap<String, FieldSpec>, body: &Map<String, Value>) -> usize {
    body.iter()
        .filter(|(k, _)| k.as_str() != VERSION_FIELD)
        .map(|(k, v)| match (fields.get(k), v) {
            (None, _) => 1,
            (
                Some(FieldSpec {
                    fields: Some(inner),
                    ..
                }),
                Value::Object(m),
            ) => unknown_fields(inner, m),
            _ => 0,
        })
        .sum()
}

/// One difference between two schema versions.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub path: String,
    pub what: String,
    pub breaking: bool,
}

/// Every difference from `from` to `to`. Breaking: a removed field, a changed type, a new
/// required field without a default, an optional field made required without a default, a
/// changed key pattern. Not breaking: a new optional field (or a required one with a
/// default), a required field made optional, a changed default.
pub fn diff(from: &SchemaFile, to: &SchemaFile) -> Vec<Change> {
    let mut out = Vec::new();
    if from.key_pattern != to.key_pattern {
        out.push(Change {
            path: "keyPattern".into(),
            what: format!(
                "key pattern changed from `{}` to `{}`",
                from.key_pattern, to.key_pattern
            ),
            breaking: true,
        });
    }
    diff_fields(&from.fields, &to.fields, "", &mut out);
    out
}

fn diff_fields(
    a: &BTreeMap<String, FieldSpec>,
    b: &BTreeMap<String, FieldSpec>,
    prefix: &str,
    out: &mut Vec<Change>,
) {
    for (name, old) in a {
        let path = format!("{prefix}{name}");
        match b.get(name) {
            None => out.push(Change {
                what: format!("removed field `{path}` ({})", old.kind.name()),
                path,
                breaking: true,
            }),
            Some(new) => diff_field(old, new, &path, out),
        }
    }
    for (name, new) in b {
        if a.contains_key(name) {
            continue;
        }
        let path = format!("{prefix}{name}");
        let (what, breaking) = match (new.required, &new.default) {
            (true, None) => ("new required field without a default", true),
            (true, Some(_)) => ("new required field with a default", false),
            (false, _) => ("new optional field", false),
        };
        out.push(Change {
            what: format!("{what}: `{path}` ({})", new.kind.name()),
            path,
            breaking,
        });
    }
}

fn diff_field(old: &FieldSpec, new: &FieldSpec, path: &str, out: &mut Vec<Change>) {
    let mut change = |what: String, breaking: bool| {
        out.push(Change {
            path: path.to_string(),
            what,
            breaking,
        })
    };
    if old.kind != new.kind {
        change(
            format!(
                "`{path}` changed type from {} to {}",
                old.kind.name(),
                new.kind.name()
            ),
            true,
        );
        return;
    }
    match (old.required, new.required) {
        (false, true) => change(
            format!(
                "`{path}` became required{}",
                if new.default.is_some() {
                    " (with a default)"
                } else {
                    ""
                }
            ),
            new.default.is_none(),
        ),
        (true, false) => change(format!("`{path}` became optional"), false),
        _ => {}
    }
    if old.default != new.default {
        change(format!("`{path}` default changed"), false);
    }
    let empty = BTreeMap::new();
    if old.fields.is_some() || new.fields.is_some() {
        let a = old.fields.as_ref().unwrap_or(&empty);
        let b = new.fields.as_ref().unwrap_or(&empty);
        diff_fields(a, b, &format!("{path}."), out);
    }
    if let (Some(a), Some(b)) = (&old.items, &new.items) {
        diff_field(a, b, &format!("{path}[]"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> SchemaFile {
        serde_json::from_value(v).unwrap()
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn validates_types_required_and_nesting() {
        let s = schema(
            json!({"version": "1.0.0", "keyPattern": "user:*", "fields": {
                "name": {"type": "string", "required": true},
                "age": {"type": "number"},
                "prefs": {"type": "hash"},
                "address": {"type": "object", "fields": {"city": {"type": "string", "required": true}}},
                "tags": {"type": "array", "items": {"type": "string"}}
            }}),
        );
        assert!(validate(
            &s.fields,
            &body(json!({"name": "a", "age": 3, "prefs": {"x": "1"}})),
            false
        )
        .is_ok());
        let e = validate(&s.fields, &body(json!({"age": "3"})), false).unwrap_err();
        assert!(
            e.contains("missing required field `name`") && e.contains("`age` is string"),
            "{e}"
        );
        let e = validate(&s.fields, &body(json!({"name": "a", "address": {}})), false).unwrap_err();
        assert!(e.contains("`address.city`"), "{e}");
        let e = validate(
            &s.fields,
            &body(json!({"name": "a", "tags": ["x", 1]})),
            false,
        )
        .unwrap_err();
        assert!(e.contains("`tags[1]`"), "{e}");
        assert!(validate(
            &s.fields,
            &body(json!({"name": "a", "prefs": {"x": {}}})),
            false
        )
        .is_err());
        // Hash storage: every value is text.
        assert!(validate(&s.fields, &body(json!({"name": "a", "age": "3"})), true).is_ok());
        assert!(validate(&s.fields, &body(json!({"name": "a", "age": "x"})), true).is_err());
    }

    #[test]
    fn counts_unknown_fields_but_not_the_marker() {
        let s = schema(
            json!({"version": "1.0.0", "keyPattern": "u:*", "fields": {"a": {"type": "string"}}}),
        );
        assert_eq!(
            unknown_fields(
                &s.fields,
                &body(json!({"a": "x", "b": 1, "_schemaVersion": "1.0.0"}))
            ),
            1
        );
    }

    #[test]
    fn classifies_changes() {
        let a = schema(json!({"version": "1.0.0", "keyPattern": "u:*", "fields": {
            "gone": {"type": "string"}, "age": {"type": "number"}, "nick": {"type": "string", "required": true},
            "address": {"type": "object", "fields": {"zip": {"type": "string"}}}}}));
        let b = schema(json!({"version": "2.0.0", "keyPattern": "u:*", "fields": {
            "age": {"type": "string"}, "nick": {"type": "string"},
            "opt": {"type": "string"}, "req": {"type": "string", "required": true},
            "dflt": {"type": "string", "required": true, "default": "x"},
            "address": {"type": "object", "fields": {"zip": {"type": "number"}}}}}));
        let changes = diff(&a, &b);
        let find = |p: &str| {
            changes
                .iter()
                .find(|c| c.path == p)
                .unwrap_or_else(|| panic!("{p}: {changes:?}"))
        };
        assert!(find("gone").breaking);
        assert!(find("age").breaking);
        assert!(!find("nick").breaking);
        assert!(!find("opt").breaking);
        assert!(find("req").breaking);
        assert!(!find("dflt").breaking);
        assert!(find("address.zip").breaking);
        assert_eq!(changes.len(), 7);
    }

    #[test]
    fn rejects_unknown_types_and_keys() {
        let r: Result<SchemaFile, _> = serde_json::from_value(
            json!({"version": "1.0.0", "keyPattern": "u:*", "fields": {"a": {"type": "date"}}}),
        );
        assert!(r.is_err());
        let r: Result<SchemaFile, _> = serde_json::from_value(
            json!({"version": "1.0.0", "keyPattern": "u:*", "fields": {"a": {"type": "string", "requird": true}}}),
        );
        assert!(r.is_err());
    }
}
