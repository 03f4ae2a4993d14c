//! `S3Files` against a real S3 server: an `s3s-fs` process per test, on a free loopback port
//! with a temporary root directory (its buckets are directories), killed and reaped when the test
//! ends, panics included. The shared behaviours (`conformance`) run on it, then what only an
//! object store shows: multipart publication, restarts of the server, two store values (two
//! nodes) on one upload, concurrent chunks, errors.
//!
//! `s3s-fs` comes from `cargo install s3s-fs@0.14.1 --features binary --locked` (`.ci/run` does
//! it). Without it on the `PATH` these tests print "skipped: s3s-fs not installed" and pass,
//! except under CI (`CI` set), where they fail.

mod conformance;

use std::fs;
use std::path::Path;

use conformance::{data, upload, Harness, MAX};
use im_files::{AnyFiles, FileError, FileId, FileStore, S3Config, S3Files, UploadId};
use im_testkit::s3s::S3sFs;

const BUCKET: &str = "im-files";

/// The test server's credentials and bucket at `endpoint`, objects under `prefix`.
fn config_at(endpoint: String, prefix: &str) -> S3Config {
    S3Config {
        endpoint,
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        access_key: im_testkit::s3s::ACCESS_KEY.into(),
        secret_key: im_testkit::s3s::SECRET_KEY.into(),
        prefix: prefix.into(),
    }
}

/// A running `s3s-fs` (im-testkit) with the bucket [`BUCKET`] and the store's views of it.
struct Server {
    s3: S3sFs,
}

impl Server {
    /// `None` (the test returns: skipped) if `s3s-fs` is not installed outside CI.
    fn start() -> Option<Server> {
        S3sFs::start(BUCKET).map(|s3| Server { s3 })
    }

    /// Kills the process and starts another over the same root (on another port).
    fn restart(&mut self) {
        self.s3.restart();
    }

    fn config(&self, prefix: &str) -> S3Config {
        config_at(self.s3.endpoint(), prefix)
    }

    fn store(&self, prefix: &str, max_size: u64) -> S3Files {
        S3Files::new(self.config(prefix), max_size).unwrap()
    }

    /// Files under `dir` of the bucket.
    fn files(&self, dir: &str) -> usize {
        count(&self.s3.root().join(BUCKET).join(dir))
    }

    /// Files of unfinished multipart uploads in s3s-fs' root.
    fn multipart_leftovers(&self) -> usize {
        fs::read_dir(self.s3.root())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(".upload")
            })
            .count()
    }
}

fn count(dir: &Path) -> usize {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    count(&e.path())
                } else {
                    1
                }
            })
            .sum(),
        Err(_) => 0,
    }
}

/// The conformance harness: stores under the key prefix `t/files`.
struct S3 {
    server: Server,
}

const PREFIX: &str = "t/files";

fn s3() -> Option<S3> {
    Server::start().map(|server| S3 { server })
}

impl Harness for S3 {
    type Store = S3Files;
    fn open(&self) -> S3Files {
        self.server.store(PREFIX, MAX)
    }
    fn blobs(&self) -> usize {
        self.server.files(&format!("{PREFIX}/blobs"))
    }
    fn upload_leftovers(&self) -> usize {
        self.server.files(&format!("{PREFIX}/uploads"))
    }
}

conformance_tests!(s3());

#[tokio::test]
async fn through_any_files_the_s3_backend_behaves_the_same() {
    struct Any(S3);
    impl Harness for Any {
        type Store = AnyFiles;
        fn open(&self) -> AnyFiles {
            let s = AnyFiles::S3(self.0.open());
            assert!(!s.completes_inline());
            s
        }
        fn blobs(&self) -> usize {
            self.0.blobs()
        }
        fn upload_leftovers(&self) -> usize {
            self.0.upload_leftovers()
        }
    }
    let Some(h) = s3() else { return };
    let h = Any(h);
    conformance::an_interrupted_upload_resumes_from_what_the_store_has_after_a_reopen(&h).await;
    conformance::stale_uploads_are_purged_and_recent_ones_kept(&h).await;
}

