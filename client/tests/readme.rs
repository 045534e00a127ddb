//! The Rust examples in the READMEs (the crate's and the repository's) are excerpts of the
//! crate docs' examples, which run as doctests: every line of a README example appears, in
//! order, in one of them. So a README example cannot drift from code that runs.

use std::path::Path;

/// The lines of every fenced block opened with `fence` in `text`.
fn blocks(text: &str, fence: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        match (&mut current, line.trim()) {
            (None, l) if l == fence => current = Some(Vec::new()),
            (Some(_), "```") => found.extend(current.take()),
            (Some(block), _) => block.push(line.to_string()),
            _ => {}
        }
    }
    found
}

/// The code of every doc example in `src/`, hidden lines (`# `) left out.
fn doc_examples() -> Vec<Vec<String>> {
    let mut files = vec![];
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut docs = String::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            let line = line.trim_start();
            if let Some(doc) = line
                .strip_prefix("//!")
                .or_else(|| line.strip_prefix("///"))
            {
                docs.push_str(doc.strip_prefix(' ').unwrap_or(doc));
                docs.push('\n');
            }
        }
    }
    blocks(&docs, "```")
        .into_iter()
        .map(|b| {
            b.into_iter()
                .filter(|l| !(l.trim_start().starts_with("# ") || l.trim() == "#"))
                .collect()
        })
        .collect()
}

/// A README line as its doctest writes it: the README connects to the address a reader's
/// cluster has, the doctest to its in-process one.
fn normalized(line: &str) -> String {
    line.trim().replace(
        r#"Client::connect("127.0.0.1:7000")"#,
        "Client::connect(&addr)",
    )
}

fn is_excerpt(readme: &[String], doc: &[String]) -> bool {
    let mut doc = doc.iter().map(|l| normalized(l));
    readme
        .iter()
        .map(|l| normalized(l))
        .filter(|l| !l.is_empty())
        .all(|want| doc.any(|have| have == want))
}

#[test]
fn readme_examples_are_excerpts_of_running_doctests() {
    let examples = doc_examples();
    assert!(
        examples.len() > 10,
        "doc examples found: {}",
        examples.len()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for readme in [root.join("README.md"), root.join("../README.md")] {
        let text = std::fs::read_to_string(&readme).unwrap();
        let rust = blocks(&text, "```rust");
        assert!(!rust.is_empty(), "{} has Rust examples", readme.display());
        for block in rust {
            assert!(
                examples.iter().any(|doc| is_excerpt(&block, doc)),
                "this example in {} is not (any longer) part of a doctest:\n{}",
                readme.display(),
                block.join("\n")
            );
        }
    }
}
