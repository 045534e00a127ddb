//! Shared start-up code for the `worker`, `orchestrator` and `twincache-bench` binaries:
//! logging and signal handling. The servers themselves live in the library crates.

use tokio_util::sync::CancellationToken;

/// The binaries' allocator. A cache frees and allocates millions of small blocks; glibc's
/// malloc spent a sixth of a worker's time coalescing them (`malloc_consolidate`) under a
/// SET-heavy load, where mimalloc keeps per-size free lists. Redis ships jemalloc for the
/// same reason.
#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc, asked the way C asks it. The `mimalloc` crate's allocator passes every
/// request to `mi_malloc_aligned`, and mimalloc 3 serves an aligned request whose size
/// class has no free block at hand, or whose class is not a power of two, by
/// over-allocating: a larger block than the size needs, and more instructions (a worker's
/// SET took 4% fewer without them, callgrind). A request whose alignment every block of its
/// size class has anyway (at most 16, with the size a multiple of it, as every Rust type's
/// layout is) goes to plain `mi_malloc` here; only the rest to the aligned calls. The same
/// change is proposed upstream (purpleprotocol/mimalloc_rust#170).
struct Mimalloc;

/// Whether a block of mimalloc's size class for `size` is aligned to `align` whatever it
/// is: a page's first block is 16-aligned (`MI_MAX_ALIGN_SIZE`), every class is a multiple
/// of 8, and the class of a multiple of 16 is one too (exact up to 64 bytes, then four
/// classes per doubling). A test allocates every such layout up to 64 KiB and checks.
fn natural(size: usize, align: usize) -> bool {
    align <= 16 && size.is_multiple_of(align)
}

/// `plain(size)` for a layout of natural alignment, else `aligned(size, align)`.
///
/// # Safety
/// As the two functions' own: mimalloc's allocation calls, which take any size.
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn by_alignment(
    layout: std::alloc::Layout,
    plain: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc's allocation calls take any size and a power-of-two alignment,
    // which a `Layout` guarantees.
    unsafe {
        if natural(size, align) {
            plain(size).cast()
        } else {
            aligned(size, align).cast()
        }
    }
}

// SAFETY: each call hands mimalloc the layout's size (and, where alignment is not natural,
// its alignment); `mi_free` and `mi_realloc` take any block mimalloc gave out, aligned or
// not, and a reallocation moved by `mi_realloc` is natural for the new size too.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: see the impl.
        unsafe { by_alignment(layout, mi_malloc, mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: see the impl.
        unsafe { by_alignment(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: see the impl.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        let align = layout.align();
        // SAFETY: see the impl.
        unsafe {
            if natural(new_size, align) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, align).cast()
            }
        }
    }
}

/// Logs to stderr at the level given by `RUST_LOG` (default `info`), so stdout carries only
/// the startup lines scripts read. `format` is `--log-format`: `text` for people, `json` for
/// log collectors (one object per line: `timestamp`, `level`, `target`, `fields` with the
/// message and the event's structured fields). Keys and values are never among them.
pub fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().with_current_span(false).init();
    } else {
        // Colour for a person at a terminal; plain text for log files and collectors.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// A token cancelled on the first SIGINT or SIGTERM; a second signal exits at once.
///
/// The handlers are installed before this returns, so call it before announcing readiness:
/// a signal that arrives right after the startup line is then never lost.
pub fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        tracing::info!("shutting down (signal again to exit at once)");
        t.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        std::process::exit(130);
    });
    token
}

/// A channel that ticks on every SIGHUP, the conventional "reload your files" signal. Each
/// subsystem that can reload subscribes (the receiver or a clone) and acts on every change:
/// TLS certificates (`NodeTls::reload_on`) and the orchestrator's cluster file
/// (`Orchestrator::reload_on`). Several SIGHUPs in a row may coalesce into one change, which
/// is all a reload needs. Drop the receiver if nothing subscribes, so the log can say that
/// nothing was reloaded.
///
/// The handler is installed before this returns, so call it before announcing readiness
/// (like [`shutdown_on_signal`]). Once installed, SIGHUP no longer ends the process, whether
/// or not anything subscribes.
pub fn reload_on_signal() -> tokio::sync::watch::Receiver<u64> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tx.receiver_count() {
                0 => tracing::info!("SIGHUP: nothing to reload"),
                n => tracing::info!(subscribers = n, "SIGHUP: reloading"),
            }
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    rx
}

