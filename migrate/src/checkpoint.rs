//! The checkpoint file: where a bulk run stands, so that a run stopped by a crash, `kill -9`
//! or Ctrl-C can go on with `--resume` and handle every key once.
//!
//! A SCAN cursor alone is not enough, because batches run concurrently and finish out of
//! order, and a batch killed half-way has written some of its keys. So the file holds:
//!
//! - `cursor`: every key the scan returned before this cursor is done;
//! - `done`: keys of later batches that are finished (skipped when the scan meets them again);
//! - `inflight`: keys of batches that were started and not finished. Each batch is recorded
//!   here, durably, *before* it writes anything (write-ahead), so after a crash these are
//!   exactly the keys that may or may not have been written. A resumed run handles them
//!   first, knowing that a key already in the destination was probably put there by the run
//!   itself (and counts it as copied, not as someone else's key).
//! - `tally`: the counts of the finished batches, so the final summary covers every run.
//!
//! The file is JSON (keys base64), written to `FILE.tmp`, fsynced, and renamed over `FILE`:
//! a reader sees the old state or the new one, never half of one. Writes are group-committed
//! by [`crate::scan`]: one write covers every batch registered since the previous one.

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::report::Tally;
use crate::Error;

const FORMAT: &str = "twincache-migrate-checkpoint";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub format: String,
    pub version: u32,
    /// What run this is (verb, servers without passwords, filters): `--resume` refuses a
    /// checkpoint of another run.
    pub run: String,
    pub cursor: String,
    pub finished: bool,
    pub done: Vec<String>,
    pub inflight: Vec<String>,
    pub tally: Tally,
}

impl Checkpoint {
    pub fn new(run: &str) -> Checkpoint {
        Checkpoint {
            format: FORMAT.into(),
            version: 1,
            run: run.into(),
            cursor: "0".into(),
            ..Default::default()
        }
    }

    /// Reads `path`; a file that is not a checkpoint of `run` is an error (exit 2).
    pub fn load(path: &Path, run: &str) -> Result<Checkpoint, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::malformed(path, e))?;
        let cp: Checkpoint = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(path, format!("not a checkpoint file: {e}")))?;
        if cp.format != FORMAT || cp.version != 1 {
            return Err(Error::malformed(
                path,
                "not a version 1 twincache-migrate checkpoint",
            ));
        }
        if cp.run != run {
            return Err(Error::malformed(
                path,
                format!(
                    "checkpoint of another run ({}), not of this one ({run})",
                    cp.run
                ),
            ));
        }
        cp.cursor
            .parse::<u64>()
            .map_err(|_| Error::malformed(path, format!("bad cursor `{}`", cp.cursor)))?;
        for k in cp.done.iter().chain(&cp.inflight) {
            decode_key(k).map_err(|e| Error::malformed(path, e))?;
        }
        Ok(cp)
    }

    /// Writes the checkpoint atomically (`durable::write_file`).
    pub fn store(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec(self).map_err(|e| Error::malformed(path, e))?;
        twincache_protocol::durable::write_file(path, &text).map_err(|e| Error::io(path, e))
    }
}

pub fn encode_key(key: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

pub fn decode_key(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("bad base64 `{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_runs() {
        let dir = std::env::temp_dir().join(format!("twm-cp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cp.json");
        let mut cp = Checkpoint::new("copy a b");
        cp.cursor = "42".into();
        cp.inflight = vec![encode_key(b"k\n\xff")];
        cp.tally.done = 7;
        cp.store(&path).unwrap();
        assert_eq!(Checkpoint::load(&path, "copy a b").unwrap(), cp);
        let e = Checkpoint::load(&path, "copy a c").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        std::fs::write(&path, "{not json").unwrap();
        assert!(Checkpoint::load(&path, "copy a b").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
