//! Storage of the file service: pictures, voice, video and documents sent in chats are stored
//! here and messages carry a reference (the file's SHA-256), not the bytes.
//!
//! - **Content addressed.** A file is named by the SHA-256 of its bytes ([`FileId`]): the same file
//!   uploaded twice is stored once. Every upload still sends its bytes: a store that answered
//!   "already have it" to a declared hash would hand the file to anyone who knows the hash, so
//!   duplicates are dropped at [`FileStore::complete`], after the bytes proved possession.
//! - **Resumable uploads.** A client declares the size and the hash first ([`FileStore::begin`]),
//!   then sends the bytes in chunks, each at the offset the store has ([`FileStore::append`]); a
//!   chunk that returned is durable, so after a dropped mobile connection the client asks where
//!   to go on ([`FileStore::status`]) and resumes. When every byte is there, [`FileStore::complete`]
//!   checks the hash and publishes the file; a mismatch discards the upload.
//! - **Range reads** for media players ([`FileStore::read`]).
//! - Uploads that never complete are removed after a while ([`FileStore::purge_stale`]).
//!
//! Backends implement [`FileStore`]: the local filesystem ([`LocalFiles`], the embedded default)
//! here; an S3-compatible object store for clusters is to follow. Access control (who may fetch
//! a file) and the HTTP endpoints are the logic node's, not the store's.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A stored file: the SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub [u8; 32]);

impl FileId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> FileId {
        FileId(Sha256::digest(data).into())
    }

    /// Lower-case hex (64 characters), as URLs and messages carry it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(s: &str) -> Option<FileId> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(FileId(out))
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An upload in progress: 128 random bits, hex in URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UploadId(pub u128);

impl UploadId {
    /// A new random id (getrandom(2)).
    pub fn random() -> UploadId {
        let mut b = [0u8; 16];
        let mut got = 0;
        while got < b.len() {
            // SAFETY: writes at most `len - got` bytes into the rest of `b`.
            let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
            if n > 0 {
                got += n as usize;
            }
        }
        UploadId(u128::from_be_bytes(b))
    }

    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_hex(s: &str) -> Option<UploadId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(UploadId)
    }
}

/// Why a file operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("no such file or upload")]
    NotFound,
    /// A chunk at another offset than the upload's length (or while another chunk of it is
    /// being written): resume at `received`.
    #[error("the upload has {received} bytes: send from there")]
    Offset { received: u64 },
    #[error("{0}")]
    Invalid(String),
    /// The bytes do not hash to the declared id: the upload is discarded.
    #[error("the bytes do not match the declared SHA-256")]
    Mismatch,
    #[error("file store i/o: {0}")]
    Io(String),
}

fn io(e: std::io::Error) -> FileError {
    FileError::Io(e.to_string())
}

/// Where an upload stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadState {
    pub file: FileId,
    pub size: u64,
    /// Bytes stored so far (durably): the offset of the next chunk.
    pub received: u64,
    pub created_ms: u64,
}

/// The file service's storage (see the crate docs). Methods are async so network backends fit;
/// [`LocalFiles`] completes them inline.
#[allow(async_fn_in_trait)]
pub trait FileStore: Clone + Send + Sync + 'static {
    /// Starts an upload of `size` bytes (1 ..= `max_size`) hashing to `file`, at time `now_ms`.
    async fn begin(&self, file: FileId, size: u64, now_ms: u64) -> Result<UploadId, FileError>;
    async fn status(&self, id: UploadId) -> Result<UploadState, FileError>;
    /// Appends `data` at `offset`, which must be the upload's length; durable when it returns.
    /// Returns the length afterwards. Past the declared size: `Invalid`.
    async fn append(&self, id: UploadId, offset: u64, data: &[u8]) -> Result<u64, FileError>;
    /// Checks the hash of a fully received upload and publishes the file (durably); a mismatch
    /// discards the upload. An upload whose file got stored meanwhile is dropped as a duplicate.
    async fn complete(&self, id: UploadId) -> Result<FileId, FileError>;
    /// The size of a stored file, `None` if it is not stored.
    async fn size(&self, file: FileId) -> Result<Option<u64>, FileError>;
    /// `len` bytes of a stored file from `start` (fewer at its end).
    async fn read(&self, file: FileId, start: u64, len: u64) -> Result<Bytes, FileError>;
    /// Removes uploads started before `before_ms` and never completed; returns how many.
    async fn purge_stale(&self, before_ms: u64) -> Result<usize, FileError>;
}

