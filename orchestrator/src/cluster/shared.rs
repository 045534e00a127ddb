//! The cluster map shared through the workers, so that any number of orchestrators route
//! by one map.
//!
//! - **Every worker keeps the map** (`map set`, op 24) and refuses a request for a slot its
//!   pair does not hold with `Moved` and its epoch (`protocol::cluster_map::Holding`). A
//!   request routed by an older map is thus never served in the wrong place: the
//!   orchestrator reads the newer map from the worker that refused, and routes it again
//!   ([`Router::reroute`]).
//! - **One orchestrator at a time changes the map**: it holds a lease granted by a majority
//!   of the map's workers ([`Router::take_lease`]), renewed while the change runs, and
//!   before each step it publishes the next map to the workers ([`Router::publish`]), then
//!   routes by it. A move's source pair must take the map before the copy starts, so no
//!   write routed by the old map lands there after it.
//! - **The others follow**: a health check sees each worker's `map_epoch`; one behind is
//!   sent the map, one ahead means the map changed elsewhere, and it is read and routed by
//!   ([`Router::adopt_from`]), wanted list included, so no orchestrator undoes another's
//!   change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use twincache_protocol::cluster_map::ClusterMap;
use twincache_protocol::frame::Op;
use twincache_protocol::{Response, Status};

use super::membership::{losing_slots, map_of, pairs_now, pairs_of};
use super::{Pair, Router, Topology, WorkerLink, WorkerState};

/// How long the right to change the map lasts unless renewed: an orchestrator that dies
/// during a change holds the others up this long.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a change under way renews its lease.
pub(super) const LEASE_RENEW: Duration = Duration::from_secs(2);
/// How many times one request refused with `Moved` is routed again before it fails.
pub(super) const REROUTES: usize = 4;

/// Why the lease for changes was not granted.
#[derive(Debug)]
pub(super) enum NoLease {
    /// Another orchestrator holds it (who, and for how long): waiting is all there is to do.
    Held(String),
    /// Too few workers answered: an error to show.
    TooFew(String),
}

impl std::fmt::Display for NoLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoLease::Held(who) => write!(
                f,
                "another orchestrator holds the lease for changes ({who})"
            ),
            NoLease::TooFew(why) => f.write_str(why),
        }
    }
}

impl Router {
    fn instance_id(&self) -> String {
        format!("{:016x}", self.instance)
    }

    /// Sends a `map` request to `w`; its answer, whatever its status.
    async fn map_call(&self, w: &WorkerLink, value: String) -> Option<Response> {
        self.control(w, Op::Map, value).await
    }

    /// `map set`: `text` (a map) to `w` as a worker of pair `pair` of it (`None`: of none).
    async fn send_map(&self, w: &WorkerLink, pair: Option<usize>, text: &str) -> Option<Response> {
        let pair = pair.map_or_else(|| "-".to_string(), |n| n.to_string());
        let set = format!("set {pair} {}\n{text}", self.instance_id());
        self.map_call(w, set).await
    }

    /// Takes (or renews) the right to change the map: granted by more than half of the
    /// map's workers, so no two orchestrators hold it at once.
    pub(super) async fn take_lease(&self) -> Result<(), NoLease> {
        let topo = self.pairs();
        let workers: Vec<&Arc<WorkerLink>> = topo.iter().flat_map(|p| &p.workers).collect();
        let ask = format!("lease {} {}", self.instance_id(), LEASE_TTL.as_millis());
        let answers = join_all(workers.iter().map(|w| self.map_call(w, ask.clone()))).await;
        let mut granted = 0;
        let mut holder = None;
        for r in answers.iter().flatten().filter(|r| r.status == Status::Ok) {
            match r.payload.strip_prefix(b"held ") {
                Some(rest) => holder = Some(String::from_utf8_lossy(rest).into_owned()),
                None if &r.payload[..] == b"granted" => granted += 1,
                None => {}
            }
        }
        // More than half granted; or, with workers down, every one that answered (a single
        // pair with a dead worker must still be able to replace it).
        let silent_are_down = answers.iter().zip(&workers).all(|(a, w)| {
            a.is_some()
                || !matches!(
                    w.state(),
                    WorkerState::InSync | WorkerState::Resyncing | WorkerState::Stale
                )
        });
        if holder.is_none() && (granted * 2 > workers.len() || (granted > 0 && silent_are_down)) {
            return Ok(());
        }
        Err(match holder {
            Some(h) => NoLease::Held(format!("instance and ms left: {h}")),
            None => NoLease::TooFew(format!(
                "only {granted} of {} workers granted the lease for changes (more than half \
                 must, or all but those down)",
                workers.len()
            )),
        })
    }

