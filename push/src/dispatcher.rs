//! The dispatcher: a bounded queue in front of a thread with its own tokio runtime that sends
//! notifications through the providers with bounded concurrency and retries.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{
    provider_name, ApnsProvider, FcmProvider, PushConfig, PushError, PushNotification,
    PushProvider, WebhookProvider, PROVIDER_APNS, PROVIDER_FCM, PROVIDER_WEBHOOK,
};

/// Called (on the dispatcher's thread) for a notification whose token the provider called
/// invalid or unregistered; the owner of the token should delete it. Must not block.
pub type InvalidTokenHook = Box<dyn Fn(&PushNotification) + Send + Sync>;

/// How the dispatcher queues, paces and retries.
#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Queue length; a notification submitted to a full queue is dropped and counted.
    pub queue: usize,
    /// Notifications in flight at once (sending, or waiting for a retry).
    pub concurrency: usize,
    /// Attempts per notification for retryable errors (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with jitter in `[d/2, d]`.
    pub retry_base: Duration,
    /// Longest delay between two attempts (a `Retry-After` may ask for more, up to a minute).
    pub retry_max: Duration,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions::from(&PushConfig::default())
    }
}

impl From<&PushConfig> for DispatchOptions {
    fn from(c: &PushConfig) -> Self {
        DispatchOptions {
            queue: c.queue,
            concurrency: c.concurrency,
            max_attempts: c.max_attempts,
            retry_base: Duration::from_millis(c.retry_base_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
        }
    }
}

/// Longest wait a provider's `Retry-After` can impose between two attempts.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Counter snapshot (monotonic totals since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Accepted into the queue.
    pub queued: u64,
    /// Delivered (the provider answered success).
    pub sent: u64,
    /// Given up: permanent error, or retryable errors on every attempt.
    pub failed: u64,
    /// Attempts repeated after a retryable error.
    pub retried: u64,
    /// Refused because the queue was full (or the dispatcher stopping).
    pub dropped: u64,
    /// Refused because no provider is configured for the token's provider id.
    pub no_provider: u64,
    /// Failures because the token is invalid or unregistered (part of `failed`).
    pub invalid_tokens: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    sent: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    retried: AtomicU64,
    dropped: AtomicU64,
    no_provider: AtomicU64,
    invalid_tokens: AtomicU64,
    in_flight: AtomicU64,
}

