//! The transform primitives of a migration step, each with its inverse where it has one.
//!
//! Fields are addressed by dotted paths (`address.city`), through nested objects. Every
//! primitive leaves a document alone where it has nothing to do (the field it reads is
//! absent), and fails rather than guess where the document is not what it expects (a rename
//! onto a field that exists, a split of a number): the caller reports the key and leaves its
//! value as it was.
//!
//! Inverses make the version graph walkable backwards without a backup (the *lens* idea of
//! Cambria): rename is undone by the opposite rename, add by remove, split by merge and back,
//! a conversion by the opposite one when the step names the type it converts from, a custom
//! script by its `inverse` script. A remove without a `defaultValue` to put back, or a
//! conversion without `from`, has no inverse.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::script::Script;

/// A transform as written in `migrations.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum TransformSpec {
    RenameField {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    AddField {
        field: String,
        #[serde(rename = "defaultValue")]
        default_value: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    RemoveField {
        field: String,
        /// What the reverse step puts back; without it the removal has no inverse.
        #[serde(
            rename = "defaultValue",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        default_value: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    SplitField {
        from: String,
        to: Vec<String>,
        #[serde(default = "space")]
        separator: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    MergeField {
        from: Vec<String>,
        to: String,
        #[serde(default = "space")]
        separator: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    ConvertType {
        field: String,
        to: Kind,
        /// The type converted from; without it the conversion has no inverse.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<Kind>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// A script in the embedded language (Rhai) for what the primitives cannot express.
    Custom {
        script: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inverse: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
}

fn space() -> String {
    " ".into()
}

/// Target types of `convertType`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    String,
    Number,
    Boolean,
    /// A JSON text parsed into its value (object or array), or a value turned into JSON text.
    Json,
}

/// Apply a transform only when a field has a value (the default), has none
/// (`"exists": false`), or equals / differs from a given value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_equals: Option<Value>,
}

impl Condition {
    pub fn holds(&self, body: &Map<String, Value>) -> bool {
        let v = get(body, &self.field);
        let has_value = matches!(v, Some(x) if !x.is_null() && x != &Value::String(String::new()));
        if let Some(want) = &self.equals {
            return v == Some(want);
        }
        if let Some(not) = &self.not_equals {
            return v != Some(not);
        }
        has_value == self.exists.unwrap_or(true)
    }
}

/// What a transform may read besides the document: the key, and the time of the run.
pub struct Context<'a> {
    pub key: &'a str,
    pub now_ms: u64,
}

/// A transform ready to run (its script compiled).
#[derive(Debug, Clone)]
pub struct Step {
    pub spec: TransformSpec,
    script: Option<Arc<Script>>,
}

impl Step {
    /// Compiles the step; `what` names it in errors. Bad placeholders and scripts that do
    /// not compile are errors here, at load time, not on the millionth key.
    pub fn new(spec: TransformSpec, what: &str) -> Result<Step, String> {
        let script = match &spec {
            TransformSpec::Custom { script, .. } => Some(Arc::new(
                Script::compile(script).map_err(|e| format!("{what}: {e}"))?,
            )),
            TransformSpec::AddField { default_value, .. } => {
                check_placeholders(default_value).map_err(|e| format!("{what}: {e}"))?;
                None
            }
            _ => None,
        };
        for path in touched(&spec)
            .into_iter()
            .chain(spec_condition(&spec).map(|c| c.field.as_str()))
        {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(format!("{what}: bad field path `{path}`"));
            }
        }
        if let TransformSpec::SplitField { to, separator, .. } = &spec {
            if to.is_empty() || separator.is_empty() {
                return Err(format!(
                    "{what}: splitField needs target fields and a non-empty separator"
                ));
            }
        }
        if let TransformSpec::MergeField { from, .. } = &spec {
            if from.is_empty() {
                return Err(format!("{what}: mergeField needs source fields"));
            }
        }
        Ok(Step { spec, script })
    }

    /// Runs the step on `body`.
    pub fn apply(&self, body: &mut Map<String, Value>, cx: &Context) -> Result<(), String> {
        if let Some(c) = spec_condition(&self.spec) {
            if !c.holds(body) {
                return Ok(());
            }
        }
        match &self.spec {
            TransformSpec::RenameField { from, to, .. } => {
                if get(body, from).is_none() {
                    return Ok(());
                }
                if get(body, to).is_some() {
                    return Err(format!("renameField: both `{from}` and `{to}` are present"));
                }
                let v = take(body, from).unwrap_or(Value::Null);
                set(body, to, v)
            }
            TransformSpec::AddField {
                field,
                default_value,
                ..
            } => {
                if get(body, field).is_some_and(|v| !v.is_null()) {
                    return Ok(());
                }
                set(body, field, resolve(default_value, cx))
            }
            TransformSpec::RemoveField { field, .. } => {
                take(body, field);
                Ok(())
            }
            TransformSpec::SplitField {
                from,
                to,
                separator,
                ..
            } => {
                let Some(v) = get(body, from) else {
                    return Ok(());
                };
                let Value::String(s) = v else {
                    return Err(format!("splitField: `{from}` is not a string"));
                };
                if let Some(t) = to.iter().find(|t| *t != from && get(body, t).is_some()) {
                    return Err(format!("splitField: `{t}` is already present"));
                }
                let parts: Vec<Value> = s
                    .splitn(to.len(), separator.as_str())
                    .map(|p| Value::String(p.to_string()))
                    .collect();
                take(body, from);
                for (field, part) in to.iter().zip(parts) {
                    set(body, field, part)?;
                }
                Ok(())
            }
            TransformSpec::MergeField {
                from,
                to,
                separator,
                ..
            } => {
                let present: Vec<String> = from
                    .iter()
                    .filter_map(|f| get(body, f))
                    .filter(|v| !v.is_null())
                    .map(text_of)
                    .collect();
                if present.is_empty() {
                    return Ok(());
                }
                if !from.contains(to) && get(body, to).is_some() {
                    return Err(format!("mergeField: `{to}` is already present"));
                }
                for f in from {
                    take(body, f);
                }
                set(body, to, Value::String(present.join(separator)))
            }
            TransformSpec::ConvertType { field, to, .. } => {
                let Some(v) = get(body, field) else {
                    return Ok(());
                };
                let converted =
                    convert(v, *to).map_err(|e| format!("convertType `{field}`: {e}"))?;
                set(body, field, converted)
            }
            TransformSpec::Custom { .. } => match &self.script {
                Some(script) => {
                    let out = script.run(body, cx)?;
                    *body = out;
                    Ok(())
                }
                None => Err("custom transform without a compiled script".into()),
            },
        }
    }

    /// The step that undoes this one, or why there is none.
    pub fn inverse(&self, what: &str) -> Result<Step, String> {
        let when = spec_condition(&self.spec).cloned();
        if let Some(c) = &when {
            if touched(&self.spec).iter().any(|f| overlaps(f, &c.field)) {
                return Err(format!(
                    "{what}: its condition is on `{}`, a field it changes",
                    c.field
                ));
            }
        }
        let spec = match &self.spec {
            TransformSpec::RenameField { from, to, .. } => TransformSpec::RenameField {
                from: to.clone(),
                to: from.clone(),
                when,
            },
            TransformSpec::AddField {
                field,
                default_value,
                ..
            } => TransformSpec::RemoveField {
                field: field.clone(),
                default_value: Some(default_value.clone()),
                when,
            },
            TransformSpec::RemoveField {
                field,
                default_value,
                ..
            } => match default_value {
                Some(d) => TransformSpec::AddField {
                    field: field.clone(),
                    default_value: d.clone(),
                    when,
                },
                None => {
                    return Err(format!(
                        "{what}: removeField of `{field}` has no defaultValue to put back"
                    ))
                }
            },
            TransformSpec::SplitField {
                from,
                to,
                separator,
                ..
            } => TransformSpec::MergeField {
                from: to.clone(),
                to: from.clone(),
                separator: separator.clone(),
                when,
            },
            TransformSpec::MergeField {
                from,
                to,
                separator,
                ..
            } => TransformSpec::SplitField {
                from: to.clone(),
                to: from.clone(),
                separator: separator.clone(),
                when,
            },
            TransformSpec::ConvertType {
                field, to, from, ..
            } => match from {
                Some(f) => TransformSpec::ConvertType {
                    field: field.clone(),
                    to: *f,
                    from: Some(*to),
                    when,
                },
                None => {
                    return Err(format!(
                        "{what}: convertType of `{field}` does not say what type it converts from"
                    ))
                }
            },
            TransformSpec::Custom {
                script, inverse, ..
            } => match inverse {
                Some(inv) => TransformSpec::Custom {
                    script: inv.clone(),
                    inverse: Some(script.clone()),
                    when,
                },
                None => return Err(format!("{what}: its custom script has no inverse script")),
            },
        };
        Step::new(spec, what)
    }
}

fn spec_condition(spec: &TransformSpec) -> Option<&Condition> {
    match spec {
        TransformSpec::RenameField { when, .. }
        | TransformSpec::AddField { when, .. }
        | TransformSpec::RemoveField { when, .. }
        | TransformSpec::SplitField { when, .. }
        | TransformSpec::MergeField { when, .. }
        | TransformSpec::ConvertType { when, .. }
        | TransformSpec::Custom { when, .. } => when.as_ref(),
    }
}

/// The fields a step writes or removes (a custom script may touch anything: `""`... is not a
/// path, so a script is treated as touching every field).
fn touched(spec: &TransformSpec) -> Vec<&str> {
    match spec {
        TransformSpec::RenameField { from, to, .. } => vec![from, to],
        TransformSpec::AddField { field, .. }
        | TransformSpec::RemoveField { field, .. }
        | TransformSpec::ConvertType { field, .. } => vec![field],
        TransformSpec::SplitField { from, to, .. } => std::iter::once(from.as_str())
            .chain(to.iter().map(String::as_str))
            .collect(),
        TransformSpec::MergeField { from, to, .. } => from
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(to.as_str()))
            .collect(),
        TransformSpec::Custom { .. } => vec![],
    }
}

/// Whether one path is the other or inside it.
fn overlaps(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}."));
    inside(a, b) || inside(b, a)
}

