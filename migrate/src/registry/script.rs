//! Custom transforms in Rhai, an embedded scripting language written in Rust: no process per
//! key, no access to files or the network, and limits on operations and sizes so a runaway
//! script fails its key instead of hanging the run.
//!
//! A script sees the document as the map `value`, the key as the string `key`, and the run's
//! time as `now_ms`. It may change `value` in place, or end with a new map; if `value` is
//! then no map, the key fails.
//!
//! ```text
//! value.displayName = value.firstName + " " + value.lastName.to_upper();
//! ```

use rhai::{Dynamic, Engine, Scope, AST};
use serde_json::{Map, Value};

use super::transforms::Context;

/// A compiled script with its own sandboxed engine (engines are cheap, and one per script
/// keeps limits and state apart).
pub struct Script {
    engine: Engine,
    ast: AST,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script").finish_non_exhaustive()
    }
}

impl Script {
    pub fn compile(source: &str) -> Result<Script, String> {
        let mut engine = Engine::new();
        engine.set_max_operations(1_000_000);
        engine.set_max_expr_depths(64, 32);
        engine.set_max_string_size(16 << 20);
        engine.set_max_array_size(1 << 20);
        engine.set_max_map_size(1 << 20);
        engine.set_max_call_levels(32);
        let ast = engine
            .compile(source)
            .map_err(|e| format!("custom script does not compile: {e}"))?;
        Ok(Script { engine, ast })
    }

    /// Runs the script on a copy of `body`; the new document.
    pub fn run(
        &self,
        body: &Map<String, Value>,
        cx: &Context,
    ) -> Result<Map<String, Value>, String> {
        let value = rhai::serde::to_dynamic(Value::Object(body.clone()))
            .map_err(|e| format!("custom script: {e}"))?;
        let mut scope = Scope::new();
        scope.push("value", value);
        scope.push_constant("key", cx.key.to_string());
        scope.push_constant("now_ms", cx.now_ms as i64);
        let out: Dynamic = self
            .engine
            .eval_ast_with_scope(&mut scope, &self.ast)
            .map_err(|e| format!("custom script failed: {e}"))?;
        // A script that ends with a map returns it; one that ends with anything else (the
        // value of its last statement, often unit) leaves its result in `value`.
        let result = if out.is_map() {
            out
        } else {
            scope.get_value::<Dynamic>("value").unwrap_or_default()
        };
        match rhai::serde::from_dynamic::<Value>(&result) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(other) => Err(format!("custom script returned {other}, not a map")),
            Err(e) => Err(format!(
                "custom script returned something that is not JSON: {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(src: &str, v: Value) -> Result<Value, String> {
        let s = Script::compile(src)?;
        s.run(
            v.as_object().unwrap(),
            &Context {
                key: "user:1",
                now_ms: 5,
            },
        )
        .map(Value::Object)
    }

    #[test]
    fn mutates_or_returns_a_map() {
        assert_eq!(
            run(
                r#"value.full = value.a + " " + value.b; value.remove("a"); value.remove("b");"#,
                json!({"a": "x", "b": "y"})
            )
            .unwrap(),
            json!({"full": "x y"})
        );
        assert_eq!(
            run(r#"#{ id: key, n: 2 }"#, json!({})).unwrap(),
            json!({"id": "user:1", "n": 2})
        );
        assert_eq!(run("42", json!({"a": 1})).unwrap(), json!({"a": 1}));
        assert!(run("value = 42;", json!({}))
            .unwrap_err()
            .contains("not a map"));
    }

    #[test]
    fn errors_and_limits_do_not_panic() {
        assert!(Script::compile("let x = ;")
            .unwrap_err()
            .contains("does not compile"));
        assert!(run("loop {}", json!({})).unwrap_err().contains("failed"));
        assert!(run("value.x.y.z = 1;", json!({})).is_err());
    }
}