fn slot(provider: u8) -> usize {
    if provider <= 3 {
        provider as usize
    } else {
        0
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    counters: Counters,
    hook: OnceLock<InvalidTokenHook>,
    /// SplitMix64 state for backoff jitter.
    jitter: AtomicU64,
}

impl Shared {
    fn random(&self) -> u64 {
        let mut z = self
            .jitter
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Runs the providers on its own thread (`im-push`) with its own current-thread tokio runtime;
/// [`PushDispatcher::submit`] may be called from any thread or runtime and never blocks.
/// Dropping the dispatcher stops it: queued notifications are counted as dropped, those in
/// flight are abandoned.
pub struct PushDispatcher {
    tx: Option<mpsc::Sender<PushNotification>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Configured provider ids (bit i = provider i).
    providers: u64,
    queue: usize,
}

impl std::fmt::Debug for PushDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushDispatcher")
            .field("providers", &self.providers)
            .field("queue", &self.queue)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PushDispatcher {
    /// Builds the providers configured in `cfg` (reading their key files) and starts.
    pub fn start(cfg: &PushConfig) -> std::io::Result<Arc<PushDispatcher>> {
        let io =
            |e: PushError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string());
        let mut providers: Vec<(u8, Arc<dyn PushProvider>)> = Vec::new();
        if let Some(c) = &cfg.webhook {
            providers.push((
                PROVIDER_WEBHOOK,
                Arc::new(WebhookProvider::new(c).map_err(io)?),
            ));
        }
        if let Some(c) = &cfg.apns {
            providers.push((PROVIDER_APNS, Arc::new(ApnsProvider::new(c).map_err(io)?)));
        }
        if let Some(c) = &cfg.fcm {
            providers.push((PROVIDER_FCM, Arc::new(FcmProvider::new(c).map_err(io)?)));
        }
        Self::with_options(providers, DispatchOptions::from(cfg))
    }

    /// Starts with the given providers (by provider id) and default options but `queue`.
    pub fn with_providers(
        providers: Vec<(u8, Arc<dyn PushProvider>)>,
        queue: usize,
    ) -> std::io::Result<Arc<PushDispatcher>> {
        Self::with_options(
            providers,
            DispatchOptions {
                queue,
                ..DispatchOptions::default()
            },
        )
    }

    /// Starts with the given providers and options.
    pub fn with_options(
        providers: Vec<(u8, Arc<dyn PushProvider>)>,
        opts: DispatchOptions,
    ) -> std::io::Result<Arc<PushDispatcher>> {
        let mut table: Vec<Option<Arc<dyn PushProvider>>> = vec![None; 64];
        let mut mask = 0u64;
        let mut names = Vec::new();
        for (id, p) in providers {
            if usize::from(id) >= table.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("push provider id {id} out of range"),
                ));
            }
            table[usize::from(id)] = Some(p);
            mask |= 1 << id;
            names.push(provider_name(id));
        }
        let queue = opts.queue.max(1);
        let (tx, rx) = mpsc::channel(queue);
        let (stop_tx, stop_rx) = oneshot::channel();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (std::process::id() as u64) << 32;
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            hook: OnceLock::new(),
            jitter: AtomicU64::new(seed),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sh = shared.clone();
        let opts = DispatchOptions { queue, ..opts };
        let thread = std::thread::Builder::new()
            .name("im-push".into())
            .spawn(move || rt.block_on(run(rx, stop_rx, table, opts, sh)))?;
        tracing::info!(providers = ?names, queue, "push dispatcher started");
        Ok(Arc::new(PushDispatcher {
            tx: Some(tx),
            stop: Some(stop_tx),
            thread: Some(thread),
            shared,
            providers: mask,
            queue,
        }))
    }

    /// Queues `n`; never blocks. A full queue drops it, a provider id without provider refuses
    /// it (both counted).
    pub fn submit(&self, n: PushNotification) {
        let c = &self.shared.counters;
        if n.provider >= 64 || self.providers & (1 << n.provider) == 0 {
            inc(&c.no_provider);
            tracing::debug!(uid = %n.uid, provider = n.provider, "push: no provider configured");
            return;
        }
        let Some(tx) = &self.tx else { return };
        match tx.try_send(n) {
            Ok(()) => inc(&c.queued),
            Err(e) => {
                let n = match e {
                    mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
                };
                let dropped = c.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Every drop at debug; the 1st, 2nd, 4th, 8th… at warn: visible, never loud.
                if dropped.is_power_of_two() {
                    tracing::warn!(dropped, uid = %n.uid, "push queue full: notification dropped");
                } else {
                    tracing::debug!(uid = %n.uid, "push queue full: notification dropped");
                }
            }
        }
    }

    /// Sets the hook told of invalid tokens (once; later calls are ignored and return false).
    pub fn on_invalid_token(
        &self,
        hook: impl Fn(&PushNotification) + Send + Sync + 'static,
    ) -> bool {
        self.shared.hook.set(Box::new(hook)).is_ok()
    }

    pub fn stats(&self) -> PushStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PushStats {
            queued: get(&c.queued),
            sent: c.sent.iter().map(get).sum(),
            failed: c.failed.iter().map(get).sum(),
            retried: get(&c.retried),
            dropped: get(&c.dropped),
            no_provider: get(&c.no_provider),
            invalid_tokens: get(&c.invalid_tokens),
        }
    }

    /// Notifications waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| self.queue - tx.capacity())
    }

    /// Appends the `im_push_*` Prometheus text lines (with `# HELP` / `# TYPE`). `sent` and
    /// `failed` are labelled by provider. (`im_push_submitted_total` and `im_push_muted_total`
    /// are the workers' counters, rendered elsewhere.)
    pub fn metrics(&self, out: &mut String) {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ids: Vec<u8> = [PROVIDER_APNS, PROVIDER_FCM, PROVIDER_WEBHOOK]
            .into_iter()
            .filter(|id| self.providers & (1 << id) != 0)
            .collect();
        for (name, help, per) in [
            (
                "im_push_sent_total",
                "Push notifications delivered to a provider.",
                &c.sent,
            ),
            (
                "im_push_failed_total",
                "Push notifications given up (permanent error or retries exhausted).",
                &c.failed,
            ),
        ] {
            im_shared::prom::header(out, name, "counter", help);
            for &id in &ids {
                let v = get(&per[slot(id)]);
                let _ = writeln!(out, "{name}{{provider=\"{}\"}} {v}", provider_name(id));
            }
        }
        for (name, kind, help, v) in [
            (
                "im_push_queued_total",
                "counter",
                "Push notifications accepted into the dispatcher queue.",
                get(&c.queued),
            ),
            (
                "im_push_retried_total",
                "counter",
                "Push attempts repeated after a retryable error.",
                get(&c.retried),
            ),
            (
                "im_push_dropped_total",
                "counter",
                "Push notifications dropped because the queue was full.",
                get(&c.dropped),
            ),
            (
                "im_push_no_provider_total",
                "counter",
                "Push notifications for a provider that is not configured.",
                get(&c.no_provider),
            ),
            (
                "im_push_invalid_tokens_total",
                "counter",
                "Push failures because the device token is invalid or unregistered.",
                get(&c.invalid_tokens),
            ),
            (
                "im_push_queue_depth",
                "gauge",
                "Push notifications waiting in the queue.",
                self.queue_depth() as u64,
            ),
            (
                "im_push_in_flight",
                "gauge",
                "Push notifications being sent or waiting for a retry.",
                get(&c.in_flight),
            ),
        ] {
            im_shared::prom::metric(out, name, kind, help, v);
        }
    }
}

