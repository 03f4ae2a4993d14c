//! The commit log of the embedded store: where a commit becomes durable, with one `fdatasync` of
//! a write into space that is already allocated, so a sync changes no file size and no metadata
//! and costs what the disk costs (~0.07 ms on the project's VM) instead of an ext4 journal commit.
//!
//! fjall's own journal cannot be driven that way: it appends to a file that grows with every
//! batch, so each synced batch changes the file size and its `fdatasync` waits for a metadata
//! journal commit (and, behind it, for the writeback of whatever else the filesystem is
//! flushing). So the store syncs this log instead and applies each batch to fjall without a sync;
//! fjall persists its journal only at a *checkpoint*, and a recovery replays the log's tail.
//!
//! ```text
//! dir/seg-0 … seg-{N-1}   fixed set of segment files, reused in a ring
//! segment := header (32 bytes) record*
//! header  := magic "IMCLOG01" generation:u64 first_seq:u64 crc32:u32 zero:u32
//! record  := len:u32 crc32:u32 seq:u64 payload (len bytes)      crc32 over seq and payload
//! ```
//! All integers big-endian. A segment file grows in zero-filled chunks of [`CHUNK`] bytes (one
//! `fsync` per chunk, not per commit) and is then overwritten in place, lap after lap.
//!
//! **Space ahead of the writer.** Growing a segment (zeros written, then an `fsync` for the new
//! size) costs milliseconds on a disk, and every [`CHUNK`] of records needs it in the first lap
//! (a fresh store, or one whose records grew). A thread of the log's own (`commitlog-space`)
//! therefore grows the current segment [`AHEAD`] bytes in front of the writer, and the whole next
//! segment once the current one is half written, so a commit only writes into space that is
//! already there, and from the second segment on the segment being written never grows. The
//! writer grows a segment itself only if it catches up with that thread (or the thread failed,
//! e.g. on a full disk: the commit then gets the error).
//!
//! Growing must not stall the committers. An `fsync` that finds megabytes of dirty zeros holds
//! the file (ext4 takes the inode lock to write its metadata, and the writers' `pwrite`s wait for
//! it) and fills the disk's queue in front of their `fdatasync`s: 10–30 ms stalls once per
//! [`CHUNK`] on the project's VM. So the zeros go out [`PIECE`] bytes at a time, each written
//! back at once (`sync_file_range`, data only), the space thread pausing [`PACE`] between pieces;
//! the final `fsync` then has only the new size to write.
//!
//! **Sequence numbers.** Every record has the next `seq` (1, 2, …); the segment header says the
//! seq of its first record and its *generation* (1 for the first segment ever started, +1 for each
//! segment started after it). A reader scans a segment record after record and stops at the first
//! one whose length, checksum or seq is not the expected one: that is the end of what was written
//! in this lap (a torn write, zeros, or a record of an older lap, whose seq is always lower).
//!
//! **Group commit.** Writing a record and syncing it are two steps: [`CommitLog::write`] (under
//! the caller's writer lock) puts the record in the file, and [`Syncer::sync`] (no writer lock)
//! returns once it is durable. One `fdatasync` covers every record written before it started, so
//! committers that write while another one syncs are covered by the next sync together, or find
//! theirs already covered: with several logic workers on one store, a sync serves all of them.
//! A failed sync poisons the log: every later sync fails too (after a failed `fdatasync` the
//! kernel may have dropped the dirty pages, so a later successful one proves nothing).
//!
//! **Checkpoints and reuse.** Before a segment is started (and so before an older lap of it is
//! overwritten) the caller's checkpoint runs: the store persists fjall, after which every record
//! written before the segment that is ending is durable in fjall and the log holds nothing else
//! that is needed (the store hands the dedup and msg-index writes of the ending segment's
//! records to fjall in the background, before the next checkpoint: see `fjall_store`).
//!
//! **Recovery** ([`CommitLog::open`]): the caller says up to which seq its state is durable
//! (`applied`, which the store writes into fjall with every batch); the log hands back every
//! record after it and every record since the checkpoint before the last one (the newest two
//! segments', when the older of them leads into the newer), in order, and goes on writing after
//! the last valid record. Replaying a record again is harmless (its
//! writes are plain puts and deletes, re-applied in order), and it repairs a store whose
//! recovery kept a later batch and lost an earlier one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Header of a segment.
const MAGIC: &[u8; 8] = b"IMCLOG01";
const HEADER: u64 = 32;
/// Bytes before a record's payload.
const RECORD_HEAD: u64 = 16;
/// A segment file grows by this many zero bytes at a time.
pub(crate) const CHUNK: u64 = 1 << 20;
/// The space thread keeps this many bytes allocated in front of the writer.
const AHEAD: u64 = 4 * CHUNK;
/// Zeros are written and written back this many bytes at a time while a segment grows ...
const PIECE: u64 = 128 << 10;
/// ... and the space thread pauses this long between two pieces, so that its writes never queue
/// up in front of the committers' syncs.
const PACE: Duration = Duration::from_micros(500);

/// Sizes of the ring.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogShape {
    /// Number of segment files; at least 2: a crash replays the newest two, so starting a
    /// segment must never overwrite the one before it.
    pub segments: usize,
    /// A segment is left for the next one once a record would end past this many bytes (a
    /// single record larger than a segment still fits: its segment grows for it).
    pub segment_bytes: u64,
}

