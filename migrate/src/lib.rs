//! `twincache-migrate`: moves the keys nobody touches, and reshapes the values, so that a Redis
//! migration can be finished.
//!
//! Adapter mode (`worker --source --destination`) moves a key when the application reads or
//! writes it. This crate is the bulk side of the same job, run by an operator:
//!
//! - `copy`: every key of a source Redis (SCAN with MATCH/TYPE) into a destination, with its
//!   remaining TTL, by DUMP/RESTORE in deep pipelines; big keys in chunks; resumable from a
//!   checkpoint; optionally transforming JSON values on the way.
//! - `verify`: compares source and destination key by key (type, value digest, TTL).
//! - `schema check|diff|push|list`: the schema registry of seed 003 (a directory of schema
//!   files and one `migrations.json`).
//! - `transform`: migrates values in place to a schema version, with compare-and-set writes,
//!   a backup, and a checkpoint.
//! - `rollback`: puts back what a transform changed, from its backup.
//!
//! Layout: [`cli`] (flags and dispatch), [`redis_io`] (connections, scripts, reply decoding),
//! [`scan`] (the SCAN engine every bulk verb runs on: batches, concurrency, checkpoints,
//! rate limit), [`checkpoint`], [`report`] (progress and summary), [`copy`], [`verify`],
//! [`registry`] (schemas, migrations, version graph, the embedded script language),
//! [`document`] (a Redis value as a JSON document, and its version), [`transform`],
//! [`backup`] (backup file and rollback), [`glob`].
//!
//! Nothing here writes a value half-way: a small key moves in one RESTORE, a big one is built
//! under a temporary name and renamed into place, and an in-place rewrite is one script that
//! first checks the value is still the one that was read.

#![forbid(unsafe_code)]

pub mod backup;
pub mod checkpoint;
pub mod cli;
pub mod copy;
pub mod document;
/// Redis' glob patterns, shared with the workers' SCAN MATCH.
pub use twincache_protocol::glob;
pub mod redis_io;
pub mod registry;
pub mod report;
pub mod scan;
pub mod transform;
pub mod verify;

mod error;

pub use error::Error;

/// What a finished run tells the shell: 0 all is well, 1 `verify` found differences (or a
/// run had keys it could not handle), 2 the command could not run (see [`Error::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Differences,
}