/// Files on the local filesystem under one directory:
///
/// ```text
/// <root>/blobs/<first 2 hex>/<64 hex>     a stored file
/// <root>/uploads/<32 hex>.part            an upload's bytes so far
/// <root>/uploads/<32 hex>.meta            file id (32 bytes) ++ size u64 ++ created_ms u64 (BE)
/// ```
///
/// Every chunk is `fdatasync`ed before `append` returns; `complete` syncs the blob and its
/// directory after the rename, so a published file survives a crash.
#[derive(Clone, Debug)]
pub struct LocalFiles {
    root: PathBuf,
    max_size: u64,
    /// Uploads with a chunk being written (a second one at the same time is refused).
    busy: Arc<Mutex<HashSet<UploadId>>>,
}

impl LocalFiles {
    /// Opens (creating) the store in `root`, refusing files larger than `max_size`.
    pub fn open(root: &Path, max_size: u64) -> Result<LocalFiles, FileError> {
        fs::create_dir_all(root.join("blobs")).map_err(io)?;
        fs::create_dir_all(root.join("uploads")).map_err(io)?;
        Ok(LocalFiles {
            root: root.to_path_buf(),
            max_size,
            busy: Arc::default(),
        })
    }

    fn blob(&self, f: FileId) -> PathBuf {
        let hex = f.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn part(&self, id: UploadId) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}.part", id.to_hex()))
    }

    fn meta(&self, id: UploadId) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}.meta", id.to_hex()))
    }

    fn read_meta(&self, id: UploadId) -> Result<UploadState, FileError> {
        let m = match fs::read(self.meta(id)) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileError::NotFound),
            Err(e) => return Err(io(e)),
        };
        if m.len() != 48 {
            return Err(FileError::Io(format!(
                "upload {} has a bad meta file",
                id.to_hex()
            )));
        }
        let u64_at = |i: usize| u64::from_be_bytes(m[i..i + 8].try_into().expect("8 bytes"));
        let received = match fs::metadata(self.part(id)) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileError::NotFound),
            Err(e) => return Err(io(e)),
        };
        Ok(UploadState {
            file: FileId(m[..32].try_into().expect("32 bytes")),
            size: u64_at(32),
            received,
            created_ms: u64_at(40),
        })
    }

    fn discard(&self, id: UploadId) {
        let _ = fs::remove_file(self.part(id));
        let _ = fs::remove_file(self.meta(id));
    }

    /// Marks `id` busy for the guard's life; `None` if it already is.
    fn claim(&self, id: UploadId) -> Option<Claim<'_>> {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        // Not `then_some`: its argument is built either way, and a `Claim` dropped here (with the
        // lock held) would deadlock and release somebody else's claim.
        if b.insert(id) {
            Some(Claim { files: self, id })
        } else {
            None
        }
    }
}

struct Claim<'a> {
    files: &'a LocalFiles,
    id: UploadId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut b = self.files.busy.lock().unwrap_or_else(|p| p.into_inner());
        b.remove(&self.id);
    }
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

impl FileStore for LocalFiles {
    async fn begin(&self, file: FileId, size: u64, now_ms: u64) -> Result<UploadId, FileError> {
        if size == 0 || size > self.max_size {
            return Err(FileError::Invalid(format!(
                "a file has 1 to {} bytes, not {size}",
                self.max_size
            )));
        }
        let id = UploadId::random();
        let mut meta = Vec::with_capacity(48);
        meta.extend_from_slice(&file.0);
        meta.extend_from_slice(&size.to_be_bytes());
        meta.extend_from_slice(&now_ms.to_be_bytes());
        File::create(self.part(id)).map_err(io)?;
        let mut m = File::create(self.meta(id)).map_err(io)?;
        m.write_all(&meta).and_then(|_| m.sync_all()).map_err(io)?;
        sync_dir(&self.root.join("uploads"))?;
        Ok(id)
    }

    async fn status(&self, id: UploadId) -> Result<UploadState, FileError> {
        self.read_meta(id)
    }

    async fn append(&self, id: UploadId, offset: u64, data: &[u8]) -> Result<u64, FileError> {
        let st = self.read_meta(id)?;
        let Some(_claim) = self.claim(id) else {
            return Err(FileError::Offset {
                received: st.received,
            });
        };
        let st = self.read_meta(id)?;
        if offset != st.received {
            return Err(FileError::Offset {
                received: st.received,
            });
        }
        if st.received + data.len() as u64 > st.size {
            return Err(FileError::Invalid(format!(
                "the upload declared {} bytes; {} more would pass it",
                st.size,
                data.len()
            )));
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.part(id))
            .map_err(io)?;
        if let Err(e) = f.write_all(data).and_then(|_| f.sync_data()) {
            // A partial write would leave the length past what was acknowledged: cut it back.
            let _ = f.set_len(st.received);
            return Err(io(e));
        }
        Ok(st.received + data.len() as u64)
    }

