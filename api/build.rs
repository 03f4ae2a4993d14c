//! Puts the git commit the binary was built from into `IM_GIT_COMMIT` (`im_build_info{commit}`
//! on `/metrics`); "unknown" when the source is not a git checkout or git is missing.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=IM_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves (a commit, a checkout). Only paths that exist: a missing one
    // would make cargo run this script, and rebuild the crate, at every build.
    let mut watched = false;
    for f in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
            watched = true;
        }
    }
    if !watched {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