    /// Gives the lease up (on every worker that answers), so another orchestrator may change
    /// the map at once.
    pub(super) async fn release_lease(&self) {
        let topo = self.pairs();
        let ask = format!("release {}", self.instance_id());
        join_all(
            topo.iter()
                .flat_map(|p| &p.workers)
                .map(|w| self.map_call(w, ask.clone())),
        )
        .await;
    }

    /// Sends `map` to every worker of `topo` (its pairs). A worker named in `required` must
    /// take it, or the step fails; another that does not answer gets it from a health check
    /// when it does (until then it refuses what the new map gives its pair, and the
    /// orchestrator that sees the refusal sends it the map).
    pub(super) async fn publish(
        &self,
        topo: &Topology,
        map: &ClusterMap,
        required: &[String],
    ) -> Result<(), String> {
        let text = map.text();
        let sends = topo.iter().enumerate().flat_map(|(n, p)| {
            let text = &text;
            p.workers
                .iter()
                .map(move |w| async move { (w, self.send_map(w, Some(n), text).await) })
        });
        for (w, answer) in join_all(sends).await {
            match answer {
                Some(r) if r.status == Status::Ok => {}
                Some(r) => {
                    return Err(format!(
                        "{} refused the cluster map of epoch {}: {}",
                        w.addr,
                        map.epoch(),
                        String::from_utf8_lossy(&r.payload)
                    ))
                }
                None if required.contains(&w.addr) => {
                    return Err(format!(
                        "{} did not take the cluster map of epoch {}",
                        w.addr,
                        map.epoch()
                    ))
                }
                None => tracing::info!(
                    worker = %w.addr,
                    epoch = map.epoch(),
                    "no answer to the new cluster map: it gets it when it answers again"
                ),
            }
        }
        Ok(())
    }

    /// Sends `map` to workers it leaves out (`map set -`), so that they refuse every keyed
    /// request: one routed by an older map that still has them is then refused, where the
    /// partner (whose slots did not change) would take it and the worker that replaced
    /// them would miss it. Best effort: one that does not answer is down, or dead.
    pub(super) async fn publish_to_leaving(&self, leaving: &[Arc<WorkerLink>], map: &ClusterMap) {
        if leaving.is_empty() {
            return;
        }
        let text = map.text();
        let answers = join_all(leaving.iter().map(|w| self.send_map(w, None, &text))).await;
        for (w, answer) in leaving.iter().zip(answers) {
            if !answer.is_some_and(|r| r.status == Status::Ok) {
                tracing::warn!(
                    worker = %w.addr,
                    epoch = map.epoch(),
                    "a worker leaving the cluster did not take the map that leaves it out"
                );
            }
        }
    }

    /// Makes sure this orchestrator routes by the newest map the workers hold, before it
    /// changes anything: a worker ahead (or at the same epoch with another map: a change
    /// raced ours) is adopted. Returns whether a map was adopted.
    pub(super) async fn catch_up(&self) -> Result<bool, String> {
        let topo = self.pairs();
        let ours = map_of(&topo, &[]);
        let epoch = topo.slots.epoch();
        let links: Vec<Arc<WorkerLink>> = topo.iter().flat_map(|p| p.workers.clone()).collect();
        drop(topo);
        let answers = join_all(links.iter().map(|w| self.map_call(w, "get".into()))).await;
        let mut best: Option<(u64, &Arc<WorkerLink>)> = None;
        for (w, r) in links.iter().zip(&answers) {
            let Some((e, text)) = r.as_ref().and_then(held_map) else {
                continue;
            };
            let ahead = e > epoch || (e == epoch && !places_alike(text, &ours));
            if ahead && best.is_none_or(|(b, _)| e > b) {
                best = Some((e, w));
            }
        }
        match best {
            Some((_, w)) => self.adopt_from(w).await,
            None => Ok(false),
        }
    }

