//! The schema registry: a directory of schema files (one per version, any `*.json` name) and
//! one `migrations.json`, in seed 003's formats; the version graph built from the
//! migrations (with reverse edges for invertible ones); path search; and, per value, the
//! version it is at and the plan that takes it to the target.
//!
//! ```text
//! registry/
//!   user-v1.json      {"version": "1.0.0", "keyPattern": "user:*", "fields": {...}}
//!   user-v2.json
//!   migrations.json   {"migrations": {"v1_to_v2": {"source": "1.0.0", "target": "2.0.0",
//!                      "transforms": [...], "validation": {"required": [...]}}}, "paths": {...}}
//! ```
//!
//! Paths are the shortest chains of migrations (fewest steps, forward steps first, then by
//! name), unless `paths` names one: `"paths": {"1.0.0": {"3.0.0": ["v1_to_v2", "v2_to_v3"]}}`.
//! A reversed migration is named `<name>.reverse` there.

pub mod schema;
pub mod script;
pub mod stored;
pub mod transforms;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::document::{Document, Storage};
use crate::Error;
use schema::SchemaFile;
use transforms::{Context, Step, TransformSpec};

pub const MIGRATIONS_FILE: &str = "migrations.json";

/// `migrations.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationsFile {
    #[serde(default)]
    pub migrations: BTreeMap<String, MigrationSpec>,
    #[serde(default)]
    pub paths: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSpec {
    pub source: String,
    pub target: String,
    /// Only `direct` (transform each value as it is met) exists.
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
    #[serde(default)]
    pub validation: Option<ValidationSpec>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSpec {
    #[serde(default)]
    pub required: Vec<String>,
}

/// A schema as loaded, with the text it came from (pushed to Redis as is).
#[derive(Debug, Clone)]
pub struct Schema {
    pub file: SchemaFile,
    pub path: PathBuf,
    pub text: String,
}

/// A step through the graph: a migration, or a migration walked backwards.
#[derive(Clone)]
pub struct Edge {
    pub name: String,
    pub from: Version,
    pub to: Version,
    pub steps: Vec<Step>,
    /// Fields that must have a value after the step (`validation.required`).
    pub required: Vec<String>,
    pub reverse: bool,
}

/// A reverse edge that could not be built, kept to explain a missing path.
struct Blocked {
    name: String,
    from: Version,
    to: Version,
    reason: String,
}

pub struct Registry {
    pub dir: PathBuf,
    pub schemas: BTreeMap<Version, Schema>,
    pub migrations_text: String,
    pub edges: Vec<Edge>,
    blocked: Vec<Blocked>,
    overrides: BTreeMap<(Version, Version), Vec<usize>>,
}

fn parse_version(text: &str, whose: &str) -> Result<Version, String> {
    Version::parse(text)
        .map_err(|e| format!("{whose}: `{text}` is not a semantic version (like 1.2.0): {e}"))
}

impl Registry {
    /// Loads and checks a registry directory. Every problem is an error (exit 2) that names
    /// the file and, for JSON, the line.
    pub fn load(dir: &Path) -> Result<Registry, Error> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::malformed(dir, format!("cannot read the registry directory: {e}"))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
            .collect();
        files.sort();
        let mut schemas = BTreeMap::new();
        let mut migrations_text = None;
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::malformed(&path, e))?;
            if path.file_name().is_some_and(|n| n == MIGRATIONS_FILE) {
                migrations_text = Some(text);
                continue;
            }
            let file: SchemaFile = serde_json::from_str(&text)
                .map_err(|e| Error::malformed(&path, format!("not a schema file: {e}")))?;
            let version =
                parse_version(&file.version, "version").map_err(|e| Error::malformed(&path, e))?;
            if file.key_pattern.is_empty() {
                return Err(Error::malformed(&path, "keyPattern is empty"));
            }
            if let Some(other) = schemas.get(&version) {
                let other: &Schema = other;
                return Err(Error::malformed(
                    &path,
                    format!(
                        "version {version} is also defined in {}",
                        other.path.display()
                    ),
                ));
            }
            schemas.insert(version, Schema { file, path, text });
        }
        if schemas.is_empty() {
            return Err(Error::malformed(
                dir,
                "no schema files (*.json) in the registry directory",
            ));
        }
        let mpath = dir.join(MIGRATIONS_FILE);
        let migrations_text = migrations_text.unwrap_or_else(|| "{}".into());
        let mfile: MigrationsFile = serde_json::from_str(&migrations_text)
            .map_err(|e| Error::malformed(&mpath, format!("not a migrations file: {e}")))?;
        let bad = |msg: String| Error::malformed(&mpath, msg);

        let mut edges = Vec::new();
        let mut blocked = Vec::new();
        for (name, m) in &mfile.migrations {
            let from = parse_version(&m.source, &format!("{name}.source")).map_err(bad)?;
            let to = parse_version(&m.target, &format!("{name}.target")).map_err(bad)?;
            for v in [&from, &to] {
                if !schemas.contains_key(v) {
                    return Err(bad(format!("{name}: no schema file has version {v}")));
                }
            }
            if from == to {
                return Err(bad(format!("{name}: source and target are both {from}")));
            }
            if let Some(s) = m.strategy.as_deref().filter(|s| *s != "direct") {
                return Err(bad(format!(
                    "{name}: unknown strategy `{s}` (only `direct` exists)"
                )));
            }
            let steps = m
                .transforms
                .iter()
                .enumerate()
                .map(|(i, t)| Step::new(t.clone(), &format!("{name} transform {}", i + 1)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            let reverse: Result<Vec<Step>, String> = steps
                .iter()
                .enumerate()
                .rev()
                .map(|(i, s)| s.inverse(&format!("{name} transform {}", i + 1)))
                .collect();
            match reverse {
                Ok(steps) => edges.push(Edge {
                    name: format!("{name}.reverse"),
                    from: to.clone(),
                    to: from.clone(),
                    steps,
                    required: Vec::new(),
                    reverse: true,
                }),
                Err(reason) => blocked.push(Blocked {
                    name: name.clone(),
                    from: to.clone(),
                    to: from.clone(),
                    reason,
                }),
            }
            edges.push(Edge {
                name: name.clone(),
                from,
                to,
                steps,
                required: m.validation.clone().unwrap_or_default().required,
                reverse: false,
            });
        }
        // Forward steps first, then by name: the order path search prefers.
        edges.sort_by(|a, b| (a.reverse, &a.name).cmp(&(b.reverse, &b.name)));

        let mut overrides = BTreeMap::new();
        for (from, targets) in &mfile.paths {
            let fv = parse_version(from, "paths").map_err(bad)?;
            for (to, names) in targets {
                let tv = parse_version(to, "paths").map_err(bad)?;
                let mut at = fv.clone();
                let mut chain = Vec::new();
                for n in names {
                    let i = edges.iter().position(|e| &e.name == n).ok_or_else(|| {
                        let why = blocked
                            .iter()
                            .find(|b| format!("{}.reverse", b.name) == *n)
                            .map(|b| format!(": {}", b.reason))
                            .unwrap_or_default();
                        bad(format!("paths {from} -> {to}: no migration `{n}`{why}"))
                    })?;
                    if edges[i].from != at {
                        return Err(bad(format!(
                            "paths {from} -> {to}: `{n}` starts at {}, not at {at}",
                            edges[i].from
                        )));
                    }
                    at = edges[i].to.clone();
                    chain.push(i);
                }
                if at != tv {
                    return Err(bad(format!("paths {from} -> {to}: the chain ends at {at}")));
                }
                overrides.insert((fv.clone(), tv), chain);
            }
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            schemas,
            migrations_text,
            edges,
            blocked,
            overrides,
        })
    }

    pub fn version(&self, text: &str) -> Result<Version, Error> {
        let v = parse_version(text, "version").map_err(Error::Usage)?;
        if !self.schemas.contains_key(&v) {
            let known: Vec<String> = self.schemas.keys().map(|v| v.to_string()).collect();
            return Err(Error::Registry(format!(
                "the registry has no version {v} (it has {})",
                known.join(", ")
            )));
        }
        Ok(v)
    }

    /// The edges from `from` to `to`, or why there are none.
    pub fn path(&self, from: &Version, to: &Version) -> Result<Vec<&Edge>, Error> {
        if from == to {
            return Ok(Vec::new());
        }
        if let Some(chain) = self.overrides.get(&(from.clone(), to.clone())) {
            return Ok(chain.iter().map(|&i| &self.edges[i]).collect());
        }
        if let Some(chain) = bfs(from, to, self.edges.iter().map(|e| (&e.from, &e.to))) {
            return Ok(chain.into_iter().map(|i| &self.edges[i]).collect());
        }
        // Would the way exist if the blocked reverse edges were there? Then say which step
        // stands in the way, rather than "no path".
        let all = self
            .edges
            .iter()
            .map(|e| (&e.from, &e.to))
            .chain(self.blocked.iter().map(|b| (&b.from, &b.to)));
        if let Some(chain) = bfs(from, to, all) {
            let reasons: Vec<&str> = chain
                .into_iter()
                .filter_map(|i| i.checked_sub(self.edges.len()))
                .map(|i| self.blocked[i].reason.as_str())
                .collect();
            return Err(Error::Registry(format!(
                "no migration path from {from} to {to}: going back needs a step with no inverse ({})",
                reasons.join("; ")
            )));
        }
        Err(Error::Registry(format!(
            "no migration path from {from} to {to} (no chain of migrations connects them)"
        )))
    }

    /// Versions that share the key pattern of `version`: the ones a value of that pattern can be at.
    pub fn family(&self, version: &Version) -> Vec<Version> {
        let pattern = &self.schemas[version].file.key_pattern;
        self.schemas
            .iter()
            .filter(|(_, s)| &s.file.key_pattern == pattern)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// A description of the registry, for `schema check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (v, s) in &self.schemas {
            out += &format!(
                "schema {v}  {}  {} fields  ({})\n",
                s.file.key_pattern,
                s.file.fields.len(),
                s.path.display()
            );
        }
        for e in &self.edges {
            out += &format!(
                "migration {}  {} -> {}  {} steps\n",
                e.name,
                e.from,
                e.to,
                e.steps.len()
            );
        }
        for b in &self.blocked {
            out += &format!(
                "no reverse for {} ({} -> {}): {}\n",
                b.name, b.from, b.to, b.reason
            );
        }
        for ((f, t), chain) in &self.overrides {
            let names: Vec<&str> = chain.iter().map(|&i| self.edges[i].name.as_str()).collect();
            out += &format!("path {f} -> {t}: {}\n", names.join(", "));
        }
        out
    }
}