/// The value at a dotted path.
pub fn get<'a>(body: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = body.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// Removes and returns the value at a dotted path. An object left empty by the removal goes
/// too, so that moving a field into a new nested object and back gives the document back.
pub fn take(body: &mut Map<String, Value>, path: &str) -> Option<Value> {
    match path.split_once('.') {
        None => body.shift_remove(path),
        Some((first, rest)) => {
            let inner = body.get_mut(first)?.as_object_mut()?;
            let v = take(inner, rest)?;
            if inner.is_empty() {
                body.shift_remove(first);
            }
            Some(v)
        }
    }
}

/// Sets the value at a dotted path, creating the objects on the way.
pub fn set(body: &mut Map<String, Value>, path: &str, v: Value) -> Result<(), String> {
    let (parent, last) = match path.rsplit_once('.') {
        None => (None, path),
        Some((p, l)) => (Some(p), l),
    };
    let mut cur = body;
    for p in parent.into_iter().flat_map(|p| p.split('.')) {
        let next = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = next
            .as_object_mut()
            .ok_or_else(|| format!("`{p}` in `{path}` is not an object"))?;
    }
    cur.insert(last.to_string(), v);
    Ok(())
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn convert(v: &Value, to: Kind) -> Result<Value, String> {
    Ok(match (to, v) {
        (Kind::String, Value::String(_))
        | (Kind::Number, Value::Number(_))
        | (Kind::Boolean, Value::Bool(_)) => v.clone(),
        (Kind::String, other) => Value::String(text_of(other)),
        (Kind::Number, Value::String(s)) => {
            let t = s.trim();
            serde_json::from_str::<serde_json::Number>(t)
                .map(Value::Number)
                .map_err(|_| format!("`{s}` is not a number"))?
        }
        (Kind::Number, Value::Bool(b)) => Value::from(u8::from(*b)),
        (Kind::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" | "" => Value::Bool(false),
            _ => return Err(format!("`{s}` is not a boolean")),
        },
        (Kind::Boolean, Value::Number(n)) => Value::Bool(n.as_f64() != Some(0.0)),
        (Kind::Json, Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("not JSON text: {e}"))?
        }
        (Kind::Json, other) => other.clone(),
        (_, other) => return Err(format!("cannot convert {other} to {to:?}")),
    })
}

