//! The twincache worker: stores the data of one half of a pair.
//!
//! A worker listens for binary frames (see `twincache_protocol::frame`) from orchestrators,
//! or from the client library directly, and answers each from its [`store::Store`]. Requests
//! are handled inline on the connection's task: every operation is a short, non-blocking map
//! access, so spawning a task per request would only add cost. Responses therefore leave in
//! request order, though the protocol would allow any order.
//!
//! Layout: [`config`] (flags), [`seal`] (stored byte layout: lz4, dictionaries, encryption),
//! [`store`] (the sharded tables, eviction, TTLs, typed entries, key-space walks),
//! [`exec`] (the Redis commands that read before they write, run on the pair's primary),
//! [`sync`] (snapshots and partner resync), [`map`] (the cluster map a worker keeps, and the
//! refusal of requests for slots its pair does not hold),
//! [`server`] (connections), [`http`] (`--http`: metrics and health), [`secret`] (memory
//! for the key and dictionary, kept out of core dumps and swap), [`wipe`] (no plaintext left
//! behind with encryption on).

pub mod adapter;
pub mod config;
pub mod exec;
pub mod http;
pub mod map;
pub mod seal;
pub mod secret;
pub mod server;
pub mod store;
pub mod sync;
pub mod wipe;

pub use config::Config;
pub use server::Worker;