#[tokio::test]
async fn a_large_file_is_published_by_multipart_and_read_across_its_parts() {
    let Some(srv) = Server::start() else { return };
    srv.store("", 0).check().await.unwrap();
    let s = srv.store("", 64 << 20);
    // Three parts (8 + 8 + 1.x MiB) from chunks that do not line up with them.
    let bytes = data((17 << 20) + 12_345);
    let id = upload(&s, &bytes, (3 << 20) + 7).await;
    assert_eq!(srv.files("blobs"), 1);
    assert_eq!(srv.files("uploads"), 0);
    assert_eq!(srv.multipart_leftovers(), 0);
    assert_eq!(s.size(id).await.unwrap(), Some(bytes.len() as u64));
    let m = 8 << 20;
    for (start, len) in [(0, 10), (m - 5, 10), (2 * m - 1, 2), (bytes.len() - 3, 10)] {
        assert_eq!(
            &s.read(id, start as u64, len as u64).await.unwrap()[..],
            &bytes[start..(start + len).min(bytes.len())],
            "{start}+{len}"
        );
    }
    assert_eq!(
        FileId::of(&s.read(id, 0, u64::MAX).await.unwrap()),
        id,
        "the whole file"
    );

    // The same file again: hashed (possession), not stored again.
    assert_eq!(upload(&s, &bytes, 5 << 20).await, id);
    assert_eq!((srv.files("blobs"), srv.files("uploads")), (1, 0));

    // Wrong bytes for a large new file: the multipart upload is aborted, nothing published.
    let claimed = FileId::of(b"not these bytes");
    let u = s.begin(claimed, bytes.len() as u64, 1).await.unwrap();
    let mut off = 0;
    for c in bytes.chunks(4 << 20) {
        off = s.append(u, off, c).await.unwrap();
    }
    assert_eq!(s.complete(u).await, Err(FileError::Mismatch));
    assert_eq!(s.size(claimed).await.unwrap(), None);
    assert_eq!((srv.files("blobs"), srv.files("uploads")), (1, 0));
    assert_eq!(srv.multipart_leftovers(), 0);
}

#[tokio::test]
async fn an_upload_of_more_chunks_than_one_listing_page_holds() {
    let Some(srv) = Server::start() else { return };
    let bytes = data(11_000);
    let id = FileId::of(&bytes);
    let s = srv.store(PREFIX, MAX);
    let u = s.begin(id, 11_000, 1).await.unwrap();
    assert_eq!(s.append(u, 0, &bytes[..10]).await.unwrap(), 10);
    // 1049 more 10-byte chunks, written straight into s3s-fs' directories: through the store,
    // each append makes s3s-fs walk the whole bucket (a minute for this test).
    let chunks = srv
        .s3
        .root()
        .join(BUCKET)
        .join(PREFIX)
        .join("uploads")
        .join(u.to_hex())
        .join("c");
    for off in (10..10_500).step_by(10) {
        fs::write(chunks.join(format!("{off:020}")), &bytes[off..off + 10]).unwrap();
    }
    // The store value that appended knows its last chunk and lists after it; a new one lists all
    // 1050, over two pages (1000 a page).
    assert_eq!(s.status(u).await.unwrap().received, 10_500);
    let s = srv.store(PREFIX, MAX);
    assert_eq!(s.status(u).await.unwrap().received, 10_500);
    assert_eq!(s.append(u, 10_500, &bytes[10_500..]).await.unwrap(), 11_000);
    assert_eq!(s.status(u).await.unwrap().received, 11_000);
    // Not completed here: s3s-fs answers each GET with a body about 30 ms late (Nagle's
    // algorithm against delayed ACKs; it does not set TCP_NODELAY), half a minute for 1051
    // chunks. Removing the upload deletes them all.
    assert_eq!(s.purge_stale(u64::MAX).await.unwrap(), 1);
    assert_eq!(s.status(u).await, Err(FileError::NotFound));
    assert_eq!(srv.files(&format!("{PREFIX}/uploads")), 0);
}

#[tokio::test]
async fn an_upload_survives_a_restart_of_the_server_and_of_the_store() {
    let Some(mut srv) = Server::start() else {
        return;
    };
    let bytes = data(50_000);
    let id = FileId::of(&bytes);
    let s = srv.store(PREFIX, MAX);
    let u = s.begin(id, 50_000, 7).await.unwrap();
    assert_eq!(s.append(u, 0, &bytes[..20_000]).await.unwrap(), 20_000);
    drop(s);
    srv.restart();
    let s = srv.store(PREFIX, MAX);
    let st = s.status(u).await.unwrap();
    assert_eq!(
        (st.file, st.size, st.received, st.created_ms),
        (id, 50_000, 20_000, 7)
    );
    assert_eq!(s.append(u, 20_000, &bytes[20_000..]).await.unwrap(), 50_000);
    assert_eq!(s.complete(u).await.unwrap(), id);
    srv.restart();
    let s = srv.store(PREFIX, MAX);
    assert_eq!(&s.read(id, 0, 50_000).await.unwrap()[..], &bytes[..]);
}

#[tokio::test]
async fn two_nodes_share_an_upload_and_a_stale_one_is_told_where_to_go_on() {
    let Some(srv) = Server::start() else { return };
    let (a, b) = (srv.store(PREFIX, MAX), srv.store(PREFIX, MAX));
    let bytes = data(9);
    let id = FileId::of(&bytes);
    let u = a.begin(id, 9, 1).await.unwrap();
    assert_eq!(a.append(u, 0, &bytes[..4]).await.unwrap(), 4);
    // The client's connection moved to node b.
    assert_eq!(b.status(u).await.unwrap().received, 4);
    assert_eq!(b.append(u, 4, &bytes[4..7]).await.unwrap(), 7);
    // Back on node a, which last saw 4 bytes: it finds b's chunk.
    assert_eq!(
        a.append(u, 4, &bytes[4..7]).await,
        Err(FileError::Offset { received: 7 })
    );
    assert_eq!(a.append(u, 7, &bytes[7..]).await.unwrap(), 9);
    assert_eq!(b.complete(u).await.unwrap(), id);
    assert_eq!(a.status(u).await, Err(FileError::NotFound));
    assert_eq!(&a.read(id, 0, 9).await.unwrap()[..], &bytes[..]);
}