impl Drop for PushDispatcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.tx = None;
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<PushNotification>,
    mut stop: oneshot::Receiver<()>,
    providers: Vec<Option<Arc<dyn PushProvider>>>,
    opts: DispatchOptions,
    shared: Arc<Shared>,
) {
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let opts = Arc::new(opts);
    loop {
        let n = tokio::select! {
            biased;
            _ = &mut stop => break,
            n = rx.recv() => match n {
                Some(n) => n,
                None => break,
            },
        };
        let permit = tokio::select! {
            biased;
            _ = &mut stop => {
                inc(&shared.counters.dropped);
                break;
            }
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let Some(p) = providers
            .get(usize::from(n.provider))
            .and_then(Clone::clone)
        else {
            inc(&shared.counters.no_provider);
            continue;
        };
        inc(&shared.counters.in_flight);
        let (opts, shared) = (opts.clone(), shared.clone());
        tokio::spawn(async move {
            deliver(&*p, &n, &opts, &shared).await;
            shared.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    rx.close();
    let mut left = 0u64;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    shared.counters.dropped.fetch_add(left, Ordering::Relaxed);
    let in_flight = shared.counters.in_flight.load(Ordering::Relaxed);
    tracing::info!(
        queued = left,
        in_flight,
        "push dispatcher stopped; pending notifications dropped"
    );
}

/// Sends `n` until it succeeds, fails permanently, or runs out of attempts.
async fn deliver(
    p: &dyn PushProvider,
    n: &PushNotification,
    opts: &DispatchOptions,
    shared: &Shared,
) {
    let c = &shared.counters;
    let max = opts.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        let err = match p.send(n).await {
            Ok(()) => {
                inc(&c.sent[slot(n.provider)]);
                tracing::debug!(uid = %n.uid, msg_id = %n.msg_id, device = %n.device_id,
                    provider = provider_name(n.provider), attempt, "push sent");
                return;
            }
            Err(e) => e,
        };
        if err.is_retryable() && attempt < max {
            inc(&c.retried);
            let delay = backoff(attempt, opts, err.retry_after(), shared.random());
            tracing::debug!(uid = %n.uid, msg_id = %n.msg_id, provider = provider_name(n.provider),
                attempt, ?delay, error = %err, "push failed, retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
            continue;
        }
        inc(&c.failed[slot(n.provider)]);
        if err.token_invalid() {
            inc(&c.invalid_tokens);
            tracing::info!(uid = %n.uid, device = %n.device_id, provider = provider_name(n.provider),
                error = %err, "push token invalid");
            if let Some(hook) = shared.hook.get() {
                hook(n);
            }
        } else {
            tracing::warn!(uid = %n.uid, msg_id = %n.msg_id, provider = provider_name(n.provider),
                attempts = attempt, error = %err, "push failed");
        }
        return;
    }
}

/// Delay before attempt `attempt + 1`: `base * 2^(attempt-1)` capped at `retry_max`, jittered
/// into `[d/2, d]`; at least the provider's `Retry-After` (capped at a minute).
fn backoff(
    attempt: u32,
    opts: &DispatchOptions,
    retry_after: Option<Duration>,
    random: u64,
) -> Duration {
    let exp = opts
        .retry_base
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(opts.retry_max);
    let half = exp / 2;
    let span = (exp - half).as_micros() as u64;
    let jittered = half + Duration::from_micros(if span == 0 { 0 } else { random % (span + 1) });
    match retry_after {
        Some(r) => jittered.max(r.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let o = DispatchOptions {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            ..DispatchOptions::default()
        };
        for r in [0u64, 1, 12345, u64::MAX] {
            let d1 = backoff(1, &o, None, r);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = backoff(3, &o, None, r);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d30 = backoff(30, &o, None, r);
            assert!(
                d30 >= Duration::from_millis(500) && d30 <= Duration::from_millis(1000),
                "{d30:?}"
            );
        }
        assert_eq!(
            backoff(1, &o, Some(Duration::from_secs(5)), 0),
            Duration::from_secs(5)
        );
        assert_eq!(
            backoff(1, &o, Some(Duration::from_secs(3600)), 0),
            MAX_RETRY_AFTER
        );
        // Jitter spreads.
        let s = Shared {
            counters: Counters::default(),
            hook: OnceLock::new(),
            jitter: AtomicU64::new(1),
        };
        let ds: std::collections::BTreeSet<_> =
            (0..50).map(|_| backoff(4, &o, None, s.random())).collect();
        assert!(ds.len() > 10);
    }
}