    async fn complete(&self, id: UploadId) -> Result<FileId, FileError> {
        let Some(_claim) = self.claim(id) else {
            return Err(FileError::Invalid(
                "a chunk of this upload is being written".into(),
            ));
        };
        let st = self.read_meta(id)?;
        if st.received != st.size {
            return Err(FileError::Offset {
                received: st.received,
            });
        }
        let mut f = File::open(self.part(id)).map_err(io)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if FileId(h.finalize().into()) != st.file {
            self.discard(id);
            return Err(FileError::Mismatch);
        }
        let blob = self.blob(st.file);
        if blob.exists() {
            self.discard(id); // the same file was stored meanwhile
            return Ok(st.file);
        }
        let dir = blob.parent().expect("blob has a directory");
        fs::create_dir_all(dir).map_err(io)?;
        fs::rename(self.part(id), &blob).map_err(io)?;
        sync_dir(dir)?;
        let _ = fs::remove_file(self.meta(id));
        Ok(st.file)
    }

    async fn size(&self, file: FileId) -> Result<Option<u64>, FileError> {
        match fs::metadata(self.blob(file)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn read(&self, file: FileId, start: u64, len: u64) -> Result<Bytes, FileError> {
        let mut f = match File::open(self.blob(file)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileError::NotFound),
            Err(e) => return Err(io(e)),
        };
        let size = f.metadata().map_err(io)?.len();
        if start > size {
            return Err(FileError::Invalid(format!(
                "range starts at {start}, past the file's {size} bytes"
            )));
        }
        let n = len.min(size - start);
        let mut out = vec![0u8; n as usize];
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        f.read_exact(&mut out).map_err(io)?;
        Ok(Bytes::from(out))
    }

    async fn purge_stale(&self, before_ms: u64) -> Result<usize, FileError> {
        let mut n = 0;
        for e in fs::read_dir(self.root.join("uploads")).map_err(io)? {
            let name = e.map_err(io)?.file_name();
            let Some(hex) = name.to_str().and_then(|s| s.strip_suffix(".meta")) else {
                continue;
            };
            let Some(id) = UploadId::from_hex(hex) else {
                continue;
            };
            match self.read_meta(id) {
                Ok(st) if st.created_ms < before_ms => {
                    if let Some(_claim) = self.claim(id) {
                        self.discard(id);
                        n += 1;
                    }
                }
                Ok(_) => {}
                // A meta without its part (a crash inside `begin` or `discard`): remove it.
                Err(FileError::NotFound) => {
                    let _ = fs::remove_file(self.meta(id));
                }
                Err(e) => tracing::warn!("files: upload {hex}: {e}"),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn store() -> (tempfile::TempDir, LocalFiles) {
        let d = tempfile::tempdir().unwrap();
        let s = LocalFiles::open(d.path(), MAX).unwrap();
        (d, s)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn upload(s: &LocalFiles, bytes: &[u8], chunk: usize) -> FileId {
        let id = FileId::of(bytes);
        let u = s.begin(id, bytes.len() as u64, 1).await.unwrap();
        let mut off = 0;
        for c in bytes.chunks(chunk) {
            off = s.append(u, off, c).await.unwrap();
        }
        assert_eq!(s.complete(u).await.unwrap(), id);
        id
    }

    #[test]
    fn ids_round_trip_through_hex_and_garbage_is_refused() {
        let f = FileId::of(b"hello");
        assert_eq!(
            f.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(FileId::from_hex(&f.to_hex()), Some(f));
        assert_eq!(FileId::from_hex(&f.to_hex().to_uppercase()), Some(f));
        for bad in [
            "",
            "zz",
            &"g".repeat(64),
            &"a".repeat(63),
            "../../etc/passwd",
        ] {
            assert_eq!(FileId::from_hex(bad), None, "{bad}");
        }
        let u = UploadId::random();
        assert_ne!(u, UploadId::random());
        assert_eq!(UploadId::from_hex(&u.to_hex()), Some(u));
        assert_eq!(UploadId::from_hex("../x"), None);
        assert_eq!(UploadId::from_hex(&format!("+{}", &u.to_hex()[1..])), None);
    }

    #[tokio::test]
    async fn an_upload_in_chunks_is_stored_and_read_back_by_ranges() {
        let (_d, s) = store();
        let bytes = data(100_000);
        let id = upload(&s, &bytes, 30_000).await;
        assert_eq!(s.size(id).await.unwrap(), Some(100_000));
        assert_eq!(&s.read(id, 0, 10).await.unwrap()[..], &bytes[..10]);
        assert_eq!(
            &s.read(id, 99_990, 100).await.unwrap()[..],
            &bytes[99_990..]
        );
        assert_eq!(s.read(id, 100_000, 5).await.unwrap().len(), 0);
        assert!(matches!(
            s.read(id, 100_001, 5).await,
            Err(FileError::Invalid(_))
        ));
        assert_eq!(
            s.read(FileId::of(b"x"), 0, 1).await,
            Err(FileError::NotFound)
        );
    }

    #[tokio::test]
    async fn the_same_file_is_stored_once_and_a_second_upload_proves_possession() {
        let (d, s) = store();
        let bytes = data(5000);
        let id = upload(&s, &bytes, 5000).await;
        // A second upload of a stored file sends its bytes again and stores nothing new.
        let again = s.begin(id, 5000, 2).await.unwrap();
        s.append(again, 0, &bytes).await.unwrap();
        assert_eq!(s.complete(again).await.unwrap(), id);
        // Two uploads of the same bytes racing: both complete, one blob.
        let a = s.begin(FileId::of(b"twice"), 5, 3).await.unwrap();
        let b = s.begin(FileId::of(b"twice"), 5, 3).await.unwrap();
        s.append(a, 0, b"twice").await.unwrap();
        s.append(b, 0, b"twice").await.unwrap();
        assert_eq!(s.complete(a).await.unwrap(), FileId::of(b"twice"));
        assert_eq!(s.complete(b).await.unwrap(), FileId::of(b"twice"));
        let blobs: usize = fs::read_dir(d.path().join("blobs"))
            .unwrap()
            .map(|e| fs::read_dir(e.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(blobs, 2);
        assert_eq!(fs::read_dir(d.path().join("uploads")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_from_what_the_store_has_after_a_reopen() {
        let (d, s) = store();
        let bytes = data(10_000);
        let id = FileId::of(&bytes);
        let u = s.begin(id, 10_000, 1).await.unwrap();
        assert_eq!(s.append(u, 0, &bytes[..4000]).await.unwrap(), 4000);
        // The client lost the answer and sends the chunk again: told where to go on.
        assert_eq!(
            s.append(u, 0, &bytes[..4000]).await,
            Err(FileError::Offset { received: 4000 })
        );
        drop(s);
        let s = LocalFiles::open(d.path(), MAX).unwrap();
        let st = s.status(u).await.unwrap();
        assert_eq!((st.file, st.size, st.received), (id, 10_000, 4000));
        assert!(matches!(
            s.complete(u).await,
            Err(FileError::Offset { received: 4000 })
        ));
        s.append(u, 4000, &bytes[4000..]).await.unwrap();
        assert!(matches!(
            s.append(u, 10_000, b"x").await,
            Err(FileError::Invalid(_))
        ));
        assert_eq!(s.complete(u).await.unwrap(), id);
        assert_eq!(s.status(u).await, Err(FileError::NotFound));
        assert_eq!(&s.read(id, 0, 20_000).await.unwrap()[..], &bytes[..]);
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_the_declared_hash_are_discarded() {
        let (_d, s) = store();
        let claimed = FileId::of(b"what I said");
        let u = s.begin(claimed, 6, 1).await.unwrap();
        s.append(u, 0, b"forged").await.unwrap();
        assert_eq!(s.complete(u).await, Err(FileError::Mismatch));
        assert_eq!(s.size(claimed).await.unwrap(), None);
        assert_eq!(s.status(u).await, Err(FileError::NotFound));
    }

    #[tokio::test]
    async fn sizes_out_of_bounds_and_unknown_uploads_are_refused() {
        let (_d, s) = store();
        let f = FileId::of(b"x");
        assert!(matches!(s.begin(f, 0, 1).await, Err(FileError::Invalid(_))));
        assert!(matches!(
            s.begin(f, MAX + 1, 1).await,
            Err(FileError::Invalid(_))
        ));
        let ghost = UploadId::random();
        assert_eq!(s.status(ghost).await, Err(FileError::NotFound));
        assert_eq!(s.append(ghost, 0, b"x").await, Err(FileError::NotFound));
        assert_eq!(s.complete(ghost).await, Err(FileError::NotFound));
    }

    #[tokio::test]
    async fn stale_uploads_are_purged_and_recent_ones_kept() {
        let (_d, s) = store();
        let old = s.begin(FileId::of(b"old"), 3, 1_000).await.unwrap();
        let new = s.begin(FileId::of(b"new"), 3, 9_000).await.unwrap();
        s.append(old, 0, b"ol").await.unwrap();
        assert_eq!(s.purge_stale(5_000).await.unwrap(), 1);
        assert_eq!(s.status(old).await, Err(FileError::NotFound));
        assert_eq!(s.status(new).await.unwrap().received, 0);
        assert_eq!(s.purge_stale(5_000).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_chunk_while_another_of_the_same_upload_is_written_is_told_to_resume() {
        let (_d, s) = store();
        let u = s.begin(FileId::of(b"ab"), 2, 1).await.unwrap();
        let claim = s.claim(u).unwrap();
        assert_eq!(
            s.append(u, 0, b"a").await,
            Err(FileError::Offset { received: 0 })
        );
        drop(claim);
        assert_eq!(s.append(u, 0, b"a").await.unwrap(), 1);
    }
}
