//! The generated bindings against a real server: Python bindings are generated from the built
//! library with the crate's `uniffi-bindgen`, and `tests/python/chat.py` chats through them
//! (two users, both ways, a dropped connection with a resend, a kickout). Kotlin and Swift
//! sources are generated too and checked for the exported names (no compiler needed).
//!
//! Without `python3` the Python test prints `skipped: …` and passes, unless `IM_PYTHON_TESTS=1`
//! (CI sets it), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use im_shared::token::{now_secs, HmacTokens};
use im_shared::UserId;

/// The cdylib cargo built for this test's profile: `target/<profile>/` beside `deps/`.
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let name = format!(
        "{}im_client_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    for dir in [deps.parent().unwrap(), deps] {
        let p = dir.join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found next to {} (cargo builds it with the test)",
        exe.display()
    );
}

/// Generates the bindings of `language` into `out` (the library is copied beside them).
fn generate(language: &str, out: &Path) {
    let lib = cdylib();
    let st = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args([
            "generate",
            "--no-format",
            "--language",
            language,
            "--library",
        ])
        .arg(&lib)
        .arg("--out-dir")
        .arg(out)
        .status()
        .expect("run uniffi-bindgen");
    assert!(st.success(), "uniffi-bindgen {language}: {st}");
    std::fs::copy(&lib, out.join(lib.file_name().unwrap())).unwrap();
}

/// Kills the child if the test fails before it is reaped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

fn python3() -> Option<()> {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(());
    }
    assert!(
        std::env::var("IM_PYTHON_TESTS").as_deref() != Ok("1"),
        "python3 not found and IM_PYTHON_TESTS=1"
    );
    eprintln!("skipped: python3 not found (IM_PYTHON_TESTS=1 makes this a failure)");
    None
}

#[test]
fn python_chats_through_the_bindings_against_a_real_server() {
    if python3().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("py");
    std::fs::create_dir_all(&module).unwrap();
    generate("python", &module);

    let mut cfg = im_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        gate_cores: 1,
        logic_workers: 1,
        ..Default::default()
    };
    cfg.api.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
    let tokens = HmacTokens::new(cfg.token_secret.as_bytes());
    let server = im_server::start(&cfg).unwrap();
    let conf = format!(
        r#"{{"gate":"{}","tokens":{{"1":"{}","2":"{}"}}}}"#,
        server.local_addr(),
        tokens.mint(UserId(1), now_secs() + 3600),
        tokens.mint(UserId(2), now_secs() + 3600),
    );
    let out = dir.path().join("out.txt");
    let err = dir.path().join("err.txt");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/chat.py");
    let mut child = Reap(
        Command::new("python3")
            .arg(&script)
            .arg(&module)
            .arg(&conf)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "chat.py did not finish within 120 s; stderr so far:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out).unwrap();
    let err = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "chat.py: {status}\n{out}\n{err}");
    assert!(out.contains("chat.py: ok"), "{out}\n{err}");
    drop(server);
}

#[test]
fn kotlin_and_swift_bindings_are_generated_with_the_exported_names() {
    let dir = tempfile::tempdir().unwrap();
    for (lang, ext, names) in [
        (
            "kotlin",
            "kt",
            &[
                "class ImSession",
                "fun `sendC2c`(",
                "fun `nextEvent`(",
                "fun `reconnectWaitMs`(",
                "fun `gateOrder`(",
                "SendAcked",
            ][..],
        ),
        (
            "swift",
            "swift",
            &[
                "class ImSession",
                "func sendC2c(",
                "func nextEvent(",
                "func reconnectWaitMs(",
                "func gateOrder(",
                "sendAcked",
            ][..],
        ),
    ] {
        let out = dir.path().join(lang);
        std::fs::create_dir_all(&out).unwrap();
        generate(lang, &out);
        let mut src = String::new();
        for e in walk(&out) {
            if e.extension().is_some_and(|x| x == ext) {
                src.push_str(&std::fs::read_to_string(&e).unwrap());
            }
        }
        assert!(!src.is_empty(), "no .{ext} file generated");
        for n in names {
            assert!(src.contains(n), "{lang}: {n:?} missing");
        }
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