/// Shortest chain of edge indexes from `from` to `to` (breadth first; ties go to the edge
/// met first).
fn bfs<'a>(
    from: &Version,
    to: &Version,
    edges: impl Iterator<Item = (&'a Version, &'a Version)>,
) -> Option<Vec<usize>> {
    let edges: Vec<(&Version, &Version)> = edges.collect();
    let mut came_by: HashMap<&Version, usize> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut chain = Vec::new();
            let mut at = to;
            while at != from {
                let i = came_by[at];
                chain.push(i);
                at = edges[i].0;
            }
            chain.reverse();
            return Some(chain);
        }
        for (i, (a, b)) in edges.iter().enumerate() {
            if *a == v && *b != from && !came_by.contains_key(b) {
                came_by.insert(b, i);
                queue.push_back(b);
            }
        }
    }
    None
}

/// Why a value was not transformed; `reason` is the summary's category, `detail` the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    pub detail: String,
}

impl Refusal {
    fn new(reason: impl Into<String>, detail: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            detail: detail.into(),
        }
    }
}

/// What to do with one value.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Already at the target version: nothing to write.
    AtTarget,
    /// Transformed along `route`, valid against the target.
    Migrate { route: String, doc: Document },
}

/// Plans values for one target version: the paths from every version of its key pattern,
/// found once at the start (so a missing path stops the run before it writes anything).
pub struct Planner {
    registry: Arc<Registry>,
    pub target: Version,
    family: Vec<Version>,
    /// The pattern's version as recorded in Redis, used to settle ambiguous values.
    hint: Option<Version>,
    paths: BTreeMap<Version, (String, Vec<Edge>)>,
}

