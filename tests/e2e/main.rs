//! End-to-end tests: real `worker` and `orchestrator` processes on loopback ports, driven
//! through raw TCP (as netcat would) and through the client library.

mod harness;

mod adapter;
mod cli;
mod client;
mod consistency;
mod deploy;
mod faults;
mod limits;
mod migrate;
mod ops;
mod partition;
mod readme;
mod resp;
mod robustness;
mod security;
mod storage;
mod text;
mod tls;
