//! `FrameCodec<Response>`, oversized frames included: see `twincache_fuzz::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twincache_protocol::frame::Response;

fuzz_target!(|data: &[u8]| twincache_fuzz::frames::<Response>(data));
