//! The file service's configuration (`[files]`) and what the logic tier and the HTTP API get of
//! it (docs/API.md, "Files").

use std::path::PathBuf;
use std::sync::Arc;

use im_api::FilesHttp;
use im_logic::FilesPolicy;
use im_shared::files::FileKeys;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::ServerConfig;

/// `[files]` of the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// File messages and the file endpoints (default on).
    pub enabled: bool,
    /// Directory of the local backend (default `<data_dir>/files`).
    pub dir: Option<PathBuf>,
    /// Secret of file keys, upload tickets and download URLs; every logic node of a cluster
    /// needs the same. Default: derived from `token_secret`.
    pub secret: Option<String>,
    /// Base URL clients reach the file endpoints at (`https://files.example.com`). Default: the
    /// HTTP API's own address. In a cluster with the local backend, every node names the one
    /// node that stores the files.
    pub public_url: Option<String>,
    /// Largest file in bytes (a video or a document; images ≤ 32 MiB, voice ≤ 16 MiB).
    pub max_size: u64,
    /// Largest chunk of one upload request.
    pub max_chunk: usize,
    /// Lifetime of an upload ticket, of a download URL.
    pub ticket_secs: u64,
    pub url_secs: u64,
    /// An S3-compatible object store (`[files.s3]`) instead of the local directory: what a
    /// cluster's logic nodes share.
    pub s3: Option<im_files::S3Config>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            enabled: true,
            dir: None,
            secret: None,
            public_url: None,
            max_size: 256 << 20,
            max_chunk: im_api::DEFAULT_MAX_CHUNK,
            ticket_secs: 900,
            url_secs: 3600,
            s3: None,
        }
    }
}

fn keys(cfg: &ServerConfig) -> FileKeys {
    match &cfg.files.secret {
        Some(s) => FileKeys::new(s.as_bytes().to_vec()),
        None => {
            let mut h = Sha256::new();
            h.update(b"im-files\0");
            h.update(cfg.token_secret.as_bytes());
            FileKeys::new(h.finalize().to_vec())
        }
    }
}

/// What logic needs: `None` when the file service is off.
pub(crate) fn policy(cfg: &ServerConfig) -> Option<Arc<FilesPolicy>> {
    let f = &cfg.files;
    f.enabled.then(|| {
        Arc::new(FilesPolicy {
            keys: keys(cfg),
            base_url: std::sync::RwLock::new(
                f.public_url
                    .as_deref()
                    .unwrap_or("")
                    .trim_end_matches('/')
                    .to_owned(),
            ),
            max_size: f.max_size,
            ticket_ms: f.ticket_secs * 1000,
            url_ms: f.url_secs * 1000,
        })
    })
}

/// What the HTTP API needs: the store opened.
pub(crate) fn http(cfg: &ServerConfig) -> anyhow::Result<Option<FilesHttp>> {
    let f = &cfg.files;
    if !f.enabled {
        return Ok(None);
    }
    let store = match &f.s3 {
        Some(s3) => {
            let s = im_files::S3Files::new(s3.clone(), f.max_size)
                .map_err(|e| anyhow::anyhow!("the file store's [files.s3]: {e}"))?;
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, "file store: S3");
            im_files::AnyFiles::S3(s)
        }
        None => {
            let dir = f.dir.clone().unwrap_or_else(|| cfg.data_dir.join("files"));
            let s = im_files::LocalFiles::open(&dir, f.max_size)
                .map_err(|e| anyhow::anyhow!("opening the file store in {}: {e}", dir.display()))?;
            im_files::AnyFiles::Local(s)
        }
    };
    Ok(Some(FilesHttp {
        store,
        keys: keys(cfg),
        max_chunk: f.max_chunk,
    }))
}

/// Once the API listens at `addr`: the base URL handed to clients, unless configured.
pub(crate) fn announce(policy: Option<&Arc<FilesPolicy>>, addr: std::net::SocketAddr) {
    if let Some(p) = policy {
        if p.base_url().is_empty() {
            p.set_base_url(&format!("http://{addr}"));
        }
    }
}
