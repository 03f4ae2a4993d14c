//! The behaviours every [`FileStore`] backend shares, as generic test bodies: `tests/local.rs`
//! runs them on `LocalFiles`, `tests/s3.rs` on `S3Files` against a real S3 server.
#![allow(dead_code)] // each test binary uses its own share of the helpers

use im_files::{FileError, FileId, FileStore, UploadId};

/// Largest file of the stores under test.
pub const MAX: u64 = 1 << 20;

/// A backend under test and a look at its storage.
pub trait Harness {
    type Store: FileStore;
    /// A new store value over the same storage: what a restarted process opens (`max_size`
    /// [`MAX`]).
    fn open(&self) -> Self::Store;
    /// Stored files, as the storage shows them.
    fn blobs(&self) -> usize;
    /// Objects or files left of uploads.
    fn upload_leftovers(&self) -> usize;
}

pub fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

pub async fn upload<S: FileStore>(s: &S, bytes: &[u8], chunk: usize) -> FileId {
    let id = FileId::of(bytes);
    let u = s.begin(id, bytes.len() as u64, 1).await.unwrap();
    let mut off = 0;
    for c in bytes.chunks(chunk) {
        off = s.append(u, off, c).await.unwrap();
    }
    assert_eq!(s.complete(u).await.unwrap(), id);
    id
}

pub async fn an_upload_in_chunks_is_stored_and_read_back_by_ranges<H: Harness>(h: &H) {
    let s = h.open();
    let bytes = data(100_000);
    let id = upload(&s, &bytes, 30_000).await;
    assert_eq!(s.size(id).await.unwrap(), Some(100_000));
    assert_eq!(&s.read(id, 0, 10).await.unwrap()[..], &bytes[..10]);
    assert_eq!(
        &s.read(id, 29_990, 20).await.unwrap()[..],
        &bytes[29_990..30_010]
    );
    assert_eq!(
        &s.read(id, 99_990, 100).await.unwrap()[..],
        &bytes[99_990..]
    );
    assert_eq!(&s.read(id, 0, 1 << 30).await.unwrap()[..], &bytes[..]);
    assert_eq!(s.read(id, 5, 0).await.unwrap().len(), 0);
    assert_eq!(s.read(id, 100_000, 5).await.unwrap().len(), 0);
    assert!(matches!(
        s.read(id, 100_001, 5).await,
        Err(FileError::Invalid(_))
    ));
    assert!(matches!(
        s.read(id, 100_001, 0).await,
        Err(FileError::Invalid(_))
    ));
    let ghost = FileId::of(b"x");
    assert_eq!(s.read(ghost, 0, 1).await, Err(FileError::NotFound));
    assert_eq!(s.read(ghost, 0, 0).await, Err(FileError::NotFound));
    assert_eq!(s.size(ghost).await.unwrap(), None);
    assert_eq!((h.blobs(), h.upload_leftovers()), (1, 0));
}

pub async fn the_same_file_is_stored_once_and_a_second_upload_proves_possession<H: Harness>(h: &H) {
    let s = h.open();
    let bytes = data(5000);
    let id = upload(&s, &bytes, 5000).await;
    // A second upload of a stored file sends its bytes again and stores nothing new.
    let again = s.begin(id, 5000, 2).await.unwrap();
    s.append(again, 0, &bytes).await.unwrap();
    assert_eq!(s.complete(again).await.unwrap(), id);
    // ... and wrong bytes for a stored file are still refused.
    let forged = s.begin(id, 5000, 2).await.unwrap();
    s.append(forged, 0, &data(5001)[1..]).await.unwrap();
    assert_eq!(s.complete(forged).await, Err(FileError::Mismatch));
    assert_eq!(&s.read(id, 0, 5000).await.unwrap()[..], &bytes[..]);
    // Two uploads of the same bytes racing: both complete, one blob.
    let a = s.begin(FileId::of(b"twice"), 5, 3).await.unwrap();
    let b = s.begin(FileId::of(b"twice"), 5, 3).await.unwrap();
    s.append(a, 0, b"twice").await.unwrap();
    s.append(b, 0, b"twice").await.unwrap();
    assert_eq!(s.complete(a).await.unwrap(), FileId::of(b"twice"));
    assert_eq!(s.complete(b).await.unwrap(), FileId::of(b"twice"));
    assert_eq!(h.blobs(), 2);
    assert_eq!(h.upload_leftovers(), 0);
}

