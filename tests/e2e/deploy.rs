//! The files in `deploy/`, checked with the tools that read them: `systemd-analyze`
//! (verify, and the hardening score), `promtool` (scrape configs, alert rules),
//! `kubernetes-validate` (the Kubernetes schemas), `docker-compose config`; and the
//! Grafana dashboard's and the alerts' queries against the metrics a running cluster
//! really exposes. No container runs here: the Dockerfile is only checked for its shape. But
//! every node each configuration defines is started with that configuration's own flags
//! and variables (its ports made free ones, its workers loopback ones), so a setting the
//! binaries refuse, such as listening beyond loopback without a secret, fails here.
//!
//! The tools come from Debian's `systemd`, `prometheus` and `docker-compose` packages and
//! PyPI's `kubernetes-validate` (`.ci/run` installs them when missing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{keygen, Proc, ORCHESTRATOR, WORKER};
use crate::ops::{get, url, HttpCluster, TempDir};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Runs `cmd`; panics with its output unless it succeeds. Returns stdout and stderr.
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (.ci/run installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown} failed:\n{text}");
    text
}

#[test]
fn systemd_units_verify_clean_and_are_hardened() {
    // verify checks that ExecStart exists, so the copies point at the binaries just built;
    // a template is verified as an instance.
    let dir = TempDir::new("systemd");
    let units = [
        (
            "twincache-worker@.service",
            "twincache-worker@7001.service",
            "/usr/local/bin/twincache-worker",
            WORKER,
        ),
        (
            "twincache-orchestrator.service",
            "twincache-orchestrator.service",
            "/usr/local/bin/twincache-orchestrator",
            ORCHESTRATOR,
        ),
    ];
    let mut paths = Vec::new();
    for (file, instance, installed, built) in units {
        let text = read(&format!("systemd/{file}"));
        assert!(text.contains(&format!("ExecStart={installed}")), "{file}");
        for option in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "LimitNOFILE=",
        ] {
            assert!(text.contains(option), "{file} lacks {option}");
        }
        let path = dir.0.join(instance);
        std::fs::write(&path, text.replace(installed, built)).unwrap();
        paths.push(path);
    }
    let out = run(Command::new("systemd-analyze").arg("verify").args(&paths));
    assert!(
        out.trim().is_empty(),
        "systemd-analyze verify complained:\n{out}"
    );
    for path in &paths {
        // systemd's exposure score, 0 (locked down) to 10, which --threshold takes times
        // ten: keep it at most 2 (these score 1.5; "OK" ends at 3.9).
        run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(path));
    }
    for env in ["systemd/orchestrator.env", "systemd/worker.env"] {
        for line in read(env)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(
                line.starts_with("TWINCACHE_") && line.contains('='),
                "{env}: {line}"
            );
        }
    }
}

#[test]
fn prometheus_configs_and_alert_rules_pass_promtool() {
    run(Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy("prometheus/prometheus.yml")));
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml")));
    // Debian's promtool is built without Kubernetes service discovery, so this one is only
    // parsed as YAML.
    run(Command::new("python3")
        .args(["-c", "import sys, yaml; yaml.safe_load(open(sys.argv[1]))"])
        .arg(deploy("prometheus/kubernetes-scrape.yml")));
}

#[test]
fn kubernetes_manifests_match_the_schemas() {
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", "1.30.0"])
        .arg(deploy("kubernetes/twincache.yaml")));
    let text = read("kubernetes/twincache.yaml");
    for pair in ["0", "1"] {
        let pdb = format!("kind: PodDisruptionBudget\nmetadata:\n  name: twincache-pair-{pair}");
        assert!(text.contains(&pdb), "a PodDisruptionBudget for pair {pair}");
    }
    assert_eq!(
        text.matches("maxUnavailable: 1").count(),
        2,
        "one worker of a pair at a time"
    );
    assert_eq!(
        text.matches("requiredDuringSchedulingIgnoredDuringExecution")
            .count(),
        2,
        "the workers of a pair never on one node"
    );
    assert!(
        text.matches("path: /ready").count() >= 3 && text.matches("path: /health").count() >= 3
    );
}

#[test]
fn compose_files_and_dockerfile() {
    let compose = deploy("docker/compose.yaml");
    run(Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .args(["config", "-q"]));
    let merged = run(Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("-f")
        .arg(deploy("docker/compose.adapter.yaml"))
        .arg("config"));
    assert_eq!(
        merged.matches("TWINCACHE_WORKER_SOURCE").count(),
        4,
        "{merged}"
    );
    for service in [
        "worker-0a",
        "worker-1b",
        "orchestrator",
        "prometheus",
        "redis-source",
        "redis-destination",
    ] {
        assert!(
            merged.contains(&format!("  {service}:")),
            "{service} in\n{merged}"
        );
    }
    let dockerfile = read("docker/Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root") && !l.contains(" 0")),
        "runs as a non-root user"
    );
    assert!(!dockerfile.contains(":latest"), "pinned images");
}

/// Family names in a classic-format `/metrics` answer, with a histogram's sample names.
fn families(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Names in a query that look like ours.
fn metric_names(query: &str) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("redis_") || w.starts_with("twincache_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_metrics_that_exist() {
    let cluster = HttpCluster::start(1, &[]).await;
    let mut known = families(&get(&url(&cluster.orch, "/metrics")).await.1);
    known.extend(families(
        &get(&url(&cluster.workers[0], "/metrics")).await.1,
    ));
    assert!(known.contains("redis_keyspace_hits_total"), "{known:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/twincache.json")).expect("dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    queries.extend(
        read("prometheus/alerts.yml")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr: ").map(str::to_string)),
    );
    assert!(queries.len() > 20, "{queries:?}");
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "no metric in {q}");
        for name in names {
            assert!(
                known.contains(&name),
                "`{name}` (in {q}) is not exposed; known: {known:?}"
            );
        }
    }
}

