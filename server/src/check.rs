//! `im-server check-config`: what a start with this configuration would run into, found without
//! starting: listeners already in use, TLS files that do not load, a data directory that cannot
//! be written, the development token secret, an API without keys, a cluster's file service
//! without a shared URL or secret.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use crate::{ServerConfig, DEV_TOKEN_SECRET};

/// Which process the configuration is for (the listeners and stores it uses differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Run,
    Gate,
    Logic,
}

/// What the check found: problems that would stop or break a start, and warnings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// What was checked and is fine.
    pub ok: Vec<String>,
}

fn listener(f: &mut Findings, what: &str, addr: SocketAddr) {
    if addr.port() == 0 {
        f.ok.push(format!("{what} {addr}: a free port is picked at start"));
        return;
    }
    // A plain bind (no SO_REUSEPORT): refused while anything listens there, as the gate's own
    // start is (gate/src/core.rs).
    match TcpListener::bind(addr) {
        Ok(_) => f.ok.push(format!("{what} {addr}: free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => f.errors.push(format!(
            "{what} {addr} is already in use (another server listening there?)"
        )),
        Err(e) => f.errors.push(format!("{what} {addr} cannot be bound: {e}")),
    }
}

fn tls(f: &mut Findings, what: &str, paths: &crate::TlsPaths) {
    match im_gate::transport::tls::server_config(&paths.into()) {
        Ok(_) => f.ok.push(format!("{what}: certificate and key load")),
        Err(e) => f.errors.push(format!(
            "{what}: {} / {}: {e}",
            paths.cert.display(),
            paths.key.display()
        )),
    }
}

fn data_dir(f: &mut Findings, dir: &Path) {
    let probe = |d: &Path| -> std::io::Result<()> {
        let p = d.join(".im-check-config");
        std::fs::write(&p, b"")?;
        std::fs::remove_file(&p)
    };
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    match probe(existing) {
        Ok(()) if existing == dir => f.ok.push(format!("data_dir {}: writable", dir.display())),
        Ok(()) => f.ok.push(format!(
            "data_dir {}: will be created under {}",
            dir.display(),
            existing.display()
        )),
        Err(e) => f.errors.push(format!(
            "data_dir {}: cannot write in {}: {e}",
            dir.display(),
            existing.display()
        )),
    }
}

/// The file service's S3 store: its configuration, then a HEAD of the bucket (credentials,
/// bucket, reachability), within a few seconds.
fn s3_store(f: &mut Findings, s3: &im_files::S3Config, max_size: u64) {
    let what = format!("[files.s3] {} bucket {}", s3.endpoint, s3.bucket);
    let store = match im_files::S3Files::new(s3.clone(), max_size) {
        Ok(s) => s,
        Err(e) => return f.errors.push(format!("{what}: {e}")),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return f
                .errors
                .push(format!("{what}: no runtime to check it: {e}"))
        }
    };
    let checked = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), store.check()).await
    });
    match checked {
        Ok(Ok(())) => {
            f.ok.push(format!("{what}: reachable, bucket and credentials work"))
        }
        Ok(Err(e)) => f.errors.push(format!("{what}: {e}")),
        Err(_) => f.errors.push(format!("{what}: no answer within 10 s")),
    }
}