pub async fn an_interrupted_upload_resumes_from_what_the_store_has_after_a_reopen<H: Harness>(
    h: &H,
) {
    let s = h.open();
    let bytes = data(10_000);
    let id = FileId::of(&bytes);
    let u = s.begin(id, 10_000, 1).await.unwrap();
    assert_eq!(s.append(u, 0, &bytes[..4000]).await.unwrap(), 4000);
    // The client lost the answer and sends the chunk again: told where to go on.
    assert_eq!(
        s.append(u, 0, &bytes[..4000]).await,
        Err(FileError::Offset { received: 4000 })
    );
    assert_eq!(
        s.append(u, 5000, &bytes[5000..6000]).await,
        Err(FileError::Offset { received: 4000 })
    );
    drop(s);
    let s = h.open();
    let st = s.status(u).await.unwrap();
    assert_eq!(
        (st.file, st.size, st.received, st.created_ms),
        (id, 10_000, 4000, 1)
    );
    assert!(matches!(
        s.complete(u).await,
        Err(FileError::Offset { received: 4000 })
    ));
    assert_eq!(s.append(u, 4000, &[]).await.unwrap(), 4000);
    assert_eq!(s.append(u, 4000, &bytes[4000..7000]).await.unwrap(), 7000);
    s.append(u, 7000, &bytes[7000..]).await.unwrap();
    assert!(matches!(
        s.append(u, 10_000, b"x").await,
        Err(FileError::Invalid(_))
    ));
    assert_eq!(s.status(u).await.unwrap().received, 10_000);
    assert_eq!(s.complete(u).await.unwrap(), id);
    assert_eq!(s.status(u).await, Err(FileError::NotFound));
    assert_eq!(s.complete(u).await, Err(FileError::NotFound));
    assert_eq!(&s.read(id, 0, 20_000).await.unwrap()[..], &bytes[..]);
}

pub async fn a_chunk_past_the_declared_size_is_refused<H: Harness>(h: &H) {
    let s = h.open();
    let u = s.begin(FileId::of(b"abc"), 3, 1).await.unwrap();
    assert!(matches!(
        s.append(u, 0, b"abcd").await,
        Err(FileError::Invalid(_))
    ));
    assert_eq!(s.status(u).await.unwrap().received, 0);
    assert_eq!(s.append(u, 0, b"abc").await.unwrap(), 3);
    assert_eq!(s.complete(u).await.unwrap(), FileId::of(b"abc"));
}

pub async fn bytes_that_do_not_match_the_declared_hash_are_discarded<H: Harness>(h: &H) {
    let s = h.open();
    let claimed = FileId::of(b"what I said");
    let u = s.begin(claimed, 6, 1).await.unwrap();
    s.append(u, 0, b"forged").await.unwrap();
    assert_eq!(s.complete(u).await, Err(FileError::Mismatch));
    assert_eq!(s.size(claimed).await.unwrap(), None);
    assert_eq!(s.status(u).await, Err(FileError::NotFound));
    assert_eq!((h.blobs(), h.upload_leftovers()), (0, 0));
}

pub async fn sizes_out_of_bounds_and_unknown_uploads_are_refused<H: Harness>(h: &H) {
    let s = h.open();
    let f = FileId::of(b"x");
    assert!(matches!(s.begin(f, 0, 1).await, Err(FileError::Invalid(_))));
    assert!(matches!(
        s.begin(f, MAX + 1, 1).await,
        Err(FileError::Invalid(_))
    ));
    assert!(s.begin(f, MAX, 1).await.is_ok());
    let ghost = UploadId::random();
    assert_eq!(s.status(ghost).await, Err(FileError::NotFound));
    assert_eq!(s.append(ghost, 0, b"x").await, Err(FileError::NotFound));
    assert_eq!(s.complete(ghost).await, Err(FileError::NotFound));
}

pub async fn stale_uploads_are_purged_and_recent_ones_kept<H: Harness>(h: &H) {
    let s = h.open();
    let old = s.begin(FileId::of(b"old"), 3, 1_000).await.unwrap();
    let new = s.begin(FileId::of(b"new"), 3, 9_000).await.unwrap();
    s.append(old, 0, b"ol").await.unwrap();
    s.append(new, 0, b"n").await.unwrap();
    assert_eq!(s.purge_stale(5_000).await.unwrap(), 1);
    assert_eq!(s.status(old).await, Err(FileError::NotFound));
    assert_eq!(s.append(old, 2, b"d").await, Err(FileError::NotFound));
    assert_eq!(s.status(new).await.unwrap().received, 1);
    assert_eq!(s.purge_stale(5_000).await.unwrap(), 0);
    assert_eq!(s.append(new, 1, b"ew").await.unwrap(), 3);
    assert_eq!(s.complete(new).await.unwrap(), FileId::of(b"new"));
    assert_eq!(s.purge_stale(u64::MAX).await.unwrap(), 0);
    assert_eq!(h.upload_leftovers(), 0);
}

/// One `#[tokio::test]` per behaviour; `$harness` evaluates to `Option<impl Harness>` (`None`:
/// the backend is not available here, and the test returns).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            an_upload_in_chunks_is_stored_and_read_back_by_ranges,
            the_same_file_is_stored_once_and_a_second_upload_proves_possession,
            an_interrupted_upload_resumes_from_what_the_store_has_after_a_reopen,
            a_chunk_past_the_declared_size_is_refused,
            bytes_that_do_not_match_the_declared_hash_are_discarded,
            sizes_out_of_bounds_and_unknown_uploads_are_refused,
            stale_uploads_are_purged_and_recent_ones_kept,
        );
    };
    (@each $harness:expr; $($name:ident,)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(h) = $harness else { return };
                conformance::$name(&h).await;
            }
        )*
    };
}
