//! Writes fjall's journal back to the disk a little at a time, so that a checkpoint finds it
//! (almost) clean.
//!
//! The embedded store applies every batch to fjall without a sync (its commit log is what makes a
//! batch durable) and persists fjall's journal only at a checkpoint, before the commit log starts
//! its next segment (`fjall_store.rs`). By then the journal holds ~32 MiB of dirty pages, and the
//! `fsync` that writes them out held the store's writer lock for 20–30 ms on the project's VM:
//! every commit of every worker stalled once per segment. This thread asks the kernel to start
//! writing the journal back every [`EVERY`] (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`: it
//! waits for nothing and promises nothing, it only moves the writeback earlier), which is what
//! RocksDB's `wal_bytes_per_sync` does for its own log. Each call then submits the few hundred
//! KiB written since the previous one, a small write in the disk's queue instead of tens of
//! megabytes at once.
//!
//! fjall keeps its journal as `<dir>/<id>.jnl`, the active one having the highest id (fjall 3).
//! That is fjall's private layout: if it changes, this thread finds no journal and does nothing,
//! and the checkpoints are as slow as before, never wrong.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the journal's new pages are handed to the disk.
const EVERY: Duration = Duration::from_millis(20);
/// How often the directory is looked at again for a newer journal (fjall starts a new one when
/// its memtables are flushed).
const RESCAN: Duration = Duration::from_secs(1);

/// The running thread; stopped and joined when dropped.
#[derive(Debug)]
pub(crate) struct Trickle {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Trickle {
    /// Starts writing back the journal of the fjall database in `dir`.
    pub(crate) fn start(dir: &Path) -> std::io::Result<Trickle> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (dir, s) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("store-trickle".into())
            .spawn(move || run(&dir, &s))?;
        Ok(Trickle {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(dir: &Path, stop: &(Mutex<bool>, Condvar)) {
    let mut journal: Option<(u64, File)> = None;
    let mut scanned: Option<Instant> = None;
    let mut stopped = stop.0.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        stopped = stop
            .1
            .wait_timeout(stopped, EVERY)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if *stopped {
            return;
        }
        if scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            scanned = Some(Instant::now());
            if let Some((id, path)) = active_journal(dir) {
                if journal.as_ref().is_none_or(|(have, _)| *have != id) {
                    journal = File::open(&path).ok().map(|f| (id, f));
                }
            }
        }
        if let Some((_, f)) = &journal {
            // Errors are ignored: this only moves work earlier, and the checkpoint's own `fsync`
            // reports what matters.
            let _ = crate::commit_log::write_back(f, 0, 0, false);
        }
    }
}

/// The journal fjall writes to: the `<id>.jnl` in `dir` with the highest id.
pub(crate) fn active_journal(dir: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_suffix(".jnl")?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_active_journal_is_the_one_with_the_highest_id() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(active_journal(dir.path()), None);
        for name in ["0.jnl", "7.jnl", "12.jnl", "99.txt", "x.jnl", "lock"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            active_journal(dir.path()),
            Some((12, dir.path().join("12.jnl")))
        );
    }

    /// The store's own fjall database has its journal where this thread looks: if fjall moves
    /// it, this fails instead of the writeback silently doing nothing.
    #[test]
    fn a_fjall_database_keeps_its_journal_where_the_trickle_looks() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::FjallStore::open(dir.path()).unwrap();
        let (_, path) = active_journal(dir.path()).expect("fjall's journal");
        assert!(std::fs::metadata(&path).unwrap().is_file());
        drop(store);
    }

    /// Dirty pages of `file` in the page cache (`cachestat`, Linux 6.5), `None` where the kernel
    /// does not have it.
    fn dirty_pages(file: &File) -> Option<u64> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        let range = Range { off: 0, len: 0 };
        let mut stat = Stat::default();
        // SAFETY: cachestat(2) reads `range` and writes `stat`, both live and of the kernel's
        // layout; 451 is its number on every architecture.
        let r = unsafe {
            libc::syscall(
                451,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0,
            )
        };
        (r == 0).then_some(stat.dirty)
    }

    #[test]
    fn the_thread_writes_the_journal_back_long_before_the_kernel_would_and_stops_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5.jnl");
        std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        let Some(dirty) = dirty_pages(&f) else {
            eprintln!("skipped: this kernel has no cachestat(2) to count dirty pages");
            return;
        };
        if dirty == 0 {
            eprintln!("skipped: this filesystem keeps no dirty pages (tmpfs?)");
            return;
        }
        // The kernel itself writes a dirty page back after `dirty_expire_centisecs` (30 s by
        // default); the thread does it within a few of its rounds.
        let t = Trickle::start(dir.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while dirty_pages(&f) != Some(0) {
            assert!(
                Instant::now() < deadline,
                "still {:?} dirty pages",
                dirty_pages(&f)
            );
            std::thread::sleep(EVERY);
        }
        drop(t);
    }
}