    /// Health round: a worker behind gets this orchestrator's map (it restarted, or was down
    /// when the map changed); a worker ahead means another orchestrator changed the map,
    /// which is read from it and routed by.
    pub(crate) async fn compare_epochs(&self, epochs: &[(Arc<WorkerLink>, u64)]) {
        let topo = self.pairs();
        let ours = topo.slots.epoch();
        if let Some((w, seen)) = epochs
            .iter()
            .filter(|(_, e)| *e > ours)
            .max_by_key(|(_, e)| *e)
        {
            if let Err(e) = self.adopt_newer(w, *seen).await {
                tracing::warn!(worker = %w.addr, "cannot read the newer cluster map: {e}");
            }
            return;
        }
        let behind: Vec<&Arc<WorkerLink>> = epochs
            .iter()
            .filter(|(_, e)| *e < ours)
            .map(|(w, _)| w)
            .collect();
        if behind.is_empty() {
            return;
        }
        let text = map_of(&topo, &self.membership.wanted()).text();
        for w in behind {
            let Some(n) = topo
                .iter()
                .position(|p| p.workers.iter().any(|x| x.addr == w.addr))
            else {
                continue;
            };
            match self.send_map(w, Some(n), &text).await {
                Some(r) if r.status == Status::Ok => {
                    tracing::info!(worker = %w.addr, epoch = ours, "sent the cluster map")
                }
                // Another orchestrator holds the lease, or has a newer map: it sends it.
                _ => {}
            }
        }
    }

    /// Reads the map `w` holds and, if it is newer than this orchestrator's (or as new but
    /// different: a change that raced ours won), routes by it: its pairs (links kept where
    /// the workers are the same), its slots and move, and its wanted list, so this
    /// orchestrator does not undo the change. Returns whether it did.
    pub(crate) async fn adopt_from(&self, w: &WorkerLink) -> Result<bool, String> {
        let _one = self.swapping.lock().await;
        self.adopt_locked(w).await
    }

    /// [`Router::adopt_from`] `w`, seen holding a map of `epoch` (newer than ours), unless
    /// by the time the lock is ours this orchestrator routes by a map that new: requests
    /// refused at once all see the same newer map, and each reading of it is a round trip
    /// made under the lock, in line.
    pub(crate) async fn adopt_newer(&self, w: &WorkerLink, epoch: u64) -> Result<bool, String> {
        let _one = self.swapping.lock().await;
        if self.pairs().slots.epoch() >= epoch {
            return Ok(false);
        }
        self.adopt_locked(w).await
    }

    /// [`Router::adopt_from`] with the lock for map changes held.
    async fn adopt_locked(&self, w: &WorkerLink) -> Result<bool, String> {
        let answer = self
            .map_call(w, "get".into())
            .await
            .ok_or_else(|| format!("{} did not answer", w.addr))?;
        let (epoch, text) =
            held_map(&answer).ok_or_else(|| format!("{} answered no map", w.addr))?;
        let now = self.pairs();
        let ours = map_of(&now, &[]);
        if epoch < now.slots.epoch() || (epoch == now.slots.epoch() && places_alike(text, &ours)) {
            return Ok(false);
        }
        let map = ClusterMap::parse(text)
            .map_err(|e| format!("{}'s cluster map cannot be read: {e}", w.addr))?;
        let (topo, retired) = self.topology_of(&now, &map);
        self.assess_new(&topo, &now).await;
        let before = pairs_now(&now);
        // The orchestrator that moved slots away from a pair drops them there once its map is
        // in; but its step may have failed after only some workers took the map (a lost
        // lease), and then nothing would ever drop them. Sweeps make sure, once the lease is
        // free.
        let losing = losing_slots(&now, &topo);
        drop(now);
        self.write_state(&topo, &pairs_of(&map.wanted)).await?;
        let wanted = pairs_of(if map.wanted.is_empty() {
            &map.workers
        } else {
            &map.wanted
        });
        let asked = self.membership.wanted();
        if asked != wanted && asked != before {
            tracing::warn!(
                "a change asked for here is dropped: another orchestrator changed the cluster \
                 first; ask again if it is still wanted"
            );
        }
        self.membership.adopt_wanted(wanted);
        self.topology.store(Arc::new(topo));
        self.moved.notify_waiters();
        for w in &losing {
            self.sweep_later(w);
        }
        for link in retired {
            link.retire(self.worker_timeout * 2);
        }
        tracing::info!(
            epoch,
            from = %w.addr,
            pairs = map.pairs(),
            slots = %map.slots.describe(),
            moving = ?map.moving,
            "routing by the cluster map another orchestrator made"
        );
        Ok(true)
    }