impl Default for LogShape {
    fn default() -> LogShape {
        LogShape {
            segments: 4,
            segment_bytes: 32 << 20,
        }
    }
}

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    #[error("commit log I/O")]
    Io(#[from] io::Error),
    /// Records after what the caller has durably applied are missing: the log was damaged or
    /// belongs to another store.
    #[error(
        "commit log {dir}: the store has applied up to seq {applied}, but the log continues only \
         at seq {found}"
    )]
    Gap {
        dir: PathBuf,
        applied: u64,
        found: u64,
    },
    /// A segment written after another does not continue it.
    #[error("commit log {dir}: segment of generation {generation} starts at seq {first_seq}, want {want}")]
    Broken {
        dir: PathBuf,
        generation: u64,
        first_seq: u64,
        want: u64,
    },
}

struct Segment {
    file: Arc<File>,
    /// 0 while the file holds no valid header (never started).
    generation: u64,
    first_seq: u64,
}

/// The allocated length of every segment, shared by the writer and the space thread.
#[derive(Debug)]
struct Space {
    files: Vec<Arc<File>>,
    /// Length of each segment file whose size is durable: every byte below it is allocated.
    lens: Vec<AtomicU64>,
    /// Held while a segment grows (by the space thread, or by a writer that caught up with it).
    growing: Vec<Mutex<()>>,
    /// What the writer asked the space thread for, per segment.
    want: Mutex<Want>,
    wake: Condvar,
    /// The space thread hit an error and stopped working ahead.
    failed: AtomicBool,
    /// Segments the writer had to grow itself (for tests and benchmarks).
    inline_grows: AtomicU64,
}

#[derive(Debug)]
struct Want {
    len: Vec<u64>,
    /// The segment being written: its growth goes first.
    writing: usize,
    stop: bool,
}

impl Space {
    fn len(&self, i: usize) -> u64 {
        self.lens[i].load(Ordering::Acquire)
    }

    /// Makes sure bytes `..end` of segment `i` exist on disk (zero-filled, size synced). The
    /// zeros are written back [`PIECE`] by [`PIECE`] as they are written, with a pause of
    /// [`PACE`] between pieces when `paced` (the space thread; a writer that caught up with it
    /// grows at full speed).
    fn grow(&self, i: usize, end: u64, paced: bool) -> io::Result<()> {
        let _g = self.growing[i].lock().unwrap_or_else(|p| p.into_inner());
        let len = self.len(i);
        if end <= len {
            return Ok(());
        }
        let new_len = end.div_ceil(CHUNK) * CHUNK;
        let zeros = vec![0u8; PIECE as usize];
        let mut at = len;
        while at < new_len {
            let n = (new_len - at).min(PIECE);
            self.files[i].write_all_at(&zeros[..n as usize], at)?;
            write_back(&self.files[i], at, n, true)?;
            at += n;
            if paced && at < new_len {
                std::thread::sleep(PACE);
            }
        }
        self.files[i].sync_all()?;
        self.lens[i].store(new_len, Ordering::Release);
        Ok(())
    }

    /// Asks the space thread to grow segment `i` to `len` bytes; `writing` is the segment the
    /// writer is in.
    fn ask(&self, i: usize, len: u64, writing: usize) {
        let mut w = self.want.lock().unwrap_or_else(|p| p.into_inner());
        w.writing = writing;
        if w.len[i] < len {
            w.len[i] = len;
            self.wake.notify_one();
        }
    }

