//! Repairs a torn tail of fjall's journal that fjall refuses to recover.
//!
//! The store syncs its own commit log and persists fjall's journal only at a checkpoint
//! (`fjall_store.rs`), so whatever fjall wrote to its journal after the last checkpoint is also in
//! the commit log and is replayed from there at the next open. A crash while fjall writes (a full
//! disk, a page that never reached the disk) can leave that tail torn in ways fjall 3 does not
//! truncate by itself: a batch whose end marker survives but whose checksum does not match (bytes
//! lost inside it), or a cut batch followed by a later one, whose items then run into each other
//! (`JournalRecovery(ChecksumMismatch | TooManyItems | InsufficientLength)`): fjall then refuses to
//! open the database, and the node would never start again.
//!
//! [`repair`] scans the journals with fjall 3's framing and cuts the *newest* journal at the start
//! of its first batch that is not whole and intact, as fjall itself does with a torn tail it
//! recognises. Only the newest journal may be cut: an older one was sealed with an `fsync` when
//! fjall moved to the next, so damage there is not a torn write but lost data, and [`repair`]
//! refuses, saying where. The format is fjall's (pinned at 3.1 by `Cargo.lock`); the tests of
//! `fjall_store.rs` tear journals that fjall itself wrote, so a change of format fails them.
//!
//! ```text
//! journal := batch* (zeros: the file is preallocated)
//! batch   := start entry{count} end
//! start   := 0x01 count:u32 seqno:u64
//! entry   := 0x02 value_type:u8 compression:u8 keyspace:u64 key_len:u16 value_len:u32
//!                 disk_len:u32 key value(disk_len)
//!          | 0x04 keyspace:u64                                     (a cleared keyspace)
//! end     := 0x03 checksum:u64 "FJL" 0x03          checksum = xxh3-64 of the entries' bytes
//! ```
//! Integers little-endian.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

/// What [`repair`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Cut {
    /// The journal that was cut.
    pub journal: PathBuf,
    /// Its new length: the end of its last intact batch.
    pub at: u64,
    /// Bytes after `at` that were not zeros (the torn part that was dropped).
    pub dropped: u64,
    /// Why the batch at `at` was not kept.
    pub why: &'static str,
}

const START: u8 = 1;
const ITEM: u8 = 2;
const END: u8 = 3;
const CLEAR: u8 = 4;
const TRAILER: &[u8] = b"FJL\x03";

/// Where the intact batches of a journal's bytes end, and why the scan stopped there (`None`:
/// nothing but zeros or the end of the file follows).
fn intact_prefix(data: &[u8]) -> (usize, Option<&'static str>) {
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        if rest.iter().all(|&b| b == 0) {
            return (pos, None);
        }
        match batch_len(rest) {
            Ok(len) => pos += len,
            Err(why) => return (pos, Some(why)),
        }
    }
}

/// Length of the whole, intact batch at the start of `b`.
fn batch_len(b: &[u8]) -> Result<usize, &'static str> {
    let mut r = Reader { b, pos: 0 };
    if r.u8()? != START {
        return Err("no batch starts here");
    }
    let count = r.u32()?;
    r.take(8)?;
    let entries = r.pos;
    for _ in 0..count {
        match r.u8()? {
            ITEM => {
                r.take(2)?;
                r.take(8)?;
                let key_len = r.u16()? as usize;
                r.u32()?;
                let disk_len = r.u32()? as usize;
                r.take(key_len)?;
                r.take(disk_len)?;
            }
            CLEAR => {
                r.take(8)?;
            }
            _ => return Err("a batch has fewer entries than its start says"),
        }
    }
    let entries = &b[entries..r.pos];
    if r.u8()? != END {
        return Err("a batch has more entries than its start says");
    }
    let checksum = u64::from_le_bytes(r.take(8)?.try_into().unwrap_or_default());
    if r.take(TRAILER.len())? != TRAILER {
        return Err("a batch's end marker is torn");
    }
    if xxhash_rust::xxh3::xxh3_64(entries) != checksum {
        return Err("a batch's checksum does not match its bytes");
    }
    Ok(r.pos)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let s = self
            .b
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or("a batch is cut off by the end of the file")?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
}