/// Gives memory freed since the last call back to the system, at most once a second per
/// thread. mimalloc returns freed pages lazily, when the thread that owns them allocates
/// again; a thread that goes idle after a burst (a client's huge MGET, a resync) would keep
/// them. Called when a runtime thread runs out of work, so it costs nothing under load.
fn release_idle_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last.get().is_some_and(|t| now - t < Duration::from_secs(1)) {
            return;
        }
        last.set(Some(now));
        // SAFETY: mi_collect only walks the calling thread's heap and mimalloc's own
        // structures; it takes no pointers from us.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(true);
        }
    });
}

/// A tokio runtime with `threads` threads (0: one per CPU). One thread gets the
/// current-thread scheduler: a single event loop, where a woken task waits its turn behind
/// the tasks already ready, so many sessions' requests to a worker leave in one write.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let threads = resolve_threads(threads);
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(release_idle_memory)
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().on_thread_park(release_idle_memory).build()
    };
    built.unwrap_or_else(|e| fail(1, format_args!("cannot start the runtime: {e}")))
}

/// The threads `--threads` asks for; 0 chooses from the machine: one event loop on up to two
/// CPUs, else one thread per CPU. On two cores the servers share the machine with each
/// other and with their clients, and a second runtime thread mostly wakes and steals work
/// across cores: one event loop served GET and SET at -P1 with about 20% more ops/s
/// (`bench/peers.sh`, README's "Benchmarks").
pub fn resolve_threads(threads: usize) -> usize {
    match threads {
        0 => match std::thread::available_parallelism().map_or(1, usize::from) {
            cpus @ 3.. => cpus,
            _ => 1,
        },
        n => n,
    }
}

/// Logs the runtime [`runtime`] built for `threads`, so an operator sees what the default
/// chose on this machine.
pub fn log_runtime(threads: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let chosen = resolve_threads(threads);
    let how = if threads == 0 {
        "chosen from the CPUs (--threads sets it)"
    } else {
        "--threads"
    };
    if chosen == 1 {
        tracing::info!(cpus, "runtime: one event loop, {how}");
    } else {
        tracing::info!(cpus, threads = chosen, "runtime: {chosen} threads, {how}");
    }
}

/// Prints `error: <msg>` and exits with `code`; for start-up failures, which deserve a
/// clear line rather than a panic backtrace.
pub fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use std::alloc::Layout;

    /// Every layout the allocator sends to plain `mi_malloc` gets a block aligned as asked,
    /// allocated, zeroed and grown, with many blocks of each class live at once (so fresh
    /// pages and reused blocks are both seen).
    #[test]
    #[allow(unsafe_code)]
    fn natural_layouts_get_aligned_blocks() {
        for align in [1, 2, 4, 8, 16] {
            for size in (align..=64 << 10).step_by(align) {
                if size > 4096 && !size.is_multiple_of(1024) {
                    continue;
                }
                assert!(super::natural(size, align));
                let layout = Layout::from_size_align(size, align).unwrap();
                let mut blocks = Vec::new();
                for i in 0..8 {
                    // SAFETY: a non-zero size; each block is freed below with its layout.
                    let p = unsafe {
                        if i % 2 == 0 {
                            std::alloc::alloc(layout)
                        } else {
                            std::alloc::alloc_zeroed(layout)
                        }
                    };
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    blocks.push(p);
                }
                for p in blocks {
                    // SAFETY: `p` came from `alloc` with `layout`; the grown block is freed
                    // with the layout of its new size.
                    unsafe {
                        let grown = std::alloc::realloc(p, layout, size * 3);
                        assert!(!grown.is_null() && (grown as usize).is_multiple_of(align));
                        let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                        std::alloc::dealloc(grown, grown_layout);
                    }
                }
            }
        }
        assert!(!super::natural(24, 16) && !super::natural(64, 32));
    }
}
