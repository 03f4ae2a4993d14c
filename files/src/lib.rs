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
//! Backends implement [`FileStore`]:
//!
//! - [`LocalFiles`], the embedded default: a directory of the local filesystem.
//! - [`S3Files`] ([`s3`]), for clusters: a bucket of an S3-compatible object store (AWS S3, MinIO,
//!   …), over path-style URLs with hand-written Signature V4 signing. The objects are the only
//!   state (`<prefix>blobs/<hex>`, `<prefix>uploads/<id>/meta` and one object per appended chunk,
//!   `<prefix>uploads/<id>/c/<offset>`), so logic nodes share uploads and a restarted one resumes
//!   them. Completion streams the chunks back through the process and publishes the file with one
//!   `PUT` up to 8 MiB or a multipart upload of 8 MiB parts. Limits: no session tokens;
//!   `https://` with publicly trusted certificates only; concurrent chunks of one upload from two
//!   processes are told apart only by a store that makes `If-None-Match` writes atomic; an
//!   interrupted completion can leave an incomplete multipart upload (a bucket lifecycle rule
//!   removes those). See the module docs.
//! - [`AnyFiles`]: either of them, chosen by configuration.
//!
//! Every backend passes the same behaviour tests (`tests/conformance`). Access control (who may
//! fetch a file) and the HTTP endpoints are the logic node's, not the store's.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub mod s3;
pub use s3::{S3Config, S3Files};

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

impl UploadState {
    /// Whether a chunk of `len` bytes at `offset` may be appended: at the upload's length
    /// (`Offset` otherwise), and not past its declared size (`Invalid`).
    pub fn check_append(&self, offset: u64, len: usize) -> Result<(), FileError> {
        if offset != self.received {
            return Err(FileError::Offset {
                received: self.received,
            });
        }
        if self.received + len as u64 > self.size {
            return Err(FileError::Invalid(format!(
                "the upload declared {} bytes; {len} more would pass it",
                self.size
            )));
        }
        Ok(())
    }
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
    busy: Busy,
}

impl LocalFiles {
    /// Opens (creating) the store in `root`, refusing files larger than `max_size`.
    pub fn open(root: &Path, max_size: u64) -> Result<LocalFiles, FileError> {
        fs::create_dir_all(root.join("blobs")).map_err(io)?;
        fs::create_dir_all(root.join("uploads")).map_err(io)?;
        Ok(LocalFiles {
            root: root.to_path_buf(),
            max_size,
            busy: Busy::default(),
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
        self.busy.claim(id)
    }
}

/// The uploads of one store value (and its clones) with a chunk being written or a completion
/// running: a second one at the same time is refused.
#[derive(Clone, Debug, Default)]
pub(crate) struct Busy(Arc<Mutex<HashSet<UploadId>>>);

impl Busy {
    /// Marks `id` busy for the guard's life; `None` if it already is.
    pub(crate) fn claim(&self, id: UploadId) -> Option<Claim<'_>> {
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Not `then_some`: its argument is built either way, and a `Claim` dropped here (with the
        // lock held) would deadlock and release somebody else's claim.
        if b.insert(id) {
            Some(Claim { busy: self, id })
        } else {
            None
        }
    }
}

pub(crate) struct Claim<'a> {
    busy: &'a Busy,
    id: UploadId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut b = self.busy.0.lock().unwrap_or_else(|p| p.into_inner());
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
        st.check_append(offset, data.len())?;
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

/// A backend chosen by configuration: the server holds one of these.
#[derive(Clone, Debug)]
pub enum AnyFiles {
    Local(LocalFiles),
    S3(S3Files),
}

impl AnyFiles {
    /// Whether every operation completes at its first poll, doing blocking file I/O
    /// ([`LocalFiles`]: large chunks and completions belong on a blocking pool, polled once
    /// there). `false` for [`S3Files`], whose futures must be awaited on a tokio runtime (with
    /// I/O and timers).
    pub fn completes_inline(&self) -> bool {
        matches!(self, AnyFiles::Local(_))
    }
}

impl From<LocalFiles> for AnyFiles {
    fn from(s: LocalFiles) -> AnyFiles {
        AnyFiles::Local(s)
    }
}

impl From<S3Files> for AnyFiles {
    fn from(s: S3Files) -> AnyFiles {
        AnyFiles::S3(s)
    }
}

impl FileStore for AnyFiles {
    async fn begin(&self, file: FileId, size: u64, now_ms: u64) -> Result<UploadId, FileError> {
        match self {
            AnyFiles::Local(s) => s.begin(file, size, now_ms).await,
            AnyFiles::S3(s) => s.begin(file, size, now_ms).await,
        }
    }

    async fn status(&self, id: UploadId) -> Result<UploadState, FileError> {
        match self {
            AnyFiles::Local(s) => s.status(id).await,
            AnyFiles::S3(s) => s.status(id).await,
        }
    }

    async fn append(&self, id: UploadId, offset: u64, data: &[u8]) -> Result<u64, FileError> {
        match self {
            AnyFiles::Local(s) => s.append(id, offset, data).await,
            AnyFiles::S3(s) => s.append(id, offset, data).await,
        }
    }

    async fn complete(&self, id: UploadId) -> Result<FileId, FileError> {
        match self {
            AnyFiles::Local(s) => s.complete(id).await,
            AnyFiles::S3(s) => s.complete(id).await,
        }
    }

    async fn size(&self, file: FileId) -> Result<Option<u64>, FileError> {
        match self {
            AnyFiles::Local(s) => s.size(file).await,
            AnyFiles::S3(s) => s.size(file).await,
        }
    }

    async fn read(&self, file: FileId, start: u64, len: u64) -> Result<Bytes, FileError> {
        match self {
            AnyFiles::Local(s) => s.read(file, start, len).await,
            AnyFiles::S3(s) => s.read(file, start, len).await,
        }
    }

    async fn purge_stale(&self, before_ms: u64) -> Result<usize, FileError> {
        match self {
            AnyFiles::Local(s) => s.purge_stale(before_ms).await,
            AnyFiles::S3(s) => s.purge_stale(before_ms).await,
        }
    }
}

#[cfg(test)]
mod tests {
    //! What only the local backend shows; the behaviours every backend shares are in
    //! `tests/conformance` (run for this one by `tests/local.rs`).
    use super::*;

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
    async fn a_chunk_while_another_of_the_same_upload_is_written_is_told_to_resume() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalFiles::open(d.path(), 1 << 20).unwrap();
        let u = s.begin(FileId::of(b"ab"), 2, 1).await.unwrap();
        let claim = s.claim(u).unwrap();
        assert_eq!(
            s.append(u, 0, b"a").await,
            Err(FileError::Offset { received: 0 })
        );
        assert!(matches!(s.complete(u).await, Err(FileError::Invalid(_))));
        drop(claim);
        assert_eq!(s.append(u, 0, b"a").await.unwrap(), 1);
    }
}