/// The placeholders `addField` defaults may use.
const PLACEHOLDERS: [&str; 4] = ["NOW", "NOW_MS", "NOW_S", "KEY"];

fn check_placeholders(v: &Value) -> Result<(), String> {
    let Value::String(s) = v else { return Ok(()) };
    let mut rest = s.as_str();
    while let Some(start) = rest.find("${") {
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unclosed placeholder in `{s}`"));
        };
        let name = &rest[start + 2..start + end];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!("unknown placeholder `${{{name}}}` (known: ${{NOW}}, ${{NOW_MS}}, ${{NOW_S}}, ${{KEY}})"));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// A default with its placeholders filled in: `${NOW}` the run's time in RFC 3339 (UTC, ms),
/// `${NOW_MS}` / `${NOW_S}` Unix time (a number when it is the whole value), `${KEY}` the key.
fn resolve(v: &Value, cx: &Context) -> Value {
    let Value::String(s) = v else {
        return v.clone();
    };
    match s.as_str() {
        "${NOW_MS}" => return Value::from(cx.now_ms),
        "${NOW_S}" => return Value::from(cx.now_ms / 1000),
        _ => {}
    }
    if !s.contains("${") {
        return v.clone();
    }
    Value::String(
        s.replace("${NOW_MS}", &cx.now_ms.to_string())
            .replace("${NOW_S}", &(cx.now_ms / 1000).to_string())
            .replace("${NOW}", &rfc3339(cx.now_ms))
            .replace("${KEY}", cx.key),
    )
}

