//! Network partitions between real processes, each in a Linux network namespace of its own.
//!
//! Every test builds a private network: one namespace per worker and per orchestrator, and a
//! veth link between every two of them and between each of them and the test's own namespace
//! (the "root" node, where the checker runs). A node has one address, 10.77.X.N (X a subnet
//! claimed by this test, see [`claim_subnet`]), put on each of its links as a point-to-point
//! address, so every node reaches every other one at the same address over a link of their
//! own, and cutting that link partitions exactly those two nodes. A cut puts a `blackhole`
//! qdisc on both ends of the link: every packet is dropped silently, as a pulled cable or a
//! firewall would, so connections hang rather than fail fast. (netem would do too, but this
//! kernel has no `sch_netem`; `blackhole` is built into every kernel with traffic control.)
//!
//! Where namespaces cannot be made (not root, no `ip` or `tc`), each test says why and passes.
//!
//! A [`Checker`] writes, deletes and reads through the orchestrators while the network fails,
//! remembering each key's last acknowledged value and what was attempted since; after healing
//! and resync, every key is read from both workers directly: no acknowledged write lost, no
//! deleted key back, both partners equal.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twincache_client::{Bytes, Client};
use twincache_protocol::slots::SlotMap;

use crate::faults::{fill, state_of, status, wait_status, FAST};
use crate::harness::{
    keygen, noise, on_worker, secret_of, Proc, RespConn, TempFile, ORCHESTRATOR, WORKER,
};
use crate::membership::{
    cluster_info, key_count, wait_exact_counts, wait_info, wait_settled, write_bulk,
};

const WORKER_PORT: u16 = 7001;
const ORCH_PORT: u16 = 7000;
/// The test's own namespace, where the checker runs.
const ROOT: &str = "root";

