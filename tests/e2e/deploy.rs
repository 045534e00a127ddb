//! The files in `deploy/`, checked with the tools that read them: `systemd-analyze`
//! (verify, and the hardening score), `promtool` (scrape configs, alert rules),
//! `kubernetes-validate` (the Kubernetes schemas), `docker-compose config`; and the
//! Grafana dashboard's and the alerts' queries against the metrics a running cluster
//! really exposes. No container runs here: the Dockerfile is only checked for its shape.
//!
//! The tools come from Debian's `systemd`, `prometheus` and `docker-compose` packages and
//! PyPI's `kubernetes-validate` (`.ci/run` installs them when missing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{ORCHESTRATOR, WORKER};
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
