//! README.md's examples, run against the binaries: what it says a command prints is what the
//! command prints, and every flag in its tables exists with the default it gives.

use std::process::Command;

use crate::harness::{exchange, Cluster, ORCHESTRATOR, WORKER};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The lines of every ```sh block.
fn shell_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), line) => block.push(line.to_string()),
            (None, _) => {}
        }
    }
    blocks
}

/// `printf '...'` input as bytes.
fn printf(arg: &str) -> Vec<u8> {
    arg.replace("\\n", "\n").into_bytes()
}

/// Every `printf '...' | nc 127.0.0.1 7000` example with the answer README gives for it: the
/// lines after it in its block, or a `prints X and Y` comment.
fn netcat_examples(text: &str) -> Vec<(Vec<u8>, Vec<String>)> {
    let mut found = Vec::new();
    for block in shell_blocks(text) {
        for (i, line) in block.iter().enumerate() {
            let Some(rest) = line.strip_prefix("printf '") else {
                continue;
            };
            let (input, after) = rest
                .split_once("' | nc 127.0.0.1 7000")
                .expect("nc example");
            let expected: Vec<String> = match after.split_once("prints ") {
                Some((_, said)) => said.split(" and ").map(str::to_string).collect(),
                None => block[i + 1..]
                    .iter()
                    .take_while(|l| !l.starts_with("printf") && !l.is_empty())
                    .cloned()
                    .collect(),
            };
            found.push((printf(input), expected));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcat_and_redis_cli_examples_print_what_readme_says() {
    let text = readme();
    let cluster = Cluster::start(1).await;
    let examples = netcat_examples(&text);
    assert!(
        examples.len() >= 2,
        "the quick start and the text protocol examples"
    );
    for (input, expected) in examples {
        let got = exchange(cluster.orch.addr, &input).await;
        let got: Vec<&str> = got.lines().collect();
        assert_eq!(
            got,
            expected,
            "README example {:?}",
            String::from_utf8_lossy(&input)
        );
        // Every example starts afresh.
        exchange(cluster.orch.addr, b"del||a\n").await;
    }
    // `redis-cli -p 7000 <args>  # <what it prints>`, as a terminal shows it.
    let port = cluster.orch.addr.port().to_string();
    let mut checked = 0;
    for line in shell_blocks(&text).concat() {
        let Some(rest) = line.strip_prefix("redis-cli -p 7000 ") else {
            continue;
        };
        let Some((args, said)) = rest.split_once('#') else {
            continue;
        };
        let out = Command::new("redis-cli")
            .args(["--no-raw", "-p", &port])
            .args(args.split_whitespace())
            .output()
            .expect("redis-cli is installed (apt-get install -y redis-tools)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            said.trim(),
            "{line}"
        );
        checked += 1;
    }
    assert!(checked >= 2, "README's redis-cli examples were found");
    // The error texts README quotes.
    let unknown = "-ERR unknown command 'foo', with args beginning with: 'a'";
    assert!(text.contains(unknown));
    let got = exchange(cluster.orch.addr, b"*2\r\n$3\r\nfoo\r\n$1\r\na\r\n").await;
    assert_eq!(got.trim_end(), unknown);
}

#[test]
fn the_startup_line_is_as_readme_shows() {
    use std::io::BufRead;
    let said = readme()
        .lines()
        .find_map(|l| {
            l.split("# prints: ")
                .nth(1)
                .filter(|s| s.contains("worker listening"))
        })
        .expect("README shows the worker's startup line")
        .trim()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(WORKER)
        .args(["--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.trim(), said.replace("7001", &port.to_string()));
}

/// The flag tables: every flag README lists exists, with the default README gives.
#[test]
fn every_flag_in_the_tables_exists_with_its_default() {
    let text = readme();
    let mut checked = 0;
    for (table, bin) in [
        ("| orchestrator flag |", ORCHESTRATOR),
        ("| worker flag |", WORKER),
    ] {
        let help = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let start = text.find(table).expect("the table is there");
        for row in text[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
        {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (flag, default) = (cells[1], cells[2]);
            let Some(flag) = flag.strip_prefix('`').and_then(|f| f.split('`').next()) else {
                continue;
            };
            if !flag.starts_with("--") {
                continue; // positional workers, `keygen`
            }
            let Some(at) = help
                .find(&format!("{flag} "))
                .or_else(|| help.find(&format!("{flag}\n")))
            else {
                panic!("{bin} --help has no {flag}");
            };
            // The default in backticks, when README gives one, is clap's.
            if let Some(default) = default.strip_prefix('`').and_then(|d| d.split('`').next()) {
                let entry = &help[at..];
                let entry = &entry[..entry[2..].find("\n  --").map_or(entry.len(), |e| e + 2)];
                if let Some(shown) = entry.split("[default: ").nth(1) {
                    let shown = shown.split(']').next().unwrap();
                    assert_eq!(shown, default, "{bin}: {flag}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} flags found");
}