impl Planner {
    pub fn new(
        registry: Arc<Registry>,
        target: &str,
        hint: Option<&str>,
    ) -> Result<Planner, Error> {
        let target = registry.version(target)?;
        let family = registry.family(&target);
        let mut paths = BTreeMap::new();
        for v in &family {
            let edges: Vec<Edge> = registry.path(v, &target)?.into_iter().cloned().collect();
            let names: Vec<&str> = edges.iter().map(|e| e.name.as_str()).collect();
            let route = if names.is_empty() {
                format!("{v}")
            } else {
                format!("{v} -> {target} ({})", names.join(", "))
            };
            paths.insert(v.clone(), (route, edges));
        }
        let hint = hint
            .and_then(|h| Version::parse(h).ok())
            .filter(|h| family.contains(h));
        Ok(Planner {
            registry,
            target,
            family,
            hint,
            paths,
        })
    }

    pub fn key_pattern(&self) -> &str {
        &self.registry.schemas[&self.target].file.key_pattern
    }

    /// The version `doc` is at (see [`crate::document`] for the rules).
    pub fn detect(&self, doc: &Document) -> Result<Version, Refusal> {
        if let Some(marker) = doc.marker() {
            return match Version::parse(marker) {
                Ok(v) if self.family.contains(&v) => Ok(v),
                _ => Err(Refusal::new(
                    "version unknown",
                    format!("marked as version `{marker}`, which this key pattern does not have"),
                )),
            };
        }
        let lenient = doc.storage == Storage::Hash;
        let mut best: Vec<&Version> = Vec::new();
        let mut best_score = usize::MAX;
        for v in &self.family {
            let fields = &self.registry.schemas[v].file.fields;
            if schema::validate(fields, &doc.body, lenient).is_err() {
                continue;
            }
            let score = schema::unknown_fields(fields, &doc.body);
            if score < best_score {
                best_score = score;
                best.clear();
            }
            if score == best_score {
                best.push(v);
            }
        }
        match best.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                let why = schema::validate(
                    &self.registry.schemas[&self.target].file.fields,
                    &doc.body,
                    lenient,
                )
                .err()
                .unwrap_or_default();
                Err(Refusal::new(
                    "version unknown",
                    format!(
                        "fits no schema of `{}` (against {}: {why})",
                        self.key_pattern(),
                        self.target
                    ),
                ))
            }
            many => {
                for prefer in [self.hint.as_ref(), Some(&self.target)]
                    .into_iter()
                    .flatten()
                {
                    if many.contains(&prefer) {
                        return Ok(prefer.clone());
                    }
                }
                let list: Vec<String> = many.iter().map(|v| v.to_string()).collect();
                Err(Refusal::new(
                    "version ambiguous",
                    format!("fits versions {} equally well", list.join(", ")),
                ))
            }
        }
    }

    /// The plan for one value: detect its version, run the path, check the result.
    pub fn plan(&self, key: &[u8], doc: &Document, now_ms: u64) -> Result<Plan, Refusal> {
        let from = self.detect(doc)?;
        if from == self.target {
            return Ok(Plan::AtTarget);
        }
        let Some((route, edges)) = self.paths.get(&from) else {
            return Err(Refusal::new(
                "no migration path",
                format!("no path from {from} to {}", self.target),
            ));
        };
        let key_text = String::from_utf8_lossy(key);
        let cx = Context {
            key: &key_text,
            now_ms,
        };
        let mut out = doc.clone();
        for edge in edges {
            for step in &edge.steps {
                step.apply(&mut out.body, &cx)
                    .map_err(|e| Refusal::new("transform failed", format!("{}: {e}", edge.name)))?;
            }
            for field in &edge.required {
                if transforms::get(&out.body, field).is_none_or(|v| v.is_null()) {
                    return Err(Refusal::new(
                        format!("fails validation after {}", edge.name),
                        format!("{}: required field `{field}` has no value", edge.name),
                    ));
                }
            }
        }
        out.set_marker(&self.target.to_string());
        let fields = &self.registry.schemas[&self.target].file.fields;
        schema::validate(fields, &out.body, out.storage == Storage::Hash)
            .map_err(|e| Refusal::new(format!("fails validation against {}", self.target), e))?;
        Ok(Plan::Migrate {
            route: route.clone(),
            doc: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Writes a registry directory of `files` and loads it.
    fn registry(name: &str, files: &[(&str, serde_json::Value)]) -> Result<Registry, Error> {
        let dir = std::env::temp_dir().join(format!("twm-reg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in files {
            std::fs::write(dir.join(f), v.to_string()).unwrap();
        }
        let r = Registry::load(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    /// Seed 003's three versions of a user.
    fn seed() -> Vec<(&'static str, serde_json::Value)> {
        vec![
            (
                "v1.json",
                json!({"version": "1.0.0", "keyPattern": "user:*", "fields": {
                "userName": {"type": "string", "required": true}, "age": {"type": "number"}}}),
            ),
            (
                "v2.json",
                json!({"version": "2.0.0", "keyPattern": "user:*", "fields": {
                "fullName": {"type": "string", "required": true}, "age": {"type": "number"},
                "createdAt": {"type": "string", "required": true}}}),
            ),
            (
                "v3.json",
                json!({"version": "3.0.0", "keyPattern": "user:*", "fields": {
                "firstName": {"type": "string", "required": true}, "lastName": {"type": "string", "required": true},
                "age": {"type": "number"}, "createdAt": {"type": "string", "required": true}}}),
            ),
            (
                "migrations.json",
                json!({"migrations": {
                "v1_to_v2": {"source": "1.0.0", "target": "2.0.0", "strategy": "direct", "transforms": [
                    {"type": "renameField", "from": "userName", "to": "fullName"},
                    {"type": "addField", "field": "createdAt", "defaultValue": "${NOW}"}],
                    "validation": {"required": ["fullName", "createdAt"]}},
                "v2_to_v3": {"source": "2.0.0", "target": "3.0.0", "strategy": "direct", "transforms": [
                    {"type": "splitField", "from": "fullName", "to": ["firstName", "lastName"], "separator": " "}]}},
                "paths": {"1.0.0": {"3.0.0": ["v1_to_v2", "v2_to_v3"]}}}),
            ),
        ]
    }

    /// The error loading the seed registry with `migrations.json` replaced.
    fn error_with_migrations(name: &str, migrations: serde_json::Value) -> String {
        let mut files = seed();
        files[3] = ("migrations.json", migrations);
        registry(name, &files)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn doc(v: serde_json::Value) -> Document {
        Document::from_json(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn seed_example_plans_and_detects() {
        let r = Arc::new(registry("seed", &seed()).unwrap());
        let p = Planner::new(r.clone(), "3.0.0", None).unwrap();
        let Plan::Migrate { route, doc: out } = p
            .plan(
                b"user:1",
                &doc(json!({"userName": "Ada Lovelace", "age": 36})),
                0,
            )
            .unwrap()
        else {
            panic!("expected a migration")
        };
        assert_eq!(route, "1.0.0 -> 3.0.0 (v1_to_v2, v2_to_v3)");
        assert_eq!(
            serde_json::Value::Object(out.body.clone()),
            json!({"age": 36, "createdAt": "1970-01-01T00:00:00.000Z", "firstName": "Ada", "lastName": "Lovelace", "_schemaVersion": "3.0.0"})
        );
        // Marked values and unmarked values at the target are left alone.
        assert_eq!(p.plan(b"user:1", &out, 0).unwrap(), Plan::AtTarget);
        let unmarked = doc(json!({"firstName": "A", "lastName": "B", "createdAt": "x"}));
        assert_eq!(p.plan(b"user:1", &unmarked, 0).unwrap(), Plan::AtTarget);
        // A single name cannot fill lastName: refused, with the reason.
        let e = p
            .plan(b"user:2", &doc(json!({"userName": "Cher"})), 0)
            .unwrap_err();
        assert_eq!(e.reason, "fails validation against 3.0.0");
        assert!(e.detail.contains("lastName"), "{e:?}");
        let e = p.plan(b"user:3", &doc(json!({"nick": 1})), 0).unwrap_err();
        assert_eq!(e.reason, "version unknown");
        let e = p
            .plan(b"user:3", &doc(json!({"_schemaVersion": "9.9.9"})), 0)
            .unwrap_err();
        assert_eq!(e.reason, "version unknown");
    }

    #[test]
    fn reverse_paths_and_their_absence() {
        let r = Arc::new(registry("rev", &seed()).unwrap());
        let p = Planner::new(r.clone(), "1.0.0", None).unwrap();
        let v3 = doc(
            json!({"firstName": "Ada", "lastName": "Lovelace", "createdAt": "t", "_schemaVersion": "3.0.0"}),
        );
        let Plan::Migrate { route, doc: out } = p.plan(b"user:1", &v3, 0).unwrap() else {
            panic!()
        };
        assert_eq!(route, "3.0.0 -> 1.0.0 (v2_to_v3.reverse, v1_to_v2.reverse)");
        assert_eq!(
            serde_json::Value::Object(out.body),
            json!({"userName": "Ada Lovelace", "_schemaVersion": "1.0.0"})
        );

        let mut files = seed();
        files[3] = (
            "migrations.json",
            json!({"migrations": {
            "v1_to_v2": {"source": "1.0.0", "target": "2.0.0", "transforms": [{"type": "removeField", "field": "age"}]}}}),
        );
        let r = Arc::new(registry("norev", &files).unwrap());
        let e = Planner::new(r.clone(), "1.0.0", None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no inverse") && e.contains("removeField of `age`"),
            "{e}"
        );
        let e = r
            .path(&Version::new(1, 0, 0), &Version::new(3, 0, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no migration path from 1.0.0 to 3.0.0"), "{e}");
    }

    #[test]
    fn shortest_path_unless_overridden() {
        let mut files = seed();
        files[3] = (
            "migrations.json",
            json!({"migrations": {
            "a": {"source": "1.0.0", "target": "2.0.0"},
            "b": {"source": "2.0.0", "target": "3.0.0"},
            "direct": {"source": "1.0.0", "target": "3.0.0"}}}),
        );
        let r = registry("short", &files).unwrap();
        let names = |r: &Registry| {
            r.path(&Version::new(1, 0, 0), &Version::new(3, 0, 0))
                .unwrap()
                .iter()
                .map(|e| e.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&r), ["direct"]);
        if let (_, serde_json::Value::Object(m)) = &mut files[3] {
            m.insert("paths".into(), json!({"1.0.0": {"3.0.0": ["a", "b"]}}));
        }
        let r = registry("override", &files).unwrap();
        assert_eq!(names(&r), ["a", "b"]);
    }

    #[test]
    fn malformed_registries_are_clear_errors() {
        let mut files = seed();
        files.push((
            "broken.json",
            json!({"version": "2.x", "keyPattern": "user:*"}),
        ));
        let e = registry("badver", &files).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("broken.json") && e.to_string().contains("semantic version"),
            "{e}"
        );

        assert!(error_with_migrations(
            "unknownver",
            json!({"migrations": {"m": {"source": "1.0.0", "target": "7.0.0"}}})
        )
        .contains("no schema file has version 7.0.0"));

        let mut files = seed();
        files[3] = (
            "migrations.json",
            json!({"migrations": {"m": {"source": "1.0.0", "target": "2.0.0", "transforms": [{"type": "custom", "script": "let = ;"}]}}}),
        );
        assert!(registry("badscript", &files)
            .err()
            .unwrap()
            .to_string()
            .contains("does not compile"));

        assert!(error_with_migrations(
            "badpath",
            json!({"migrations": {}, "paths": {"1.0.0": {"3.0.0": ["nope"]}}})
        )
        .contains("no migration `nope`"));
    }

    #[test]
    fn ambiguity_is_settled_by_the_hint_or_refused() {
        let files = vec![
            (
                "a.json",
                json!({"version": "1.0.0", "keyPattern": "k:*", "fields": {"a": {"type": "string"}}}),
            ),
            (
                "b.json",
                json!({"version": "2.0.0", "keyPattern": "k:*", "fields": {"a": {"type": "string"}, "b": {"type": "string"}}}),
            ),
            (
                "c.json",
                json!({"version": "3.0.0", "keyPattern": "k:*", "fields": {"a": {"type": "string"}, "c": {"type": "string"}}}),
            ),
            (
                "migrations.json",
                json!({"migrations": {
                "m1": {"source": "1.0.0", "target": "2.0.0"}, "m2": {"source": "2.0.0", "target": "3.0.0"}}}),
            ),
        ];
        let r = Arc::new(registry("amb", &files).unwrap());
        let value = doc(json!({"a": "x"}));
        let p = Planner::new(r.clone(), "3.0.0", None).unwrap();
        assert_eq!(p.plan(b"k:1", &value, 0).unwrap(), Plan::AtTarget);
        let p = Planner::new(r.clone(), "3.0.0", Some("1.0.0")).unwrap();
        assert_eq!(p.detect(&value).unwrap(), Version::new(1, 0, 0));
        let p = Planner::new(r, "2.0.0", None).unwrap();
        // Fits 1.0.0, 2.0.0 and 3.0.0 equally; the target 2.0.0 is among them: left alone.
        assert_eq!(p.plan(b"k:1", &value, 0).unwrap(), Plan::AtTarget);
    }
}
