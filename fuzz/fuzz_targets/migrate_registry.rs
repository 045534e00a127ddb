//! twincache-migrate's registry files (schema files and `migrations.json`), as an operator
//! hands them over: never a panic, whatever the JSON, the versions, the transforms or the
//! embedded scripts say. Input: a schema file and a migrations file separated by a 0xFF byte.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use twincache_migrate::registry::Registry;

/// One directory per fuzzing process, rewritten for every input.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("twincache-fuzz-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let (schema, migrations) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    let dir = dir();
    std::fs::write(dir.join("schema.json"), schema).expect("write");
    std::fs::write(dir.join("migrations.json"), migrations).expect("write");
    let _ = Registry::load(dir);
});