/// Checks `cfg` for `role`; `link_listen`: a logic node's link address, if known.
pub fn check(cfg: &ServerConfig, role: Role, link_listen: Option<SocketAddr>) -> Findings {
    let mut f = Findings::default();
    let gate = matches!(role, Role::Run | Role::Gate);
    let logic = matches!(role, Role::Run | Role::Logic);
    if gate {
        listener(&mut f, "listen", cfg.listen);
        if let Some(a) = cfg.ws_listen {
            listener(&mut f, "ws_listen", a);
        }
        if let Some(t) = &cfg.tcp_tls {
            tls(&mut f, "tcp_tls", t);
        }
        if let Some(t) = &cfg.ws_tls {
            tls(&mut f, "ws_tls", t);
        }
        if let Some(w) = &cfg.web_root {
            if !w.join("index.html").is_file() {
                f.errors
                    .push(format!("web_root {}: no index.html", w.display()));
            }
        }
    }
    if role == Role::Gate {
        if let Some(a) = cfg.status_listen {
            listener(&mut f, "status_listen", a);
        }
    }
    if logic {
        if let Some(a) = link_listen {
            listener(&mut f, "link_listen", a);
        }
        if let Some(api) = &cfg.api {
            listener(&mut f, "api listen", api.listen);
            if api.keys.is_empty() {
                f.warnings.push(
                    "[api] has no keys: every signed route (messages, groups, organisation tree) \
                     answers 401"
                        .into(),
                );
            }
        }
        if role == Role::Run || cfg.scylla_nodes.is_empty() {
            data_dir(&mut f, &cfg.data_dir);
        }
        if cfg.token_secret == DEV_TOKEN_SECRET {
            f.warnings.push(
                "token_secret is the public development secret: anyone can mint tokens; set \
                 IM_TOKEN_SECRET"
                    .into(),
            );
        }
        if cfg.files.enabled {
            match &cfg.files.s3 {
                Some(s3) => s3_store(&mut f, s3, cfg.files.max_size),
                None => {
                    if let Some(d) = &cfg.files.dir {
                        data_dir(&mut f, d);
                    }
                }
            }
            if role == Role::Logic && cfg.files.public_url.is_none() && cfg.files.s3.is_none() {
                f.warnings.push(
                    "[files] has no public_url and no [files.s3]: each logic node hands out its \
                     own API address, so with several nodes a file uploaded through one is not \
                     found through another; share an S3 store ([files.s3]) or name the one node \
                     that stores the files in every node's public_url"
                        .into(),
                );
            }
            if role == Role::Logic && cfg.files.secret.is_none() {
                f.warnings.push(
                    "[files] has no secret: it is derived from token_secret, which every logic \
                     node must then share"
                        .into(),
                );
            }
        }
        for n in &cfg.redis_nodes {
            if !n.starts_with("redis://") && !n.starts_with("rediss://") {
                f.errors.push(format!(
                    "redis_nodes: {n:?} is not a redis:// or rediss:// URL"
                ));
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> ServerConfig {
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.join("data"),
            api: Some(im_api::ApiConfig::new("127.0.0.1:0".parse().unwrap())),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn a_listener_in_use_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = cfg(d.path());
        c.listen = taken.local_addr().unwrap();
        let f = check(&c, Role::Run, None);
        assert_eq!(f.errors.len(), 1, "{f:?}");
        assert!(f.errors[0].contains(&c.listen.to_string()) && f.errors[0].contains("in use"));
        // The gate's status listener is a gate's only.
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.status_listen = Some(taken.local_addr().unwrap());
        assert!(check(&c, Role::Run, None).errors.is_empty());
        assert_eq!(check(&c, Role::Gate, None).errors.len(), 1);
    }

    #[test]
    fn the_dev_secret_and_an_api_without_keys_are_warnings() {
        let d = tempfile::tempdir().unwrap();
        let f = check(&cfg(d.path()), Role::Run, None);
        assert!(f.errors.is_empty(), "{f:?}");
        assert_eq!(f.warnings.len(), 2, "{f:?}");
        let mut c = cfg(d.path());
        c.token_secret = "s".repeat(32);
        c.api.as_mut().unwrap().keys.insert("k".into(), "s".into());
        assert!(check(&c, Role::Run, None).warnings.is_empty());
        assert!(
            check(&c, Role::Gate, None).warnings.is_empty(),
            "a gate has neither"
        );
        // A logic node of a cluster is told what its file service needs.
        let w = check(&c, Role::Logic, None).warnings;
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("public_url") && w[1].contains("secret"),
            "{w:?}"
        );
        c.files.public_url = Some("http://10.0.0.1:8080".into());
        c.files.secret = Some("x".repeat(32));
        assert!(check(&c, Role::Logic, None).warnings.is_empty());
    }

    #[test]
    fn unreadable_tls_files_a_missing_web_root_and_a_bad_redis_url_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.tcp_tls = Some(crate::TlsPaths {
            cert: d.path().join("nope.pem"),
            key: d.path().join("nope.key"),
        });
        c.web_root = Some(d.path().to_path_buf());
        c.redis_nodes = vec!["127.0.0.1:7001".into()];
        let f = check(&c, Role::Run, None);
        assert_eq!(f.errors.len(), 3, "{f:?}");
    }

    #[test]
    fn a_data_dir_that_cannot_be_written_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let mut c = cfg(d.path());
        c.data_dir = file.join("data"); // under a regular file
        let f = check(&c, Role::Run, None);
        assert!(f.errors.iter().any(|e| e.contains("data_dir")), "{f:?}");
    }
}