/// Unix milliseconds as `2026-01-31T12:00:00.000Z` (civil-from-days, Howard Hinnant's method).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(v: Value) -> Step {
        Step::new(serde_json::from_value(v).unwrap(), "test").unwrap()
    }

    fn run(s: &Step, v: Value) -> Result<Value, String> {
        let mut body = v.as_object().unwrap().clone();
        s.apply(
            &mut body,
            &Context {
                key: "user:7",
                now_ms: 1_700_000_000_123,
            },
        )?;
        Ok(Value::Object(body))
    }

    /// Applies `s`, checks the result, then its inverse, which must give the input back.
    fn round_trip(s: Value, input: Value, output: Value) {
        let s = step(s);
        assert_eq!(run(&s, input.clone()).unwrap(), output);
        let back = s.inverse("test").unwrap();
        assert_eq!(run(&back, output).unwrap(), input);
    }

    #[test]
    fn rename_and_back_nested() {
        round_trip(
            json!({"type": "renameField", "from": "userName", "to": "profile.fullName"}),
            json!({"userName": "Ada Lovelace", "age": 36}),
            json!({"age": 36, "profile": {"fullName": "Ada Lovelace"}}),
        );
        let s = step(json!({"type": "renameField", "from": "a", "to": "b"}));
        assert!(run(&s, json!({"a": 1, "b": 2}))
            .unwrap_err()
            .contains("both"));
        assert_eq!(run(&s, json!({"c": 1})).unwrap(), json!({"c": 1}));
    }

    #[test]
    fn split_and_merge_are_inverses() {
        round_trip(
            json!({"type": "splitField", "from": "fullName", "to": ["firstName", "lastName"], "separator": " "}),
            json!({"fullName": "Grace Brewster Hopper"}),
            json!({"firstName": "Grace", "lastName": "Brewster Hopper"}),
        );
        round_trip(
            json!({"type": "mergeField", "from": ["a", "b"], "to": "c", "separator": "-"}),
            json!({"a": "x", "b": "y-z"}),
            json!({"c": "x-y-z"}),
        );
        let s = step(json!({"type": "splitField", "from": "n", "to": ["a", "b"]}));
        assert_eq!(run(&s, json!({"n": "Cher"})).unwrap(), json!({"a": "Cher"}));
        assert!(run(&s, json!({"n": 5})).is_err());
    }

    #[test]
    fn add_fills_placeholders_and_keeps_existing_values() {
        let s = step(json!({"type": "addField", "field": "createdAt", "defaultValue": "${NOW}"}));
        assert_eq!(
            run(&s, json!({})).unwrap(),
            json!({"createdAt": "2023-11-14T22:13:20.123Z"})
        );
        assert_eq!(
            run(&s, json!({"createdAt": "x"})).unwrap(),
            json!({"createdAt": "x"})
        );
        let s = step(json!({"type": "addField", "field": "m.ts", "defaultValue": "${NOW_MS}"}));
        assert_eq!(
            run(&s, json!({})).unwrap(),
            json!({"m": {"ts": 1_700_000_000_123u64}})
        );
        let s = step(json!({"type": "addField", "field": "src", "defaultValue": "from ${KEY}"}));
        assert_eq!(run(&s, json!({})).unwrap(), json!({"src": "from user:7"}));
        let bad: TransformSpec = serde_json::from_value(
            json!({"type": "addField", "field": "x", "defaultValue": "${TODAY}"}),
        )
        .unwrap();
        assert!(Step::new(bad, "m")
            .unwrap_err()
            .contains("unknown placeholder"));
    }

    #[test]
    fn remove_is_invertible_only_with_a_default() {
        round_trip(
            json!({"type": "removeField", "field": "legacy", "defaultValue": 0}),
            json!({"a": 1, "legacy": 0}),
            json!({"a": 1}),
        );
        let s = step(json!({"type": "removeField", "field": "legacy"}));
        assert!(s
            .inverse("v1_to_v2")
            .unwrap_err()
            .contains("no defaultValue"));
    }

    #[test]
    fn conversions() {
        round_trip(
            json!({"type": "convertType", "field": "age", "to": "number", "from": "string"}),
            json!({"age": "42"}),
            json!({"age": 42}),
        );
        let s = step(json!({"type": "convertType", "field": "ok", "to": "boolean"}));
        assert_eq!(run(&s, json!({"ok": "yes"})).unwrap(), json!({"ok": true}));
        assert!(s.inverse("m").is_err());
        let s = step(json!({"type": "convertType", "field": "age", "to": "number"}));
        assert!(run(&s, json!({"age": "old"}))
            .unwrap_err()
            .contains("not a number"));
        let s = step(json!({"type": "convertType", "field": "j", "to": "json", "from": "string"}));
        assert_eq!(
            run(&s, json!({"j": "[1,2]"})).unwrap(),
            json!({"j": [1, 2]})
        );
    }

    #[test]
    fn conditions() {
        let s = step(
            json!({"type": "addField", "field": "tier", "defaultValue": "gold", "when": {"field": "vip", "equals": true}}),
        );
        assert_eq!(
            run(&s, json!({"vip": true})).unwrap(),
            json!({"vip": true, "tier": "gold"})
        );
        assert_eq!(
            run(&s, json!({"vip": false})).unwrap(),
            json!({"vip": false})
        );
        let s = step(
            json!({"type": "removeField", "field": "x", "defaultValue": "", "when": {"field": "x"}}),
        );
        assert_eq!(run(&s, json!({"x": ""})).unwrap(), json!({"x": ""}));
        assert!(s.inverse("m").unwrap_err().contains("a field it changes"));
        let s = step(
            json!({"type": "renameField", "from": "a", "to": "b", "when": {"field": "c", "exists": false}}),
        );
        assert_eq!(
            run(&s, json!({"a": 1, "c": 2})).unwrap(),
            json!({"a": 1, "c": 2})
        );
        assert_eq!(run(&s, json!({"a": 1})).unwrap(), json!({"b": 1}));
        assert!(s.inverse("m").is_ok());
    }

    #[test]
    fn unknown_transforms_and_keys_are_rejected() {
        assert!(
            serde_json::from_value::<TransformSpec>(json!({"type": "explode", "field": "a"}))
                .is_err()
        );
        assert!(serde_json::from_value::<TransformSpec>(
            json!({"type": "renameField", "from": "a", "to": "b", "extra": 1})
        )
        .is_err());
        let bad: TransformSpec =
            serde_json::from_value(json!({"type": "renameField", "from": "a..b", "to": "c"}))
                .unwrap();
        assert!(Step::new(bad, "m").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