#[tokio::test]
async fn a_chunk_while_another_of_the_same_upload_is_written_is_told_to_resume() {
    let Some(srv) = Server::start() else { return };
    let s = srv.store(PREFIX, MAX);
    let u = s.begin(FileId::of(b"ab"), 2, 1).await.unwrap();
    // Both start before either finishes (one thread: the first waits on the network first).
    let (first, second) = tokio::join!(s.append(u, 0, b"a"), s.append(u, 0, b"ab"));
    assert_eq!(first, Ok(1));
    assert!(
        matches!(second, Err(FileError::Offset { .. })),
        "{second:?}"
    );
    // And a completion while a chunk is written is refused.
    let (chunk, done) = tokio::join!(s.append(u, 1, b"b"), s.complete(u));
    assert_eq!(chunk, Ok(2));
    assert!(matches!(done, Err(FileError::Invalid(_))), "{done:?}");
    assert_eq!(s.complete(u).await.unwrap(), FileId::of(b"ab"));
}

#[tokio::test]
async fn chunks_left_without_their_upload_are_purged() {
    let Some(srv) = Server::start() else { return };
    let s = srv.store(PREFIX, MAX);
    let u = s.begin(FileId::of(b"abc"), 3, 1).await.unwrap();
    s.append(u, 0, b"ab").await.unwrap();
    // A removal that stopped after the meta object.
    let dir = srv
        .s3
        .root()
        .join(BUCKET)
        .join(PREFIX)
        .join("uploads")
        .join(u.to_hex());
    fs::remove_file(dir.join("meta")).unwrap();
    assert_eq!(s.status(u).await, Err(FileError::NotFound));
    assert_eq!(srv.files(&format!("{PREFIX}/uploads")), 1);
    assert_eq!(s.purge_stale(0).await.unwrap(), 0);
    assert_eq!(srv.files(&format!("{PREFIX}/uploads")), 0);
}

#[tokio::test]
async fn failures_of_the_store_are_io_errors_that_say_what_failed() {
    let Some(srv) = Server::start() else { return };
    srv.store(PREFIX, MAX).check().await.unwrap();
    let wrong_secret = S3Files::new(
        S3Config {
            secret_key: "not the secret".into(),
            ..srv.config(PREFIX)
        },
        MAX,
    )
    .unwrap();
    let e = wrong_secret
        .begin(FileId::of(b"x"), 1, 1)
        .await
        .unwrap_err();
    let FileError::Io(m) = e else { panic!("{e:?}") };
    assert!(
        m.contains("403") && m.contains("SignatureDoesNotMatch"),
        "{m}"
    );

    let no_bucket = S3Files::new(
        S3Config {
            bucket: "missing".into(),
            ..srv.config(PREFIX)
        },
        MAX,
    )
    .unwrap();
    let e = no_bucket.check().await.unwrap_err();
    assert!(
        matches!(&e, FileError::Io(m) if m.contains("does not exist")),
        "{e:?}"
    );
    // (Writes would not show it: s3s-fs creates a missing bucket's directory on a PUT.)
}

#[tokio::test]
async fn an_unreachable_store_is_an_io_error_naming_it() {
    // A port nothing listens on (no s3s-fs needed), handed out once in this process: a port
    // from `bind(0)`, once dropped, could go to another test's server by its next `bind(0)`.
    let port = im_testkit::ports::reserve();
    let s = S3Files::new(config_at(format!("http://127.0.0.1:{port}"), ""), MAX).unwrap();
    let e = s.status(UploadId::random()).await.unwrap_err();
    let FileError::Io(m) = e else { panic!("{e:?}") };
    assert!(
        m.contains(&format!("127.0.0.1:{port}")) && m.contains("onnect"),
        "{m}"
    );
}

#[test]
fn the_futures_of_the_stores_are_send() {
    fn send<T: Send>(_: T) {}
    let s = S3Files::new(config_at("http://127.0.0.1:9".into(), ""), MAX).unwrap();
    let a = AnyFiles::S3(s.clone());
    let (f, u) = (FileId::of(b""), UploadId::random());
    send(s.begin(f, 1, 1));
    send(s.status(u));
    send(s.append(u, 0, b"x"));
    send(s.complete(u));
    send(s.size(f));
    send(s.read(f, 0, 1));
    send(s.purge_stale(0));
    send(s.check());
    send(a.begin(f, 1, 1));
    send(a.status(u));
    send(a.append(u, 0, b"x"));
    send(a.complete(u));
    send(a.size(f));
    send(a.read(f, 0, 1));
    send(a.purge_stale(0));
}
