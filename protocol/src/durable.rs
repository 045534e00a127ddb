//! Files that must survive a crash whole: the orchestrator's state file, migration
//! checkpoints.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` so that a crash or power loss leaves either the old file or
/// the new one: a temporary file in the same directory, synced, renamed over it, and the
/// directory synced (the rename is durable only then). The temporary file is removed if a
/// step fails.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        super::write_file(&path, b"one").unwrap();
        super::write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.join("state.tmp").exists());
        let missing = dir.join("no-such-dir").join("state");
        assert!(super::write_file(&missing, b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