/// fjall's journals in `dir` (`<id>.jnl`), oldest first.
fn journals(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = vec![];
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((id, e.path()));
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Cuts the newest journal in `dir` at the start of its first batch that is not intact (see the
/// module docs). `Ok(None)`: every journal is intact, there is nothing to repair. An error says
/// which older journal is damaged (not repaired: that would lose data) or what I/O failed.
pub(crate) fn repair(dir: &Path) -> Result<Option<Cut>, String> {
    let all = journals(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for (n, path) in all.iter().enumerate() {
        let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let (at, why) = intact_prefix(&data);
        let Some(why) = why else { continue };
        if n + 1 < all.len() {
            return Err(format!(
                "fjall journal {} is damaged at byte {at} ({why}), and it is not the newest: \
                 it was synced when fjall sealed it, so this is lost data, not a torn write; \
                 not repaired",
                path.display()
            ));
        }
        let dropped = data[at..].iter().filter(|&&b| b != 0).count() as u64;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        file.set_len(at as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cutting {} at {at}: {e}", path.display()))?;
        return Ok(Some(Cut {
            journal: path.clone(),
            at: at as u64,
            dropped,
            why,
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(entries: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![START];
        b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        b.extend_from_slice(&7u64.to_le_bytes());
        let body: Vec<u8> = entries.concat();
        b.extend_from_slice(&body);
        b.push(END);
        b.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        b.extend_from_slice(TRAILER);
        b
    }

    fn item(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut i = vec![ITEM, 0, 0];
        i.extend_from_slice(&3u64.to_le_bytes());
        i.extend_from_slice(&(key.len() as u16).to_le_bytes());
        i.extend_from_slice(&(value.len() as u32).to_le_bytes());
        i.extend_from_slice(&(value.len() as u32).to_le_bytes());
        i.extend_from_slice(key);
        i.extend_from_slice(value);
        i
    }

    #[test]
    fn the_intact_prefix_ends_before_the_first_damaged_batch() {
        let a = batch(&[&item(b"k1", b"v1"), &item(b"k2", b"value two")]);
        let clear = [CLEAR, 1, 0, 0, 0, 0, 0, 0, 0];
        let b = batch(&[&clear, &item(b"k3", b"")]);
        let whole = [a.clone(), b.clone(), vec![0; 64]].concat();
        assert_eq!(intact_prefix(&whole), (a.len() + b.len(), None));
        assert_eq!(intact_prefix(&[]), (0, None));
        // Cut anywhere inside the second batch.
        for cut in a.len() + 1..a.len() + b.len() {
            let (at, why) = intact_prefix(&whole[..cut]);
            assert_eq!(at, a.len(), "cut at {cut}");
            assert!(why.is_some(), "cut at {cut}");
        }
        // A byte changed inside the first batch's value: its checksum catches it.
        let mut bad = whole.clone();
        bad[a.len() - 14] ^= 0x40;
        assert_eq!(
            intact_prefix(&bad),
            (0, Some("a batch's checksum does not match its bytes"))
        );
        // A count that does not match the entries.
        let mut bad = whole.clone();
        bad[1] = 3;
        assert_eq!(intact_prefix(&bad).0, 0);
        // Garbage where a batch should start.
        let bad = [a.clone(), vec![9, 9, 9]].concat();
        assert_eq!(intact_prefix(&bad), (a.len(), Some("no batch starts here")));
    }

    #[test]
    fn only_the_newest_journal_is_cut_and_an_older_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = batch(&[&item(b"k", b"v")]);
        std::fs::write(dir.path().join("3.jnl"), &a).unwrap();
        std::fs::write(dir.path().join("x.jnl"), b"not a journal").unwrap();
        let torn = [a.clone(), a[..a.len() - 5].to_vec(), vec![0; 100]].concat();
        std::fs::write(dir.path().join("4.jnl"), &torn).unwrap();
        let cut = repair(dir.path()).unwrap().unwrap();
        assert_eq!(cut.journal, dir.path().join("4.jnl"));
        assert_eq!(cut.at, a.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("4.jnl")).unwrap(), a);
        // Now intact: nothing to do.
        assert_eq!(repair(dir.path()).unwrap(), None);
        // Damage in a sealed journal is refused and left as it is.
        std::fs::write(dir.path().join("3.jnl"), &torn).unwrap();
        let e = repair(dir.path()).unwrap_err();
        assert!(e.contains("3.jnl") && e.contains("not the newest"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("3.jnl")).unwrap(), torn);
    }
}