/// A node as a deploy file defines it: its binary, arguments and variables.
#[derive(Debug)]
struct Node {
    bin: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Node {
    /// Starts it with the deploy file's settings, made runnable here: fixed ports become
    /// free ones, the workers an orchestrator is given become loopback addresses, and the
    /// secret files are `files`' (cluster.secret, password). Panics with its log unless it
    /// starts listening.
    fn start(&self, files: &Path) -> Proc {
        let bin = if self.bin.contains("worker") {
            WORKER
        } else {
            ORCHESTRATOR
        };
        let local = |v: &str| {
            let v = v.replace("/etc/twincache", &files.to_string_lossy());
            match v.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() && host.contains('.') => {
                    format!("{host}:0")
                }
                _ => v,
            }
        };
        let mut args = Vec::new();
        let mut rest = self.args.iter();
        while let Some(a) = rest.next() {
            match (a.as_str(), a.split_once('=')) {
                (_, Some((flag, v))) if a.starts_with("--") => {
                    args.push(format!("{flag}={}", local(v)))
                }
                ("--port", None) => {
                    rest.next();
                    args.extend(["--port".to_string(), "0".to_string()]);
                }
                // The one flag here without a value.
                ("--insecure", None) => args.push(a.clone()),
                (flag, None) if flag.starts_with("--") => {
                    args.push(a.clone());
                    args.extend(rest.next().map(|v| local(v)));
                }
                // The orchestrator's workers: loopback ports nothing listens on, below.
                _ => {}
            }
        }
        if bin == ORCHESTRATOR {
            args.extend(["127.0.0.1", "1", "127.0.0.1", "2"].map(String::from));
        }
        let mut cmd = Command::new(bin);
        cmd.env_clear().args(&args);
        for (k, v) in &self.env {
            let v = match k.as_str() {
                "TWINCACHE_WORKERS" => String::new(),
                "TWINCACHE_WORKER_PORT" => "0".into(),
                _ => local(&v.replace("%d", "/etc/twincache")),
            };
            if !v.is_empty() {
                cmd.env(k, v);
            }
        }
        Proc::spawn(cmd, bin, &args)
    }
}

/// The containers of the Kubernetes manifest and of the compose file, read with PyYAML.
fn containers(file: &str) -> Vec<Node> {
    let script = r#"
import json, sys, yaml
nodes = []
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    if "services" in doc:
        for s in doc["services"].values():
            cmd = s.get("command") or []
            if cmd and cmd[0].startswith("twincache-"):
                env = s.get("environment") or {}
                nodes.append({"bin": cmd[0], "args": cmd[1:], "env": [[k, str(v)] for k, v in env.items()]})
    elif doc.get("kind") in ("StatefulSet", "Deployment"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            env = [[e["name"], e["value"]] for e in c.get("env", []) if "value" in e]
            nodes.append({"bin": c["command"][0], "args": c.get("args", []), "env": env})
print(json.dumps(nodes))
"#;
    let out = run(Command::new("python3")
        .args(["-c", script])
        .arg(deploy(file)));
    let nodes: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
    nodes
        .iter()
        .map(|n| Node {
            bin: n["bin"].as_str().unwrap().to_string(),
            args: n["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            env: n["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|kv| {
                    (
                        kv[0].as_str().unwrap().into(),
                        kv[1].as_str().unwrap().into(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// A systemd unit's node: its `Environment=` lines and its environment file's variables.
fn unit(file: &str, env_file: &str) -> Node {
    let mut env: Vec<(String, String)> = read(&format!("systemd/{file}"))
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .chain(
            read(&format!("systemd/{env_file}"))
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains('='))
                .map(|l| l.trim()),
        )
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.retain(|(k, _)| !k.ends_with("LOG_FORMAT"));
    Node {
        bin: file.to_string(),
        args: Vec::new(),
        env,
    }
}

/// Every node of every deploy configuration starts with what that configuration gives it:
/// the compose file, the Kubernetes manifest (the Secret it mounts made of a fresh cluster
/// secret and a password), and the systemd units with their environment files (their
/// credentials likewise). Until this test, a node listening on 0.0.0.0 without a cluster
/// secret or a password in all three refused to start, and nothing here noticed.
#[test]
fn every_deploy_configuration_starts_its_nodes() {
    let dir = TempDir::new("deploy-secrets");
    std::fs::copy(&keygen().0, dir.0.join("cluster.secret")).unwrap();
    std::fs::write(dir.0.join("password"), "hunter2\n").unwrap();
    let compose = containers("docker/compose.yaml");
    let kubernetes = containers("kubernetes/twincache.yaml");
    // Compose: four workers and an orchestrator; Kubernetes: a pod template for each pair's
    // StatefulSet, and the orchestrator's.
    assert_eq!(
        (compose.len(), kubernetes.len()),
        (5, 3),
        "{compose:?} {kubernetes:?}"
    );
    let systemd = [
        unit("twincache-worker@.service", "worker.env"),
        unit("twincache-orchestrator.service", "orchestrator.env"),
    ];
    for node in compose.iter().chain(&kubernetes).chain(&systemd) {
        let mut started = node.start(&dir.0);
        started.kill();
    }
}
