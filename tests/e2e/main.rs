//! End-to-end tests: real `worker` and `orchestrator` processes on loopback ports, driven
//! through raw TCP (as netcat would) and through the client library.

mod harness;

mod adapter;
mod cli;
mod client;
mod commands;
mod consistency;
mod deploy;
mod differential;
mod faults;
mod limits;
mod membership;
mod migrate;
mod ops;
mod partition;
mod readme;
mod resp;
mod rmw;
mod robustness;
mod security;
mod storage;
mod text;
mod tls;
