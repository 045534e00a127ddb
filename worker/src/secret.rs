//! Memory for the worker's secrets: the encryption key and the compression dictionary.
//!
//! A core dump of a worker, or its pages written to swap, must not hand out what encryption
//! protects. The key would open every stored value, and a dictionary is made of plaintext
//! values. So each secret gets its own anonymous mapping (whole pages, apart from the heap):
//!
//! - `MADV_DONTDUMP` leaves the mapping out of core dumps (gcore and the kernel's alike).
//! - `mlock` keeps it out of swap. It may fail (`RLIMIT_MEMLOCK`, often 64 KiB in containers
//!   and 8 MiB elsewhere); the worker then runs on, once warning that the secrets may be
//!   swapped.
//! - The bytes are wiped before the mapping is returned to the system.
//!
//! All of it through `memmap2`'s safe API: this crate keeps `unsafe_code = "forbid"`.
//!
//! A secret takes at least a page (4 KiB), which is why only the key and the dictionary live
//! here; values are protected by wiping instead (`crate::wipe`).

use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Advice, MmapMut};
use zeroize::Zeroize;

/// Set once a warning about locking has been logged: one is enough.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Bytes kept out of core dumps and swap, wiped when dropped.
pub struct SecretBuf {
    mem: Backing,
    len: usize,
}

enum Backing {
    Mapped(MmapMut),
    /// When no mapping can be had (the address space is exhausted): at least wiped on drop.
    Heap(Box<[u8]>),
}

impl SecretBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> SecretBuf {
        let mem = match map(len) {
            Ok(map) => Backing::Mapped(map),
            Err(e) => {
                warn_once(format_args!(
                    "cannot map memory for secrets ({e}); the encryption key and the \
                     dictionary stay on the heap, where core dumps and swap can see them"
                ));
                Backing::Heap(vec![0; len].into_boxed_slice())
            }
        };
        SecretBuf { mem, len }
    }

    /// A copy of `bytes` (the caller wipes its own).
    pub fn copy_of(bytes: &[u8]) -> SecretBuf {
        let mut secret = SecretBuf::zeroed(bytes.len());
        secret.as_mut_slice().copy_from_slice(bytes);
        secret
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.mem {
            Backing::Mapped(m) => &m[..self.len],
            Backing::Heap(b) => &b[..self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Backing::Mapped(m) => &mut m[..self.len],
            Backing::Heap(b) => &mut b[..self.len],
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the bytes are kept out of core dumps (false only on the heap fallback).
    pub fn excluded_from_dumps(&self) -> bool {
        matches!(self.mem, Backing::Mapped(_))
    }
}

/// A mapping of at least `len` bytes (and at least one byte: empty mappings do not exist),
/// left out of core dumps, and locked into memory if the limit allows.
fn map(len: usize) -> std::io::Result<MmapMut> {
    let map = MmapMut::map_anon(len.max(1))?;
    map.advise(Advice::DontDump)?;
    if let Err(e) = map.lock() {
        warn_once(format_args!(
            "cannot lock the encryption key and dictionary into memory ({e}); they may be \
             written to swap. Raise the locked-memory limit (ulimit -l, LimitMEMLOCK=) to \
             keep them out"
        ));
    }
    Ok(map)
}

fn warn_once(msg: std::fmt::Arguments<'_>) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg}");
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        // The whole mapping, not just `len`: pages are the unit, and nothing past `len` is
        // written, but wiping a page costs nothing next to unmapping it.
        match &mut self.mem {
            Backing::Mapped(m) => m[..].zeroize(),
            Backing::Heap(b) => b.zeroize(),
        }
    }
}

impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps (`dd`: left out
    /// of core dumps; `lo`: locked).
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.to_string());
                }
            }
        }
        None
    }

    #[test]
    fn secrets_are_copied_and_left_out_of_core_dumps() {
        let secret = SecretBuf::copy_of(b"0123456789abcdef");
        assert_eq!(secret.as_slice(), b"0123456789abcdef");
        assert_eq!(secret.len(), 16);
        assert!(secret.excluded_from_dumps());
        let flags = vm_flags(secret.as_slice().as_ptr() as usize).expect("a mapping");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn empty_secrets_work() {
        let mut empty = SecretBuf::zeroed(0);
        assert!(empty.is_empty());
        assert_eq!(empty.as_mut_slice(), b"");
    }
}
