//! Wire formats shared by every twincache component.
//!
//! Everything that crosses a socket is defined here, once, so the orchestrator, the workers and
//! the client library can never disagree about a byte:
//!
//! - [`status`]: the response codes, shared by the text protocol (`code||message`) and the
//!   binary frames.
//! - [`frame`]: length-prefixed binary frames with request ids. One format serves both the
//!   orchestrator-to-worker link and the binary client protocol, so a client can talk to a
//!   worker directly (handy for debugging and for the tests).
//! - [`text`]: the netcat-friendly line protocol (`get||key`, `set||key||value`, ...).
//! - [`resp`]: RESP2 and RESP3, the Redis protocol (commands in, replies out).
//! - [`program`]: what the orchestrator asks a worker to run on its keys (INCR, HSET,
//!   EXPIRE ... and transactions), the changes it sends the partner, key-space walks.
//! - [`glob`]: Redis' glob patterns (SCAN MATCH, KEYS, CONFIG GET).
//! - [`auth`]: cluster authentication (the handshake every connection to a worker opens with).
//! - [`budget`]: memory held for connections (per process and per connection).
//! - [`coverage`]: what partners know of each other's writes (in a worker's `status`).
//! - [`info`]: the `name:value` text of workers' `stats` and `status` answers.
//! - [`outgoing`]: bytes waiting to be written, large values written from where they lie.
//! - [`hash`]: the stable key hash and hash tags.
//! - [`slots`]: placement: a key's slot, and the map of slots to pairs.
//! - [`cluster_map`]: the pairs and slot map as text, shared through the workers, and what
//!   one worker may serve under it.
//! - [`server`]: the accept loop both servers share (connection cap, graceful shutdown).
//! - [`units`]: parsing of human durations and sizes used by the command lines.
//! - [`version`]: the layout of write versions (time, counter, orchestrator id).

pub mod auth;
pub mod budget;
pub mod cluster_map;
pub mod coverage;
pub mod durable;
pub mod frame;
pub mod glob;
pub mod hash;
pub mod info;
pub mod outgoing;
pub mod program;
pub mod resp;
pub mod server;
pub mod slots;
pub mod status;
pub mod text;
pub mod units;
pub mod version;

#[cfg(test)]
mod test_support;

pub use frame::{FrameCodec, FrameError, Op, Request, Response};
pub use status::Status;
