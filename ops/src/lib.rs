//! What the worker and the orchestrator share to be operated: the bounded HTTP server behind
//! `--http` ([`http`]) and metric storage whose hot-path cost is a relaxed atomic add,
//! exposed through the official Prometheus client crate ([`metrics`]).
//!
//! A crate of its own so that the client library, which shares `twincache-protocol`, does
//! not pull in an HTTP server.

pub mod http;
pub mod metrics;
pub mod workers;
