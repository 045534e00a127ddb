//! Worker storage through the real binaries: encryption keys, key checks between partners.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Proc, TextConn, WORKER};

fn keyfile(dir: &std::path::Path, name: &str) -> String {
    let out = Command::new(WORKER)
        .arg("keygen")
        .output()
        .expect("run worker keygen");
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    assert_eq!(key.trim().len(), 64, "{key}");
    let path = dir.join(name);
    std::fs::write(&path, key).unwrap();
    path.to_string_lossy().into_owned()
}

fn encrypted_worker(key: &str) -> Proc {
    Proc::start(
        WORKER,
        &[
            "--port".into(),
            "0".into(),
            "--encryption-key-file".into(),
            key.into(),
        ],
    )
}

/// INFO's cluster section, once `want` shows up in it (bounded wait).
fn cluster_info_until(port: u16, want: &str) -> String {
    let mut info = String::new();
    for _ in 0..100 {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "INFO", "cluster"])
            .output()
            .unwrap();
        info = String::from_utf8_lossy(&out.stdout).into_owned();
        if info.contains(want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_pair_serves_and_mismatched_keys_are_reported() {
    let dir = std::env::temp_dir().join(format!("twincache-e2e-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (keyfile(&dir, "a"), keyfile(&dir, "b"));

    // Same key on both: data round-trips and the check passes.
    let good = [encrypted_worker(&a), encrypted_worker(&a)];
    let orch = Proc::orchestrator(&[good[0].addr, good[1].addr], &[]);
    let mut conn = TextConn::connect(orch.addr).await;
    let mut answer = String::new();
    for _ in 0..100 {
        answer = conn.request("set||secret||the plaintext").await;
        if answer == "0||" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer, "0||");
    assert_eq!(conn.request("get||secret").await, "0||the plaintext");
    let info = cluster_info_until(orch.addr.port(), "keys=ok");
    assert!(
        info.contains("keys=ok") && !info.contains("encryption=off"),
        "{info}"
    );

    // Different keys: reported in INFO and in the log.
    let bad = [encrypted_worker(&a), encrypted_worker(&b)];
    let orch = Proc::orchestrator(&[bad[0].addr, bad[1].addr], &[]);
    let info = cluster_info_until(orch.addr.port(), "keys=MISMATCH");
    assert!(info.contains("keys=MISMATCH"), "{info}");
    assert!(
        orch.log_text().contains("different encryption keys"),
        "{}",
        orch.log_text()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_key_files_are_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("twincache-e2e-badkeys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "abcdef").unwrap();
    for (path, want) in [
        (short.to_string_lossy().into_owned(), "64 hex"),
        ("/no/such/key".into(), "cannot read"),
    ] {
        let out = Command::new(WORKER)
            .args(["--port", "0", "--encryption-key-file", &path])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