    /// The topology `map` describes, keeping the pairs and links of `now` where their
    /// workers are the same; and the links of `now` it no longer has.
    fn topology_of(&self, now: &Topology, map: &ClusterMap) -> (Topology, Vec<Arc<WorkerLink>>) {
        let mut links: HashMap<&str, &Arc<WorkerLink>> = HashMap::new();
        for w in now.iter().flat_map(|p| &p.workers) {
            links.insert(&w.addr, w);
        }
        let pairs: Vec<Arc<Pair>> = map
            .workers
            .chunks(2)
            .map(|ab| {
                let same = now
                    .iter()
                    .find(|p| p.workers[0].addr == ab[0] && p.workers[1].addr == ab[1]);
                match same {
                    Some(p) => p.clone(),
                    None => {
                        let link = |a: &String| match links.get(a.as_str()) {
                            Some(l) => Arc::clone(l),
                            None => self.spawn_link(a),
                        };
                        Arc::new(Pair::new([link(&ab[0]), link(&ab[1])]))
                    }
                }
            })
            .collect();
        let retired = now
            .iter()
            .flat_map(|p| &p.workers)
            .filter(|w| !map.workers.contains(&w.addr))
            .cloned()
            .collect();
        (
            Topology {
                pairs,
                slots: map.slots.clone(),
                moving: map.moving,
            },
            retired,
        )
    }

    /// After a worker refused a request with `Moved`: brings this orchestrator and that
    /// worker to the same map (the worker's if newer, else ours sent to it, or a moment for
    /// our own change to be swapped in), so routing the request again can succeed.
    pub(crate) async fn reroute(&self, refused: &Response) {
        let text = String::from_utf8_lossy(&refused.payload);
        let mut words = text.split(' ');
        let epoch: u64 = words.next().and_then(|e| e.parse().ok()).unwrap_or(0);
        let addr = words.next().unwrap_or("");
        let topo = self.pairs();
        let ours = topo.slots.epoch();
        let link = topo
            .iter()
            .flat_map(|p| &p.workers)
            .find(|w| w.addr == addr)
            .cloned();
        drop(topo);
        match link {
            Some(w) if epoch > ours => {
                if let Err(e) = self.adopt_newer(&w, epoch).await {
                    tracing::warn!(worker = %w.addr, "cannot read the newer cluster map: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Some(w) if epoch < ours => {
                self.compare_epochs(&[(w, epoch)]).await;
            }
            // Same epoch: this orchestrator published a map and is about to route by it.
            _ => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), self.moved.notified()).await;
            }
        }
    }
}

/// Whether the map `text` places keys as `ours` does (the same pairs, slots and move under
/// way; what a change wants aside): two such maps route alike. A text that does not parse
/// does not.
fn places_alike(text: &str, ours: &ClusterMap) -> bool {
    ClusterMap::parse(text).is_ok_and(|m| {
        m.workers == ours.workers && m.slots.same_owners(&ours.slots) && m.moving == ours.moving
    })
}

/// A `map get` answer: the epoch and the text (none if the worker holds no map).
fn held_map(r: &Response) -> Option<(u64, &str)> {
    if r.status != Status::Ok {
        return None;
    }
    let text = std::str::from_utf8(&r.payload).ok()?;
    let (epoch, map) = text.split_once('\n')?;
    let epoch: u64 = epoch.trim().parse().ok()?;
    (epoch > 0).then_some((epoch, map))
}