    /// The space thread: grows segments to what the writer asked for until told to stop, at most
    /// [`AHEAD`] bytes at a time and the segment being written first, so that growing the whole
    /// next segment never keeps the writer waiting for room in its own.
    fn run(&self) {
        loop {
            let (i, len) = {
                let mut w = self.want.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if w.stop {
                        return;
                    }
                    let job = next_job(&w, |i| self.len(i));
                    if let (Some(job), false) = (job, self.failed.load(Ordering::Relaxed)) {
                        break job;
                    }
                    w = self.wake.wait(w).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Err(e) = self.grow(i, len, true) {
                tracing::warn!("commit log: growing segment {i} ahead of the writer failed: {e}");
                self.failed.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// The space thread's next growth, `(segment, length)`, given what was asked and what each
/// segment `has`: the segment being written first, and at most [`AHEAD`] bytes at a time.
fn next_job(want: &Want, has: impl Fn(usize) -> u64) -> Option<(usize, u64)> {
    let needs = |i: usize| want.len[i] > has(i);
    let i = Some(want.writing)
        .filter(|&i| needs(i))
        .or_else(|| (0..want.len.len()).find(|&i| needs(i)))?;
    Some((i, want.len[i].min(has(i) + AHEAD)))
}

/// Makes written records durable, shared by every committer of a store (group commit, see the
/// module docs).
#[derive(Debug)]
pub(crate) struct Syncer {
    /// The segment file the newest record went to, and that record's seq. Set by the writer
    /// after each record (a record in an older segment was synced when the writer left it).
    tail: Mutex<(Option<Arc<File>>, u64)>,
    /// Held through an `fdatasync`: committers queue here and most find their record covered.
    synced: Mutex<Synced>,
    /// Notified after every sync, for a committer that lingers (see [`Syncer::sync_after_handoff`]).
    covered: Condvar,
    /// `fdatasync` calls made (for tests and benchmarks).
    syncs: AtomicU64,
    /// [`Synced::upto`], readable without the lock.
    durable: AtomicU64,
}

#[derive(Debug)]
struct Synced {
    /// Every record up to this seq is durable.
    upto: u64,
    /// A sync failed: the log can no longer promise anything.
    poisoned: bool,
    /// A committer is lingering: another one that hands off does not linger too, it syncs.
    lingering: bool,
}

impl Syncer {
    fn new(upto: u64) -> Syncer {
        Syncer {
            tail: Mutex::new((None, upto)),
            synced: Mutex::new(Synced {
                upto,
                poisoned: false,
                lingering: false,
            }),
            covered: Condvar::new(),
            syncs: AtomicU64::new(0),
            durable: AtomicU64::new(upto),
        }
    }

    /// Returns once record `seq` (already written) is durable: at once if a sync that started
    /// after it was written has finished, else after one `fdatasync` that covers every record
    /// written so far.
    pub(crate) fn sync(&self, seq: u64) -> io::Result<()> {
        let synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_locked(synced, seq)
    }

    /// [`Syncer::sync`] for a committer that has just handed work to another committer of the
    /// same log (a logic worker that passed appends to another worker right after writing its
    /// record): that one's record will follow this one's, and the sync it makes then covers
    /// both. So this committer waits up to `linger` for a sync that covers its record before it
    /// syncs itself: one `fdatasync` for the two records instead of one each, one after the
    /// other. At most one committer lingers at a time; another one that hands off while one
    /// lingers syncs at once (covering both), so two committers never wait for each other.
    pub(crate) fn sync_after_handoff(&self, seq: u64, linger: Duration) -> io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if !synced.poisoned && synced.upto < seq && !synced.lingering && !linger.is_zero() {
            synced.lingering = true;
            let deadline = Instant::now() + linger;
            loop {
                let now = Instant::now();
                if synced.poisoned || synced.upto >= seq || now >= deadline {
                    break;
                }
                synced = self
                    .covered
                    .wait_timeout(synced, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            synced.lingering = false;
            if !synced.poisoned && synced.upto >= seq {
                crate::LOG_HANDOFFS_COVERED.fetch_add(1, Ordering::Relaxed);
            } else {
                crate::LOG_HANDOFFS_SYNCED.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sync_locked(synced, seq)
    }

    fn sync_locked(&self, mut synced: MutexGuard<'_, Synced>, seq: u64) -> io::Result<()> {
        if synced.poisoned {
            return Err(io::Error::other(
                "an earlier fdatasync of the commit log failed",
            ));
        }
        if synced.upto >= seq {
            return Ok(());
        }
        let (file, upto) = {
            let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            (t.0.clone(), t.1)
        };
        debug_assert!(upto >= seq, "record {seq} synced before it was written");
        if let Some(file) = file {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            let began = std::time::Instant::now();
            let r = file.sync_data();
            crate::LOG_SYNC_SECONDS.observe(began.elapsed());
            if let Err(e) = r {
                synced.poisoned = true;
                self.covered.notify_all();
                return Err(e);
            }
        }
        synced.upto = upto;
        self.durable.store(upto, Ordering::Release);
        self.covered.notify_all();
        Ok(())
    }

    /// Every record up to this seq is durable (no lock: it may be a little behind).
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// `fdatasync` calls made so far.
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// The log's writer. Not shared: the store holds it behind its writer lock; the [`Syncer`] it
/// hands out is.
pub(crate) struct CommitLog {
    dir: PathBuf,
    shape: LogShape,
    segs: Vec<Segment>,
    /// Index of the segment being written (`None` before the first record ever).
    cur: Option<usize>,
    /// Write offset in the current segment.
    pos: u64,
    next_seq: u64,
    buf: Vec<u8>,
    syncer: Arc<Syncer>,
    space: Arc<Space>,
    /// The space thread; joined when the log is dropped.
    space_thread: Option<JoinHandle<()>>,
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        self.space
            .want
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.space.wake.notify_all();
        if let Some(t) = self.space_thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitLog")
            .field("dir", &self.dir)
            .field("cur", &self.cur)
            .field("pos", &self.pos)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_be_bytes());
    h.update(payload);
    h.finalize()
}

fn header_bytes(generation: u64, first_seq: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&generation.to_be_bytes());
    h[16..24].copy_from_slice(&first_seq.to_be_bytes());
    let c = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&c.to_be_bytes());
    h
}

/// `(generation, first_seq)` of a valid header.
fn parse_header(h: &[u8]) -> Option<(u64, u64)> {
    if h.len() < HEADER as usize || &h[..8] != MAGIC {
        return None;
    }
    let c = u32::from_be_bytes(h[24..28].try_into().ok()?);
    if crc32fast::hash(&h[..24]) != c {
        return None;
    }
    let generation = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let first_seq = u64::from_be_bytes(h[16..24].try_into().ok()?);
    (generation > 0).then_some((generation, first_seq))
}

/// Reads the whole of `file` into `data` (positional reads: the file's cursor is not used).
fn read_whole(file: &File, data: &mut Vec<u8>) -> io::Result<()> {
    data.clear();
    data.resize(file.metadata()?.len() as usize, 0);
    file.read_exact_at(data, 0)
}

/// Scans the records of one segment from `first_seq`: calls `f` for each valid one and returns
/// (offset after the last valid record, seq after it).
fn scan(
    data: &[u8],
    first_seq: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), LogError>,
) -> Result<(u64, u64), LogError> {
    let mut pos = HEADER as usize;
    let mut seq = first_seq;
    while let Some(head) = data.get(pos..pos + RECORD_HEAD as usize) {
        let len = u32::from_be_bytes(head[0..4].try_into().unwrap_or_default()) as usize;
        let c = u32::from_be_bytes(head[4..8].try_into().unwrap_or_default());
        let s = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
        let start = pos + RECORD_HEAD as usize;
        let Some(payload) = data.get(start..start + len) else {
            break;
        };
        if len == 0 || s != seq || crc(s, payload) != c {
            break;
        }
        f(s, payload)?;
        pos = start + len;
        seq += 1;
    }
    Ok((pos as u64, seq))
}

impl CommitLog {
    /// Opens (creating if needed) the log in `dir` and replays it: `replay` gets every record
    /// with a seq above `applied`, in order, and before them those of the newest two segments
    /// that are not (the ones since the checkpoint before the last one: see the comment
    /// inside). Fails if records after `applied` are missing.
    pub(crate) fn open(
        dir: &Path,
        shape: LogShape,
        applied: u64,
        mut replay: impl FnMut(u64, &[u8]) -> Result<(), LogError>,
    ) -> Result<CommitLog, LogError> {
        debug_assert!(shape.segments >= 2, "a log of {} segments", shape.segments);
        std::fs::create_dir_all(dir)?;
        let mut segs = Vec::with_capacity(shape.segments);
        let mut lens = Vec::with_capacity(shape.segments);
        for i in 0..shape.segments {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(format!("seg-{i}")))?;
            let len = file.metadata()?.len();
            let mut h = [0u8; HEADER as usize];
            let (generation, first_seq) = if len >= HEADER {
                file.read_exact_at(&mut h, 0)?;
                parse_header(&h).unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            segs.push(Segment {
                file: Arc::new(file),
                generation,
                first_seq,
            });
            lens.push(AtomicU64::new(len));
        }
        let space = Arc::new(Space {
            files: segs.iter().map(|s| s.file.clone()).collect(),
            lens,
            growing: (0..shape.segments).map(|_| Mutex::new(())).collect(),
            want: Mutex::new(Want {
                len: vec![0; shape.segments],
                writing: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
            inline_grows: AtomicU64::new(0),
        });
        let space_thread = {
            let space = space.clone();
            std::thread::Builder::new()
                .name("commitlog-space".into())
                .spawn(move || space.run())?
        };
        let mut log = CommitLog {
            dir: dir.to_path_buf(),
            shape,
            segs,
            cur: None,
            pos: HEADER,
            next_seq: applied + 1,
            buf: Vec::new(),
            syncer: Arc::new(Syncer::new(applied)),
            space,
            space_thread: Some(space_thread),
        };
        // Started segments, oldest first.
        let mut order: Vec<usize> = (0..log.segs.len())
            .filter(|&i| log.segs[i].generation > 0)
            .collect();
        order.sort_by_key(|&i| log.segs[i].generation);
        let Some(&oldest) = order.first() else {
            log.ask_ahead(0);
            return Ok(log);
        };
        // Replayed: every record after `applied`, and every record of the newest two segments.
        // The newest segment was started right after a checkpoint that made everything before
        // the segment before it durable in the store (the store's tabled writes of that one's
        // records may still be on their way to fjall when the process dies), so that far the
        // store's state needs no log; after it, the store's own word (`applied`) is trusted
        // only as far as the store's recovery deserves: a torn journal may come back with a
        // later batch kept and an earlier one dropped (it then says `applied` of the later
        // one). Replaying a record the store already has writes the same values again, in the
        // same order, and then every later write on the same keys: that changes nothing,
        // provided the log goes on at least to `applied`. A store ahead of its log (a log
        // restored from an older backup) gets only what is after `applied`.
        let newest = order[order.len() - 1];
        let newest_first = log.segs[newest].first_seq;
        let mut data = Vec::new();
        read_whole(&log.segs[newest].file, &mut data)?;
        let (_, newest_end) = scan(&data, newest_first, |_, _| Ok(()))?;
        // The segment before the newest, if the newest continues it (not after a fresh start
        // behind a store that was ahead of its log).
        let mut since = newest_first;
        if let [.., before, _] = order[..] {
            let seg = &log.segs[before];
            if seg.generation + 1 == log.segs[newest].generation {
                read_whole(&seg.file, &mut data)?;
                let (_, end) = scan(&data, seg.first_seq, |_, _| Ok(()))?;
                if end == newest_first {
                    since = seg.first_seq;
                }
            }
        }
        let from = if newest_end > applied {
            applied.min(since.saturating_sub(1))
        } else {
            applied
        };
        // The newest segment that starts at or before the first record to replay.
        let start = order
            .iter()
            .rposition(|&i| log.segs[i].first_seq <= from + 1);
        let Some(start) = start else {
            return Err(LogError::Gap {
                dir: log.dir.clone(),
                applied,
                found: log.segs[oldest].first_seq,
            });
        };
        let mut expected = log.segs[order[start]].first_seq;
        for (n, &i) in order[start..].iter().enumerate() {
            let seg = &log.segs[i];
            if n > 0 && seg.first_seq != expected {
                return Err(LogError::Broken {
                    dir: log.dir.clone(),
                    generation: seg.generation,
                    first_seq: seg.first_seq,
                    want: expected,
                });
            }
            read_whole(&seg.file, &mut data)?;
            let (end, next) = scan(&data, seg.first_seq, |seq, payload| {
                if seq > from {
                    replay(seq, payload)?;
                }
                Ok(())
            })?;
            log.cur = Some(i);
            log.pos = end;
            expected = next;
        }
        if expected <= applied {
            // Everything in the log is applied, and the store is ahead of it (its checkpoint
            // covered the rest): go on after the store.
            if expected < applied + 1 && log.segs.iter().any(|s| s.generation > 0) {
                // Records applied but not in the log can only come from a checkpoint of a lap
                // the log no longer holds; start a fresh segment so seqs stay contiguous.
                log.cur_to_next_segment(applied + 1)?;
            }
            expected = applied + 1;
        }
        log.next_seq = expected;
        // What was read back is what the store starts from (it persists the replay before use).
        log.syncer = Arc::new(Syncer::new(expected - 1));
        log.ask_ahead(log.cur.unwrap_or_default());
        Ok(log)
    }

    /// After recovery: starts the next segment, so that nothing written from now on sits in
    /// front of what the crash left behind the last valid record. A torn record there may be
    /// followed by intact records written after it (their pages reached the disk, its did not:
    /// nothing orders the writeback of unsynced pages); were the writer to go on in place, a
    /// new record that happens to end where the torn one ended would make such a record — the
    /// next seq, never acknowledged, possibly depending on the torn one — look like its
    /// successor at the next recovery. Which bytes are such leftovers cannot be told from the
    /// bytes, so the log never writes on in the segment it recovered. Call it only once every
    /// replayed record is durable elsewhere (the store persisted them): the segment it starts
    /// may hold older records.
    pub(crate) fn leave_recovered_segment(&mut self) -> io::Result<()> {
        if self.cur.is_some() {
            self.cur_to_next_segment(self.next_seq)?;
        }
        Ok(())
    }

    /// The syncer of this log's records.
    pub(crate) fn syncer(&self) -> Arc<Syncer> {
        self.syncer.clone()
    }

    /// Seq the next record gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes one record (not yet durable: see [`Syncer::sync`]) and returns its seq.
    /// `checkpoint` runs before a segment is (re)started, with the seq of the last record written
    /// so far: once it returns, nothing already in the log may be needed any more. On an error
    /// the record is not in the log (a retry writes it again at the same place).
    pub(crate) fn write(
        &mut self,
        payload: &[u8],
        checkpoint: impl FnOnce(u64) -> io::Result<()>,
    ) -> io::Result<u64> {
        let need = RECORD_HEAD + payload.len() as u64;
        let full = self.pos > HEADER && self.pos + need > self.shape.segment_bytes;
        if self.cur.is_none() || full {
            checkpoint(self.next_seq - 1)?;
            self.cur_to_next_segment(self.next_seq)?;
        }
        let seq = self.next_seq;
        self.buf.clear();
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&crc(seq, payload).to_be_bytes());
        self.buf.extend_from_slice(&seq.to_be_bytes());
        self.buf.extend_from_slice(payload);
        let i = self.cur.unwrap_or_default();
        self.ensure_allocated(i, self.pos + need)?;
        let seg = &self.segs[i];
        seg.file.write_all_at(&self.buf, self.pos)?;
        *self.syncer.tail.lock().unwrap_or_else(|p| p.into_inner()) = (Some(seg.file.clone()), seq);
        self.pos += need;
        self.next_seq += 1;
        self.ask_ahead(i);
        Ok(seq)
    }

    /// Asks the space thread for room in front of the writer in segment `i`, and for the whole
    /// next segment once `i` is half written.
    fn ask_ahead(&self, i: usize) {
        let cap = self.shape.segment_bytes.div_ceil(CHUNK) * CHUNK;
        let len = self.space.len(i);
        if len < cap && len < self.pos + AHEAD / 2 {
            self.space.ask(i, (self.pos + AHEAD).min(cap), i);
        }
        let next = (i + 1) % self.segs.len();
        if next != i && self.pos > self.shape.segment_bytes / 2 && self.space.len(next) < cap {
            self.space.ask(next, cap, i);
        }
    }

    /// Segments the writer had to grow itself because the space thread was behind.
    #[cfg(test)]
    pub(crate) fn inline_grows(&self) -> u64 {
        self.space.inline_grows.load(Ordering::Relaxed)
    }

    /// [`CommitLog::write`] and [`Syncer::sync`] in one (a single committer).
    #[cfg(test)]
    pub(crate) fn append(
        &mut self,
        payload: &[u8],
        checkpoint: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<u64> {
        let seq = self.write(payload, |_| checkpoint())?;
        self.syncer.sync(seq)?;
        Ok(seq)
    }

    /// Starts the next segment of the ring with `first_seq`.
    fn cur_to_next_segment(&mut self, first_seq: u64) -> io::Result<()> {
        let generation = self.segs.iter().map(|s| s.generation).max().unwrap_or(0) + 1;
        let i = match self.cur {
            Some(c) => {
                // What the segment left behind holds is durable before the next one exists: a
                // reader never finds a started segment after a torn one.
                self.segs[c].file.sync_data()?;
                (c + 1) % self.segs.len()
            }
            None => 0,
        };
        self.ensure_allocated(i, HEADER + RECORD_HEAD)?;
        let seg = &mut self.segs[i];
        seg.file
            .write_all_at(&header_bytes(generation, first_seq), 0)?;
        // The first record's place is zeroed, so a reader of this header finds no record of an
        // older lap there (its seq would not match anyway; this makes the empty case plain).
        seg.file
            .write_all_at(&[0u8; RECORD_HEAD as usize], HEADER)?;
        seg.file.sync_data()?;
        seg.generation = generation;
        seg.first_seq = first_seq;
        self.cur = Some(i);
        self.pos = HEADER;
        Ok(())
    }

    /// Makes sure bytes `..end` of segment `i` exist on disk: normally the space thread has
    /// grown the segment already; if not, the writer grows it here.
    fn ensure_allocated(&mut self, i: usize, end: u64) -> io::Result<()> {
        if end <= self.space.len(i) {
            return Ok(());
        }
        self.space.inline_grows.fetch_add(1, Ordering::Relaxed);
        self.space.grow(i, end, false)
    }
}

/// Starts the writeback of the dirty pages in bytes `at..at + len` of `file` (`len` 0: to its
/// end) and, with `wait`, waits for it (`sync_file_range`: data only, no metadata, no cache
/// flush; it makes nothing durable). The space thread waits, so that the `fsync` after a growth
/// finds no dirty pages; the journal's trickle (`trickle.rs`) does not.
pub(crate) fn write_back(file: &File, at: u64, len: u64, wait: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), at as i64, len as i64, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LogShape {
        LogShape {
            segments: 3,
            segment_bytes: 4096,
        }
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record {i} {}", "x".repeat((i % 300) as usize)).into_bytes()
    }

    fn reopen(dir: &Path, shape: LogShape, applied: u64) -> (CommitLog, Vec<(u64, Vec<u8>)>) {
        let mut got = Vec::new();
        let log = CommitLog::open(dir, shape, applied, |s, p| {
            got.push((s, p.to_vec()));
            Ok(())
        })
        .unwrap();
        (log, got)
    }

    /// Bytes of `seg-0` that never reached the disk, as a crash leaves them.
    fn overwrite(dir: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join("seg-0"))
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Waits (at most 10 s) until the space thread has segment `i` allocated to `len` bytes.
    fn wait_space(log: &CommitLog, i: usize, len: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.space.len(i) < len {
            assert!(
                std::time::Instant::now() < deadline,
                "the space thread did not grow segment {i} to {len} bytes (has {})",
                log.space.len(i)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn the_space_thread_grows_segments_ahead_so_commits_write_into_existing_space() {
        let dir = tempfile::tempdir().unwrap();
        let shape = LogShape {
            segments: 2,
            segment_bytes: 16 * CHUNK,
        };
        let (mut log, _) = reopen(dir.path(), shape, 0);
        wait_space(&log, 0, AHEAD);
        assert_eq!(
            log.inline_grows(),
            0,
            "a fresh log asks for room before its first record"
        );
        // Records of ~64 KiB: the writer moves through the segment while the thread keeps ahead.
        let big = vec![7u8; 64 << 10];
        let mut seq = 0;
        while log.pos < 12 * CHUNK {
            seq = log.append(&big, || Ok(())).unwrap();
            // The writer asked for room well before it needs it; give the thread its time.
            wait_space(&log, 0, log.pos + big.len() as u64 + RECORD_HEAD);
        }
        assert_eq!(
            log.inline_grows(),
            0,
            "every record went into space grown ahead"
        );
        // Past the half, the whole next segment is grown, so the writer never grows it (nor
        // waits for it to grow) once it is there.
        wait_space(&log, 1, 16 * CHUNK);
        let seg1 = || std::fs::metadata(dir.path().join("seg-1")).unwrap().len();
        assert_eq!(seg1(), 16 * CHUNK);
        while log.cur != Some(1) || log.pos < 12 * CHUNK {
            seq = log.append(&big, || Ok(())).unwrap();
        }
        assert_eq!(log.inline_grows(), 0);
        assert_eq!(seg1(), 16 * CHUNK, "the segment being written did not grow");
        drop(log);
        let (_, got) = reopen(dir.path(), shape, 0);
        assert_eq!(got.len() as u64, seq);
        assert!(got.iter().all(|(_, p)| p == &big));
    }

    #[test]
    fn the_space_thread_grows_the_segment_being_written_first_and_a_step_at_a_time() {
        let want = |len: Vec<u64>, writing| Want {
            len,
            writing,
            stop: false,
        };
        let lens = [AHEAD, 0, 2 * CHUNK];
        let have = |i: usize| lens[i];
        // Segment 2 is being written and needs room: it goes before segment 1's whole growth.
        let w = want(vec![AHEAD, 16 * CHUNK, 6 * CHUNK], 2);
        assert_eq!(next_job(&w, have), Some((2, 6 * CHUNK)));
        // Then the next segment, one step of AHEAD at a time, so that the writer's segment is
        // looked at again between steps.
        let w = want(vec![AHEAD, 16 * CHUNK, 2 * CHUNK], 2);
        assert_eq!(next_job(&w, have), Some((1, AHEAD)));
        let w = want(vec![AHEAD, 0, 2 * CHUNK], 2);
        assert_eq!(next_job(&w, have), None);
    }

    #[test]
    fn records_come_back_in_order_after_what_was_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 0);
        assert!(got.is_empty());
        for i in 1..=50 {
            assert_eq!(log.append(&payload(i), || Ok(())).unwrap(), i);
        }
        drop(log);
        let (log, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(got.len(), 50);
        for (s, p) in &got {
            assert_eq!(p, &payload(*s));
        }
        assert_eq!(log.next_seq(), 51);
        drop(log);
        // A store that says it has 42 still gets the whole newest segment: the store's word is
        // trusted only up to the last checkpoint.
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 42);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        // After a checkpoint (the next segment started), still the segment before it: the
        // checkpoint before the last one is where the store's word starts to count.
        log.leave_recovered_segment().unwrap();
        for i in 51..=60 {
            assert_eq!(log.append(&payload(i), || Ok(())).unwrap(), i);
        }
        drop(log);
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 55);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (1..=60).collect::<Vec<_>>()
        );
        // After a second checkpoint, only what follows the first one and `applied`.
        log.leave_recovered_segment().unwrap();
        for i in 61..=70 {
            assert_eq!(log.append(&payload(i), || Ok(())).unwrap(), i);
        }
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 65);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (51..=70).collect::<Vec<_>>()
        );
        let (_, got) = reopen(dir.path(), LogShape::default(), 42);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (43..=70).collect::<Vec<_>>()
        );
    }

    #[test]
    fn one_sync_covers_every_record_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), LogShape::default(), 0);
        let syncer = log.syncer();
        // Three committers write before any of them syncs.
        for i in 1..=3 {
            assert_eq!(log.write(&payload(i), |_| Ok(())).unwrap(), i);
        }
        syncer.sync(2).unwrap();
        assert_eq!(syncer.syncs(), 1);
        // The other two find theirs covered.
        syncer.sync(1).unwrap();
        syncer.sync(3).unwrap();
        assert_eq!(syncer.syncs(), 1);
        // A record written after that sync needs one of its own.
        assert_eq!(log.write(&payload(4), |_| Ok(())).unwrap(), 4);
        syncer.sync(4).unwrap();
        assert_eq!(syncer.syncs(), 2);
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn a_checkpoint_is_told_the_last_record_written_and_records_written_before_a_new_segment_stay_readable(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), small(), 0);
        let syncer = log.syncer();
        let mut told = Vec::new();
        for i in 1..=200 {
            // Nobody syncs: the writer makes a segment's records durable before it leaves it.
            log.write(&payload(i), |last| {
                told.push(last);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(told[0], 0);
        assert!(told.len() > 2, "{told:?}");
        assert!(told.windows(2).all(|w| w[0] < w[1]), "{told:?}");
        syncer.sync(200).unwrap();
        drop(log);
        let durable = told[told.len() - 2];
        let (_, got) = reopen(dir.path(), small(), durable);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (durable + 1..=200).collect::<Vec<_>>()
        );
    }

    #[test]
    fn after_recovery_no_record_that_followed_a_torn_one_is_ever_replayed() {
        // Records 2 and 3 were written and never synced; at the crash the page of 3 reached
        // the disk and a page of 2 did not (the writeback of unsynced pages has no order).
        let crash = |dir: &Path| {
            let (mut log, _) = reopen(dir, LogShape::default(), 0);
            log.append(b"one", || Ok(())).unwrap();
            let at2 = log.pos;
            log.append(&[b'b'; 100], || Ok(())).unwrap();
            log.append(&[b'c'; 100], || Ok(())).unwrap();
            drop(log);
            overwrite(dir, at2 + RECORD_HEAD + 50, &[0; 8]);
        };
        // Writing on in place: a new record 2 of the same length as the torn one ends where it
        // ended, and the old, never acknowledged record 3 reads as its successor. This is the
        // hazard `leave_recovered_segment` exists for.
        let dir = tempfile::tempdir().unwrap();
        crash(dir.path());
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(log.append(&[b'B'; 100], || Ok(())).unwrap(), 2);
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 1);
        // (1 comes again too: it is in the newest segment, see `open`.)
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        // As the store does it: after the replay, the next segment.
        let dir = tempfile::tempdir().unwrap();
        crash(dir.path());
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1]);
        log.leave_recovered_segment().unwrap();
        assert_eq!(log.append(&[b'B'; 100], || Ok(())).unwrap(), 2);
        drop(log);
        // (1 comes again, from the segment before the newest; the scan of that segment stops
        // at the torn record, so the old 3 behind it never comes back.)
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 1);
        assert_eq!(got, vec![(1, b"one".to_vec()), (2, vec![b'B'; 100])]);
        log.leave_recovered_segment().unwrap();
        assert_eq!(log.append(b"three", || Ok(())).unwrap(), 3);
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 2);
        assert_eq!(got, vec![(2, vec![b'B'; 100]), (3, b"three".to_vec())]);
    }

    #[test]
    fn a_committer_that_handed_off_is_covered_by_the_sync_of_the_one_it_handed_to() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = reopen(dir.path(), LogShape::default(), 0);
        let syncer = log.syncer();
        let log = Mutex::new(log);
        let first = log.lock().unwrap().write(b"sender", |_| Ok(())).unwrap();
        let began = Instant::now();
        std::thread::scope(|s| {
            // The worker it handed to: writes its record after, and syncs it as usual.
            s.spawn(|| {
                let second = log.lock().unwrap().write(b"recipient", |_| Ok(())).unwrap();
                assert_eq!(second, first + 1);
                syncer.sync(second).unwrap();
            });
            // The linger is long: the test would wait it out only if that sync did not cover us.
            syncer
                .sync_after_handoff(first, Duration::from_secs(20))
                .unwrap();
        });
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(syncer.syncs(), 1, "one fdatasync for both records");
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_lingering_committer_syncs_itself_when_nobody_comes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), LogShape::default(), 0);
        let syncer = log.syncer();
        let seq = log.write(b"alone", |_| Ok(())).unwrap();
        let began = Instant::now();
        syncer
            .sync_after_handoff(seq, Duration::from_millis(5))
            .unwrap();
        assert!(began.elapsed() >= Duration::from_millis(5));
        assert_eq!(syncer.syncs(), 1);
        // Covered now: nothing more to wait for.
        syncer
            .sync_after_handoff(seq, Duration::from_secs(20))
            .unwrap();
        assert_eq!(syncer.syncs(), 1);
    }

    #[test]
    fn two_committers_that_handed_off_to_each_other_do_not_wait_for_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = reopen(dir.path(), LogShape::default(), 0);
        let syncer = log.syncer();
        let log = Mutex::new(log);
        let began = Instant::now();
        std::thread::scope(|s| {
            for name in [&b"a"[..], b"b"] {
                let (log, syncer) = (&log, &syncer);
                s.spawn(move || {
                    let seq = log.lock().unwrap().write(name, |_| Ok(())).unwrap();
                    syncer
                        .sync_after_handoff(seq, Duration::from_secs(20))
                        .unwrap();
                });
            }
        });
        // One of them lingered; the other saw it and synced at once, for both.
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(syncer.syncs(), 1);
    }

    #[test]
    fn a_lingering_committer_learns_of_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), LogShape::default(), 0);
        let syncer = log.syncer();
        let seq = log.write(b"doomed", |_| Ok(())).unwrap();
        syncer.synced.lock().unwrap().poisoned = true;
        assert!(syncer
            .sync_after_handoff(seq, Duration::from_secs(20))
            .is_err());
    }

    #[test]
    fn a_torn_last_record_is_not_replayed_and_its_place_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), LogShape::default(), 0);
        for i in 1..=3 {
            log.append(&payload(i), || Ok(())).unwrap();
        }
        let torn_at = log.pos - 3;
        drop(log);
        // The last record's tail never reached the disk.
        overwrite(dir.path(), torn_at, &[0, 0, 0]);
        let (mut log, got) = reopen(dir.path(), LogShape::default(), 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(log.append(b"again", || Ok(())).unwrap(), 3);
        drop(log);
        let (_, got) = reopen(dir.path(), LogShape::default(), 2);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(got[2], (3, b"again".to_vec()));
    }

    #[test]
    fn the_ring_is_reused_only_after_a_checkpoint_and_old_laps_are_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), small(), 0);
        // The caller's durable point: the last seq before each checkpoint; and the one before.
        let mut durable = 0;
        let mut before = 0;
        let mut checkpoints = 0;
        for i in 1..=400 {
            let last = log.next_seq() - 1;
            log.append(&payload(i), || {
                before = durable;
                durable = last;
                checkpoints += 1;
                Ok(())
            })
            .unwrap();
        }
        assert!(
            checkpoints > 10,
            "{checkpoints} checkpoints: the ring did not turn"
        );
        // Every segment file stayed at one chunk: reused in place, never grown.
        for i in 0..3 {
            let len = std::fs::metadata(dir.path().join(format!("seg-{i}")))
                .unwrap()
                .len();
            assert_eq!(len, CHUNK);
        }
        drop(log);
        // Everything since the checkpoint before the last one: the newest two segments.
        let (mut log, got) = reopen(dir.path(), small(), durable);
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, (before + 1..=400).collect::<Vec<_>>());
        for (s, p) in &got {
            assert_eq!(p, &payload(*s));
        }
        assert_eq!(log.append(b"next", || Ok(())).unwrap(), 401);
    }

    #[test]
    fn missing_records_are_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), small(), 0);
        for i in 1..=400 {
            log.append(&payload(i), || Ok(())).unwrap();
        }
        drop(log);
        // A store that says it has applied nothing, though the ring has turned since seq 1.
        let r = CommitLog::open(dir.path(), small(), 0, |_, _| Ok(()));
        assert!(matches!(r, Err(LogError::Gap { applied: 0, .. })), "{r:?}");
    }

    #[test]
    fn a_store_ahead_of_the_log_goes_on_after_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), small(), 0);
        for i in 1..=5 {
            log.append(&payload(i), || Ok(())).unwrap();
        }
        drop(log);
        // E.g. a log directory restored from an older backup than the store's.
        let (mut log, got) = reopen(dir.path(), small(), 9);
        assert!(got.is_empty());
        assert_eq!(log.append(b"ten", || Ok(())).unwrap(), 10);
        drop(log);
        let (_, got) = reopen(dir.path(), small(), 9);
        assert_eq!(got, vec![(10, b"ten".to_vec())]);
    }

    #[test]
    fn a_record_larger_than_a_segment_still_fits() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(dir.path(), small(), 0);
        log.append(b"small", || Ok(())).unwrap();
        let big = vec![7u8; 3 * CHUNK as usize];
        assert_eq!(log.append(&big, || Ok(())).unwrap(), 2);
        log.append(b"after", || Ok(())).unwrap();
        drop(log);
        let (_, got) = reopen(dir.path(), small(), 0);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].1, big);
    }
}
