//! A real S3-compatible server for tests: an `s3s-fs` process on a free loopback port over a
//! temporary root directory (each bucket is a directory), killed and reaped on drop (and by the
//! kernel if the test process dies first: `PR_SET_PDEATHSIG`).
//!
//! `s3s-fs` comes from `cargo install s3s-fs@0.14.1 --features binary --locked` (`.ci/run` does
//! it). Without it on the `PATH`, [`S3sFs::start`] says "skipped: s3s-fs not installed" and
//! returns `None`, except under CI (`CI` set), where it panics: CI must run these tests.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The credentials every test server accepts.
pub const ACCESS_KEY: &str = "im-test";
pub const SECRET_KEY: &str = "im-test-secret/key+1";
/// How long `s3s-fs` may take to listen.
const STARTUP: Duration = Duration::from_secs(20);
const INSTALL: &str = "cargo install s3s-fs@0.14.1 --features binary --locked";

/// The `s3s-fs` binary on the `PATH`; `None` (after saying so) when it is missing outside CI.
fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("s3s-fs is not on the PATH, and CI is set: .ci/run must install it ({INSTALL})");
        }
        eprintln!("skipped: s3s-fs not installed ({INSTALL})");
    }
    found
}

/// A running `s3s-fs`.
pub struct S3sFs {
    bin: PathBuf,
    child: Option<Child>,
    root: tempfile::TempDir,
    log: tempfile::NamedTempFile,
    addr: SocketAddr,
}

impl S3sFs {
    /// Starts one with the empty bucket `bucket`; `None` if `s3s-fs` is not installed.
    pub fn start(bucket: &str) -> Option<S3sFs> {
        let bin = binary()?;
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join(bucket)).unwrap();
        let mut s = S3sFs {
            bin,
            child: None,
            root,
            log: tempfile::NamedTempFile::new().unwrap(),
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        s.spawn();
        Some(s)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's root directory (a bucket is a directory in it).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Starts the process on a free port, waiting (with a deadline) until it accepts
    /// connections. A port taken between the probe and the bind is retried with another.
    ///
    /// The port comes from [`crate::ports::reserve`], which hands a port out once per test
    /// process. It came from `bind(0)`, and two tests of one process running in parallel could
    /// get the same port a moment apart: the second server failed to bind it, the second
    /// test's probe below connected to the first test's server and took it for its own, and
    /// once the first test ended and killed it, the second one's requests found nothing there
    /// ("Connection refused", seen once in CI). The probe also checks that its own server is
    /// still running.
    fn spawn(&mut self) {
        for _attempt in 0..5 {
            let port = crate::ports::reserve();
            let log = self.log.reopen().unwrap();
            let mut cmd = Command::new(&self.bin);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(self.root.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
            // The server gets SIGKILL if the test process dies before dropping it.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            self.child = Some(cmd.spawn().expect("starting s3s-fs"));
            self.addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + STARTUP;
            loop {
                let child = self.child.as_mut().unwrap();
                if let Some(status) = child.try_wait().unwrap() {
                    self.child = None;
                    let log = fs::read_to_string(self.log.path()).unwrap_or_default();
                    if log.contains("in use") {
                        break; // another port
                    }
                    panic!("s3s-fs exited at startup ({status}):\n{log}");
                }
                if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
                    && child.try_wait().unwrap().is_none()
                {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "s3s-fs did not listen on {} within {STARTUP:?}",
                    self.addr
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("s3s-fs found no free port in 5 attempts");
    }

    /// Kills the process (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process and starts another over the same root (on another port).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}
