//! TLS for the client listeners: a rustls server configuration (ring provider, TLS 1.3 and 1.2)
//! whose certificate is re-read from its PEM files when they change, without a restart.
//!
//! The certificate resolver holds the current chain and key behind an `RwLock<Arc<_>>`; at most
//! once per [`RELOAD_CHECK`] a handshake looks at both files' modification times and sizes and,
//! if either changed, loads them again. A pair that fails to load (half-written, key not
//! matching) is logged and the previous certificate stays in use; the next check tries again.
//! Established connections keep the certificate they were made with.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// PEM files of one listener's certificate chain (leaf first) and private key (PKCS#8, PKCS#1
/// or SEC1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How often a handshake may look at the files' modification times.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Builds the server configuration of a listener. Fails if the files do not hold a usable pair.
pub fn server_config(files: &TlsFiles) -> std::io::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert::new(files.clone(), provider.clone())?);
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(cfg))
}

/// Modification time and size of both files.
type Stamp = (Option<SystemTime>, u64, Option<SystemTime>, u64);

/// A certificate resolver that re-reads its files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: Mutex<Stamp>,
    /// Unix milliseconds of the next look at the files.
    next_check: AtomicU64,
}

impl ReloadingCert {
    pub fn new(files: TlsFiles, provider: Arc<CryptoProvider>) -> std::io::Result<ReloadingCert> {
        let stamp = stamp(&files);
        let key = load(&files, &provider)?;
        Ok(ReloadingCert {
            files,
            provider,
            current: RwLock::new(Arc::new(key)),
            stamp: Mutex::new(stamp),
            next_check: AtomicU64::new(now_ms() + RELOAD_CHECK.as_millis() as u64),
        })
    }

    /// Re-reads the files if their stamps changed. Returns whether a new certificate is in use.
    pub fn check(&self) -> bool {
        let now = stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *last == now {
            return false;
        }
        match load(&self.files, &self.provider) {
            Ok(k) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
                *last = now;
                tracing::info!(cert = ?self.files.cert, "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(cert = ?self.files.cert, "TLS certificate not reloaded, keeping the previous one: {e}");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let now = now_ms();
        let due = self.next_check.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_check
                .compare_exchange(
                    due,
                    now + RELOAD_CHECK.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.check();
        }
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn stamp(f: &TlsFiles) -> Stamp {
    let one = |p: &PathBuf| match std::fs::metadata(p) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    };
    let (a, b) = one(&f.cert);
    let (c, d) = one(&f.key);
    (a, b, c, d)
}

fn load(f: &TlsFiles, provider: &CryptoProvider) -> std::io::Result<CertifiedKey> {
    let bad = |what: &str, p: &PathBuf, e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("TLS {what} {}: {e}", p.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| bad("certificate", &f.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", &f.cert, &e))?;
    if certs.is_empty() {
        return Err(bad("certificate", &f.cert, &"no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&f.key).map_err(|e| bad("key", &f.key, &e))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| bad("key", &f.key, &e))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