/// Runs `bin` with `args`; its stderr as the error if it fails.
fn run(bin: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{bin} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// SIGKILLs every process in namespace `ns`.
fn kill_all_in(ns: &str) {
    for pid in output("ip", &["netns", "pids", ns]).split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
}

/// Claims a /24 in 10.77.0.0/16 for this test, with a lock file in the temporary directory
/// naming the owning process, so tests running at once (in this process or another) never
/// share one. A lock left by a process that died is taken over, after removing what that
/// process left behind (its namespaces, and the root-side veths named after the subnet).
fn claim_subnet() -> Result<(u8, PathBuf), String> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    sweep_dead_tests();
    let pid = std::process::id();
    let start = pid as usize * 7 + NEXT.fetch_add(1, Ordering::Relaxed);
    for k in 0..512 {
        let x = ((start + k) % 256) as u8;
        let path = std::env::temp_dir().join(format!("twincache-netns-10.77.{x}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                writeln!(f, "{pid}").map_err(|e| e.to_string())?;
                // Someone without a lock (not a twincache test) may use it.
                if !output(
                    "ip",
                    &["-o", "addr", "show", "to", &format!("10.77.{x}.0/24")],
                )
                .trim()
                .is_empty()
                {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                return Ok((x, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner: Option<u32> = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                if let Some(owner) = owner {
                    if !std::path::Path::new(&format!("/proc/{owner}")).exists() {
                        remove_leftovers(owner, x);
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    Err("no free subnet in 10.77.0.0/16".into())
}

/// Removes what tests killed before their cleanup ran (SIGKILL, a power cut) left behind.
fn sweep_dead_tests() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(x) = name
            .strip_prefix("twincache-netns-10.77.")
            .and_then(|x| x.parse::<u8>().ok())
        else {
            continue;
        };
        let owner: Option<u32> = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(owner) = owner {
            if !std::path::Path::new(&format!("/proc/{owner}")).exists() {
                remove_leftovers(owner, x);
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Removes the namespaces of a dead test process `pid` and the root veths of subnet `x`.
fn remove_leftovers(pid: u32, x: u8) {
    let prefix = format!("tc-{pid}-");
    for line in output("ip", &["netns", "list"]).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        if ns.starts_with(&prefix) {
            kill_all_in(ns);
            let _ = run("ip", &["netns", "delete", ns]);
        }
    }
    let ifs = format!("tc{x}-");
    for line in output("ip", &["-o", "link", "show"]).lines() {
        // "5: tc12-w1@if3: <...": the name, without the peer after '@'.
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        if name.starts_with(&ifs) {
            let _ = run("ip", &["link", "delete", name]);
        }
    }
}

/// A test's private network. Dropping it kills every process in its namespaces and deletes
/// the namespaces and veths, also when the test panics.
pub struct Net {
    subnet: u8,
    /// `tc-<pid>-<test>`: every namespace's name starts with it.
    prefix: String,
    nodes: Vec<String>,
    /// Namespaces made so far (all of them once built).
    made: Vec<String>,
    lock: PathBuf,
}

impl Net {
    /// Builds namespaces for `nodes` (short names such as `w1`, `o1`), each linked to every
    /// other one and to the test's namespace.
    pub fn new(test: &str, nodes: &[&str]) -> Result<Net, String> {
        let (subnet, lock) = claim_subnet()?;
        let mut net = Net {
            subnet,
            prefix: format!("tc-{}-{test}", std::process::id()),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            made: Vec::new(),
            lock,
        };
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), String> {
        for node in self.nodes.clone() {
            let ns = self.ns(&node);
            run("ip", &["netns", "add", &ns])?;
            self.made.push(ns);
            self.ip_in(&node, &["link", "set", "lo", "up"])?;
        }
        // Cutting needs traffic control: try it once on a loopback.
        let first = self.nodes[0].clone();
        self.tc_in(&first, &["qdisc", "add", "dev", "lo", "root", "blackhole"])?;
        self.tc_in(&first, &["qdisc", "del", "dev", "lo", "root"])?;
        let nodes = self.nodes.clone();
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                self.link(a, b)?;
            }
            self.link(ROOT, a)?;
        }
        Ok(())
    }

    /// A veth between `a` (possibly the root) and `b`, each end with its node's address and
    /// the other's as peer.
    fn link(&self, a: &str, b: &str) -> Result<(), String> {
        let (ifa, ifb, nsb) = (self.if_name(a, b), self.if_name(b, a), self.ns(b));
        self.ip_in(
            a,
            &[
                "link", "add", "name", &ifa, "type", "veth", "peer", "name", &ifb, "netns", &nsb,
            ],
        )?;
        for (x, y, ifx) in [(a, b, &ifa), (b, a, &ifb)] {
            let (local, peer) = (format!("{}/32", self.ip(x)), format!("{}/32", self.ip(y)));
            self.ip_in(x, &["addr", "add", &local, "peer", &peer, "dev", ifx])?;
            self.ip_in(x, &["link", "set", ifx, "up"])?;
        }
        Ok(())
    }

    /// The name, at `at`, of the interface linking it to `to`. Root-side names carry the
    /// subnet, being in a namespace other tests share.
    fn if_name(&self, at: &str, to: &str) -> String {
        if at == ROOT {
            format!("tc{}-{to}", self.subnet)
        } else {
            format!("to-{to}")
        }
    }

    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    pub fn ip(&self, node: &str) -> Ipv4Addr {
        let host = match node {
            ROOT => 254,
            _ => self.nodes.iter().position(|n| n == node).expect("a node") as u8 + 1,
        };
        Ipv4Addr::new(10, 77, self.subnet, host)
    }

    fn ip_in(&self, node: &str, args: &[&str]) -> Result<(), String> {
        let ns = self.ns(node);
        let full: Vec<&str> = match node {
            ROOT => args.to_vec(),
            _ => [&["-n", ns.as_str()], args].concat(),
        };
        run("ip", &full)
    }

    fn tc_in(&self, node: &str, args: &[&str]) -> Result<(), String> {
        let ns = self.ns(node);
        let full: Vec<&str> = match node {
            ROOT => args.to_vec(),
            _ => [&["-n", ns.as_str()], args].concat(),
        };
        run("tc", &full)
    }

    /// Partitions `a` from `b`: every packet between them is dropped, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        for (x, y) in [(a, b), (b, a)] {
            let dev = self.if_name(x, y);
            self.tc_in(x, &["qdisc", "add", "dev", &dev, "root", "blackhole"])
                .unwrap();
        }
    }

    /// Undoes [`Net::cut`].
    pub fn heal(&self, a: &str, b: &str) {
        for (x, y) in [(a, b), (b, a)] {
            let dev = self.if_name(x, y);
            self.tc_in(x, &["qdisc", "del", "dev", &dev, "root"])
                .unwrap();
        }
    }

    /// Cuts the link between `a` and `b` and heals it again, once for each `(cut, up)` of
    /// `schedule` (milliseconds each).
    pub async fn flap(&self, a: &str, b: &str, schedule: &[(u64, u64)]) {
        for &(cut_ms, up_ms) in schedule {
            self.cut(a, b);
            tokio::time::sleep(Duration::from_millis(cut_ms)).await;
            self.heal(a, b);
            tokio::time::sleep(Duration::from_millis(up_ms)).await;
        }
    }

    pub fn start(&self, node: &str, bin: &str, args: &[String]) -> Proc {
        Proc::start_in_netns(&self.ns(node), bin, args)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.made {
            kill_all_in(ns);
        }
        // Deleting one end of a veth deletes both at once; a namespace's deletion would take
        // its links with it only once the kernel gets round to it.
        for node in &self.nodes {
            let _ = run("ip", &["link", "delete", &self.if_name(ROOT, node)]);
        }
        for ns in &self.made {
            if let Err(e) = run("ip", &["netns", "delete", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// One pair of workers (`w1`, `w2`), spare workers (`w3`, ...) started but in no pair, and
/// `orchestrators` orchestrators (`o1`, ...), each in its own namespace, with one cluster
/// secret.
struct Setup {
    // Dropped in this order: the processes, then their network.
    orchs: Vec<Proc>,
    workers: Vec<Proc>,
    worker_flags: Vec<String>,
    secret: TempFile,
    net: Net,
}

impl Setup {
    /// `None` (after saying why) where namespaces cannot be made.
    async fn start(test: &str, orchestrators: usize, worker_flags: &[&str]) -> Option<Setup> {
        Setup::start_with(test, orchestrators, 0, worker_flags, &[]).await
    }

    /// [`Setup::start`] with `spares` workers more, for a change to add, and `orch_flags` for
    /// every orchestrator.
    async fn start_with(
        test: &str,
        orchestrators: usize,
        spares: usize,
        worker_flags: &[&str],
        orch_flags: &[&str],
    ) -> Option<Setup> {
        let workers: Vec<String> = (1..=2 + spares).map(|i| format!("w{i}")).collect();
        let mut names = workers.clone();
        names.extend((1..=orchestrators).map(|i| format!("o{i}")));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let net = match Net::new(test, &names) {
            Ok(net) => net,
            Err(e) => {
                println!("skipping: cannot create network namespaces: {e}");
                return None;
            }
        };
        let mut s = Setup {
            orchs: Vec::new(),
            workers: Vec::new(),
            worker_flags: worker_flags.iter().map(|f| f.to_string()).collect(),
            secret: keygen(),
            net,
        };
        s.workers = workers.iter().map(|w| s.start_worker(w)).collect();
        for i in 1..=orchestrators {
            let node = format!("o{i}");
            let mut args: Vec<String> = vec![
                "--listen".into(),
                SocketAddr::from((s.net.ip(&node), ORCH_PORT)).to_string(),
                "--insecure".into(),
                "--cluster-secret-file".into(),
                s.secret.arg(),
            ];
            args.extend(FAST.iter().chain(orch_flags).map(|f| f.to_string()));
            for w in ["w1", "w2"] {
                args.push(s.net.ip(w).to_string());
                args.push(WORKER_PORT.to_string());
            }
            let orch = s.net.start(&node, ORCHESTRATOR, &args);
            s.orchs.push(orch);
        }
        for i in 0..orchestrators {
            s.both_in_sync(i).await;
        }
        Some(s)
    }

    fn start_worker(&self, node: &str) -> Proc {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            self.net.ip(node).to_string(),
            "--port".into(),
            WORKER_PORT.to_string(),
            "--cluster-secret-file".into(),
            self.secret.arg(),
        ];
        args.extend(self.worker_flags.iter().cloned());
        self.net.start(node, WORKER, &args)
    }

    /// SIGKILLs worker `i` (0: `w1`) and starts it again, with an empty store, at its address.
    fn restart_worker(&mut self, i: usize) {
        self.workers[i].kill();
        self.workers[i] = self.start_worker(&format!("w{}", i + 1));
    }

    /// Worker `i`'s address (0: `w1`).
    fn w(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.net.ip(&format!("w{}", i + 1)), WORKER_PORT))
    }

    /// Orchestrator `i`'s client address (0: `o1`).
    fn o(&self, i: usize) -> SocketAddr {
        self.orchs[i].addr
    }

    async fn both_in_sync(&self, orch: usize) {
        let (wa, wb) = (self.w(0), self.w(1));
        wait_status(self.o(orch), "both workers in sync", |s| {
            state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
        })
        .await;
    }

    async fn direct(&self, i: usize) -> Client {
        Client::builder()
            .cluster_secret(secret_of(&self.secret))
            .connect(&self.w(i).to_string())
            .await
            .unwrap()
    }

    /// Every key of `model` read from both workers directly, until both hold what was
    /// acknowledged and agree (bounded: a worker that merges its partner's data while serving
    /// may still be at it). Returns the keys checked.
    async fn verify(&self, model: &HashMap<String, KeyState>) -> usize {
        self.verify_pairs(model, &[[0, 1]], &SlotMap::even(1)).await;
        model.len()
    }

    /// [`Setup::verify`] for a cluster of `pairs` (workers by index) placed by `map`: a key is
    /// read from every worker, and must be on both of its pair and on no other (a worker
    /// refuses a key of a slot its pair does not hold, `Moved`, which reads as absent).
    /// Returns how many keys of `model` each pair holds (deleted ones not counted).
    async fn verify_pairs(
        &self,
        model: &HashMap<String, KeyState>,
        pairs: &[[usize; 2]],
        map: &SlotMap,
    ) -> Vec<usize> {
        let mut direct = Vec::new();
        for &[a, b] in pairs {
            direct.push([
                (self.w(a), self.direct(a).await),
                (self.w(b), self.direct(b).await),
            ]);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut problems = Vec::new();
            let mut held = vec![0; pairs.len()];
            for (key, st) in model {
                let home = map.pair_of(key.as_bytes());
                for (n, [(wa, a), (wb, b)]) in direct.iter().enumerate() {
                    let ga = read_on(a, key, n == home).await;
                    let gb = read_on(b, key, n == home).await;
                    if n != home {
                        for (w, got) in [(wa, &ga), (wb, &gb)] {
                            if got.is_some() {
                                problems.push(format!(
                                    "{key} on {w}, whose pair {n} does not hold its slot: {got:?}"
                                ));
                            }
                        }
                        continue;
                    }
                    for (w, got) in [(wa, &ga), (wb, &gb)] {
                        if !st.allows(got) {
                            let what = match st.acked {
                                Some(None) => "deleted key back",
                                _ => "acknowledged write lost",
                            };
                            problems.push(format!(
                                "{what}: {key} on {w} is {got:?}; last acknowledged {:?}, attempted since {:?}",
                                st.acked, st.pending
                            ));
                        }
                    }
                    if ga != gb {
                        problems.push(format!("partners differ on {key}: {ga:?} and {gb:?}"));
                    }
                    held[n] += usize::from(ga.is_some());
                }
            }
            if problems.is_empty() {
                return held;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} problems after healing and resync, first ones:\n{}\nstatus: {}",
                    problems.len(),
                    problems[..problems.len().min(20)].join("\n"),
                    status(self.o(0)).await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `orch`'s log shows worker `w` back in service only through a completed refill (never
/// from down, stale or joining straight to in sync), at least once.
fn assert_back_only_through_a_refill(orch: &Proc, w: SocketAddr) {
    let log = orch.log_text();
    let mine: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("worker={w} ")) && l.contains(r#"to="in_sync""#))
        .collect();
    assert!(
        mine.iter()
            .all(|l| l.contains(r#"from="resyncing""#) || l.contains(r#"from="unknown""#)),
        "{w} served again without a refill: {mine:#?}"
    );
    assert!(
        mine.iter().any(|l| l.contains("resync done")),
        "{w} never refilled: {mine:#?}"
    );
}

/// `key` on a worker, as the model holds values; `here`: whether the worker's pair holds it.
async fn read_on(c: &Client, key: &str, here: bool) -> Option<String> {
    on_worker(c, key, here)
        .await
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// What a key may hold: its last acknowledged value (`None` inside: deleted), or any write
/// attempted since that failed (it may have landed).
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    /// `None`: nothing acknowledged yet, so the key may be absent.
    acked: Option<Option<String>>,
    pending: Vec<Option<String>>,
}

impl KeyState {
    fn allows(&self, value: &Option<String>) -> bool {
        self.acked.as_ref().map_or(value.is_none(), |a| a == value) || self.pending.contains(value)
    }
}

type Model = Arc<Mutex<HashMap<String, KeyState>>>;

#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    errors: AtomicU64,
}

/// Clients writing (70%), deleting (10%) and reading (20%) keys of their own, each through
/// one of the orchestrators, until stopped.
struct Checker {
    stop: Arc<AtomicBool>,
    model: Model,
    counts: Arc<Counts>,
    /// The first errors and every stale read, for the report.
    errors: Arc<Mutex<Vec<String>>>,
    stale_reads: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Report {
    model: HashMap<String, KeyState>,
    acked: u64,
    errors: u64,
    stale_reads: Vec<String>,
}

impl Report {
    fn assert_no_stale_reads(&self) {
        assert!(
            self.stale_reads.is_empty(),
            "stale reads: {:#?}",
            self.stale_reads
        );
    }
}

impl Checker {
    async fn start(orchs: &[SocketAddr], clients: usize, keys: usize) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let model: Model = Arc::default();
        let counts: Arc<Counts> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let stale_reads: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut tasks = Vec::new();
        for t in 0..clients {
            let via = orchs[t % orchs.len()];
            // Longer than any answer the orchestrator gives while workers fail, so a call's
            // outcome is rarely unknown.
            let client = Client::builder()
                .timeout(Duration::from_secs(10))
                .connect(&via.to_string())
                .await
                .unwrap();
            let (stop, model, counts) = (stop.clone(), model.clone(), counts.clone());
            let (errors, stale_reads) = (errors.clone(), stale_reads.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("c{t}:{}", i % keys as u64);
                    let failed = match i % 10 {
                        0..=6 => {
                            let value = format!("c{t}:v{i}");
                            let r = client.set(&key, value.clone()).await;
                            let mut m = model.lock().unwrap();
                            let st = m.entry(key.clone()).or_default();
                            match r {
                                Ok(()) => {
                                    *st = KeyState {
                                        acked: Some(Some(value)),
                                        pending: Vec::new(),
                                    };
                                    None
                                }
                                Err(e) => {
                                    st.pending.push(Some(value));
                                    Some(e)
                                }
                            }
                        }
                        7 => {
                            let r = client.del(&key).await;
                            let mut m = model.lock().unwrap();
                            let st = m.entry(key.clone()).or_default();
                            match r {
                                Ok(_) => {
                                    *st = KeyState {
                                        acked: Some(None),
                                        pending: Vec::new(),
                                    };
                                    None
                                }
                                Err(e) => {
                                    st.pending.push(None);
                                    Some(e)
                                }
                            }
                        }
                        _ => match client.get::<Bytes>(&key).await {
                            Ok(got) => {
                                let got = got.map(|v| String::from_utf8_lossy(&v).into_owned());
                                let st = model.lock().unwrap().get(&key).cloned();
                                let st = st.unwrap_or_default();
                                if !st.allows(&got) {
                                    stale_reads.lock().unwrap().push(format!(
                                        "read {key} via {via}: {got:?}; acknowledged {:?}, attempted since {:?}",
                                        st.acked, st.pending
                                    ));
                                }
                                None
                            }
                            Err(e) => Some(e),
                        },
                    };
                    match failed {
                        None if i % 10 <= 7 => {
                            counts.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                        Some(e) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            let mut errors = errors.lock().unwrap();
                            if errors.len() < 10 {
                                errors.push(format!("op {i} on {key} via {via}: {e}"));
                            }
                        }
                    }
                    i += 1;
                }
            }));
        }
        Checker {
            stop,
            model,
            counts,
            errors,
            stale_reads,
            tasks,
        }
    }

    /// Writes and deletes acknowledged so far.
    fn acked(&self) -> u64 {
        self.counts.acked.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more writes have been acknowledged.
    async fn wait_acks(&self, n: u64, what: &str) {
        let want = self.acked() + n;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.acked() < want {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {n} more writes acknowledged",
                n + self.acked() - want
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self, test: &str) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let report = Report {
            model: self.model.lock().unwrap().clone(),
            acked: self.counts.acked.load(Ordering::Relaxed),
            errors: self.counts.errors.load(Ordering::Relaxed),
            stale_reads: self.stale_reads.lock().unwrap().clone(),
        };
        println!(
            "{test}: {} writes and deletes acknowledged, {} errors returned to clients, {} stale reads, {} keys",
            report.acked,
            report.errors,
            report.stale_reads.len(),
            report.model.len()
        );
        for e in self.errors.lock().unwrap().iter() {
            println!("{test}: client error: {e}");
        }
        for r in report.stale_reads.iter().take(10) {
            println!("{test}: stale read: {r}");
        }
        report
    }
}

/// Case 1: orchestrator `o1` loses worker `w1` (but `w1` still sees `w2`): writes go on
/// through `w2` alone, and once the link heals `w1` resyncs before it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_cut_from_one_worker_writes_through_its_partner() {
    let Some(s) = Setup::start("cut1", 1, &[]).await else {
        return;
    };
    let (o, w1) = (s.o(0), s.w(0));
    let checker = Checker::start(&[o], 4, 100).await;
    checker.wait_acks(500, "before the cut").await;
    s.net.cut("o1", "w1");
    wait_status(o, "w1 down", |st| state_of(st, &w1) == "down").await;
    checker.wait_acks(1000, "writes through w2 alone").await;
    s.net.heal("o1", "w1");
    s.both_in_sync(0).await;
    checker.wait_acks(200, "after healing").await;
    let report = checker.stop("cut1").await;
    report.assert_no_stale_reads();
    let keys = s.verify(&report.model).await;
    assert!(keys >= 300, "only {keys} keys checked");
    assert_back_only_through_a_refill(&s.orchs[0], w1);
}

/// Case 2: `w1` restarts empty and refills from `w2`, and the link between them is cut
/// mid-refill for longer than a refill waits for a stalled partner. The orchestrator still
/// sees both. `w1` must not be in sync until a refill completes, and one must, once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_cut_from_each_other_mid_resync_finish_it_after_healing() {
    // 4,000 values of 1,000 bytes at 1 MB/s: a refill takes about 4 s.
    let slow = ["--resync-rate-limit", "1MB", "--dictionary-size", "0"];
    let Some(mut s) = Setup::start("cut2", 1, &slow).await else {
        return;
    };
    let (o, w1) = (s.o(0), s.w(0));
    const BULK: usize = 4000;
    fill(o, BULK).await;
    let checker = Checker::start(&[o], 2, 100).await;
    checker.wait_acks(200, "before the restart").await;
    s.restart_worker(0);
    wait_status(o, "w1 resyncing", |st| state_of(st, &w1) == "resyncing").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.net.cut("w1", "w2");
    // A refill gives up on a partner silent for 10 s: hold the cut longer than that, and
    // watch that w1 never counts as in sync meanwhile.
    let until = Instant::now() + Duration::from_secs(12);
    let mut promoted_once = false;
    while Instant::now() < until {
        let st = status(o).await;
        if state_of(&st, &w1) == "in_sync" {
            // The orchestrator logs a transition just after making it: give it a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let log = s.orchs[0].log_text();
            let promoted = format!("partner down: serving this worker's copy worker={w1} ");
            if log.contains(&promoted) {
                // A health check of w2 timed out (a loaded machine): the documented
                // promotion, whose reads the test below checks.
                println!("cut2: w1 promoted while the orchestrator missed w2: {st}");
                promoted_once = true;
            } else {
                panic!(
                    "w1 in sync while cut from its source: {st}\norchestrator:\n{log}\nw1:\n{}\nw2:\n{}",
                    s.workers[0].log_text(),
                    s.workers[1].log_text()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.workers[0].log_text().contains("refill failed"),
        "the cut did not interrupt the refill; w1's log:\n{}",
        s.workers[0].log_text()
    );
    s.net.heal("w1", "w2");
    s.both_in_sync(0).await;
    checker.wait_acks(200, "after healing").await;
    let report = checker.stop("cut2").await;
    report.assert_no_stale_reads();
    // The bulk data must reach the refilled worker whole, too.
    let mut model = report.model;
    model.extend(
        (0..BULK)
            .step_by(7)
            .map(|n| (format!("bulk:{n}"), bulk_state(n))),
    );
    s.verify(&model).await;
    if !promoted_once {
        // (A promoted worker completes a merge instead, which changes no state.)
        assert_back_only_through_a_refill(&s.orchs[0], w1);
    }
}

/// What `fill` acknowledged for `bulk:<n>`.
fn bulk_state(n: usize) -> KeyState {
    let value = String::from_utf8_lossy(&noise(n as u64, 1000)).into_owned();
    KeyState {
        acked: Some(Some(value)),
        pending: Vec::new(),
    }
}

/// Case 2 with a blip: while `w1` refills from `w2` and the link between them is cut, the
/// orchestrator loses `w2` for a moment. It promotes `w1`'s partial copy ("partner down:
/// serving this worker's copy", by design). Once `w2` answers again, both are in sync, and
/// reads must go to `w2`'s complete copy first: before `read_rank`, they alternated, and
/// `w1` answered "not found" for the keys it had not received (89 of 200 in one run) for as
/// long as the workers could not reach each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_blip_mid_resync_does_not_leave_a_partial_copy_serving() {
    let slow = ["--resync-rate-limit", "1MB", "--dictionary-size", "0"];
    let Some(mut s) = Setup::start("blip", 1, &slow).await else {
        return;
    };
    let (o, w1, w2) = (s.o(0), s.w(0), s.w(1));
    const BULK: usize = 4000;
    fill(o, BULK).await;
    s.restart_worker(0);
    wait_status(o, "w1 resyncing", |st| state_of(st, &w1) == "resyncing").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.net.cut("w1", "w2");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.net.cut("o1", "w2");
    wait_status(o, "w2 down", |st| state_of(st, &w2) == "down").await;
    s.net.heal("o1", "w2");
    let st = wait_status(o, "both in sync again", |st| {
        state_of(st, &w1) == "in_sync" && state_of(st, &w2) == "in_sync"
    })
    .await;
    // Both workers answer the orchestrator, and w2 holds every key: none may read as absent.
    let c = Client::connect(&o.to_string()).await.unwrap();
    let mut absent = Vec::new();
    for n in (0..BULK).step_by(20) {
        if c.get::<Bytes>(format!("bulk:{n}")).await.unwrap().is_none() {
            absent.push(n);
        }
    }
    let after = status(o).await;
    s.net.heal("w1", "w2");
    assert!(
        absent.is_empty(),
        "{} of {} acknowledged keys read as absent through the orchestrator (status before: {st}, after: {after}); first: bulk:{:?}",
        absent.len(),
        BULK / 20,
        &absent[..absent.len().min(10)]
    );
    // Healed, w1 merges w2's data: both end with every key.
    let model = (0..BULK)
        .step_by(7)
        .map(|n| (format!("bulk:{n}"), bulk_state(n)))
        .collect();
    s.verify(&model).await;
}

/// Case 3: two orchestrators in front of one pair; `o1` loses `w1` while `o2` sees both.
/// `o1` writes to `w2` alone and records that `w1` missed them (`partner_missed`, the
/// partners' `solo` counts); `o2` must learn from the counts that `w1` lacks writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_that_disagree_about_a_worker() {
    let Some(s) = Setup::start("cut3", 2, &[]).await else {
        return;
    };
    let (o1, o2, w1) = (s.o(0), s.o(1), s.w(0));
    let checker = Checker::start(&[o1, o2], 4, 100).await;
    checker.wait_acks(500, "before the cut").await;
    s.net.cut("o1", "w1");
    wait_status(o1, "w1 down for o1", |st| state_of(st, &w1) == "down").await;
    checker
        .wait_acks(1000, "writes during the disagreement")
        .await;
    println!("cut3: o2 during the cut: {}", status(o2).await);
    s.net.heal("o1", "w1");
    s.both_in_sync(0).await;
    s.both_in_sync(1).await;
    checker.wait_acks(200, "after healing").await;
    let report = checker.stop("cut3").await;
    // Reads through o2 may see w1's old copy for up to a health interval: documented in
    // architecture.md ("Limits"), so they are reported above, not failed.
    s.verify(&report.model).await;
    assert_back_only_through_a_refill(&s.orchs[0], w1);
    assert_back_only_through_a_refill(&s.orchs[1], w1);
}

/// A flapping link's cuts and the pauses after them, in milliseconds: cuts from shorter than
/// a health check's timeout to several health intervals.
const FLAPS: &[(u64, u64)] = &[(150, 300), (600, 200), (100, 100), (1200, 500), (250, 700)];

/// Case 4: the link between `o1` and `w1` flaps while clients write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_between_orchestrator_and_worker() {
    let Some(s) = Setup::start("flap", 1, &[]).await else {
        return;
    };
    let o = s.o(0);
    let checker = Checker::start(&[o], 4, 100).await;
    checker.wait_acks(300, "before flapping").await;
    s.net.flap("o1", "w1", FLAPS).await;
    s.both_in_sync(0).await;
    checker.wait_acks(200, "after flapping").await;
    let report = checker.stop("flap").await;
    report.assert_no_stale_reads();
    s.verify(&report.model).await;
    // A cut too short for any write to time out may leave w1 nothing to catch up on (down,
    // then in sync again: its data is established); the longest one cannot. Its refill may
    // end while a later cut hides it from `o1` (which then finds it covering its partner's
    // writes: "its data is established"), so a refill started is what is asked for; the
    // data is checked above.
    let log = s.orchs[0].log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("worker={} ", s.w(0))) && l.contains(r#"to="resyncing""#)),
        "w1 never refilled:\n{log}"
    );
}

/// Case 5: a pair (`w3`, `w4`) added through `o1` while links the move depends on flap:
/// first the one the copy takes from the old pair (`w1`-`w3`: receiving worker i pulls from
/// sending worker i), then `o1`'s to a receiving worker (`o1`-`w3`: `o1` finds it down, skips
/// it for a batch's copy and has it refill from `w4`). Clients write through `o1` and `o2`,
/// which follows the map through the workers. Afterwards every key is on both workers of the
/// pair the new map gives it and on no other, and the old pair's own counts show it dropped
/// the moved keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_added_while_a_link_flaps() {
    // Half of 4,000 values of 1,000 bytes move, at 256 KiB/s to each receiving worker: about
    // 8 s of copying, longer than both flapping phases together.
    let moves = ["--move-rate-limit", "256KiB", "--move-batch-slots", "1024"];
    let Some(s) = Setup::start_with("padd", 2, 2, &[], &moves).await else {
        return;
    };
    let (o1, o2) = (s.o(0), s.o(1));
    const BULK: usize = 4000;
    // (Retrying writes turned away while a busy worker misses a health check.)
    write_bulk(o1, BULK as u64).await;
    let checker = Checker::start(&[o1, o2], 4, 100).await;
    checker.wait_acks(300, "before the change").await;
    let (w3, w4) = (s.w(2).to_string(), s.w(3).to_string());
    let reply = RespConn::connect(o1)
        .await
        .call(&[b"CLUSTER", b"ADDPAIR", w3.as_bytes(), w4.as_bytes()])
        .await;
    assert_eq!(&reply[..], b"+OK\r\n");
    let started = Instant::now();
    wait_info(o1, "a move under way", |i| i.contains("move_current")).await;
    s.net.flap("w1", "w3", FLAPS).await;
    let info = cluster_info(o1).await;
    assert!(
        info.contains("move_current"),
        "the move ended before o1-w3 flapped: {info}"
    );
    s.net.flap("o1", "w3", FLAPS).await;
    let two = SlotMap::even(1).rebalanced(&[true; 2]);
    let info = wait_settled(o1, &[8192, 8192]).await;
    assert!(
        info.contains(&format!("slots:{}", two.describe())),
        "{info}"
    );
    println!("padd: the change took {:?}", started.elapsed());
    wait_settled(o2, &[8192, 8192]).await;
    checker.wait_acks(200, "after the change").await;
    let report = checker.stop("padd").await;
    report.assert_no_stale_reads();
    let mut model = report.model;
    model.extend((0..BULK).map(|n| (format!("bulk:{n}"), bulk_state(n))));
    let held = s.verify_pairs(&model, &[[0, 1], [2, 3]], &two).await;
    assert!(held[1] > BULK / 3, "pair 1 holds only {held:?} keys");
    // Every key is in the model, so a worker holding more than its pair's share kept keys
    // moved away (the drops and sweeps run within a round or two of the change's end).
    let s = &s;
    let counts = wait_exact_counts(
        &held,
        |i| async move { key_count(&s.direct(i).await).await },
    )
    .await;
    println!("padd: key counts per worker: {counts}");
}
