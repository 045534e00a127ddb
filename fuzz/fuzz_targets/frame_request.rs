//! `FrameCodec<Request>`: see `twincache_fuzz::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twincache_protocol::frame::Request;

fuzz_target!(|data: &[u8]| twincache_fuzz::frames::<Request>(data));
