//! The coordinator: starts the workers, steps every scenario through them, merges what they
//! report, prints a live progress line and the final table / JSON.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command as Proc, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::account::{check_post_seqs, join, join_group, GroupJoin, Join, SeqCheck};
use crate::msg::{Backoff, Event, Hist, Op, Plan, Progress, Report, Request, BODY_HEADER};
use crate::srcip::parse_src_ips;
use crate::worker::{cpu_ticks, rss_kib};
use crate::{Cli, Common, Scenario};

/// One point of the time series (once a second). A latency is `None` (`null` in the JSON) for a
/// second in which nothing was acknowledged or delivered: no latency, not a latency of 0.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t: f64,
    pub conns: u64,
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub deliver_p50_ms: Option<f64>,
    pub deliver_p99_ms: Option<f64>,
    pub deliver_p999_ms: Option<f64>,
}

/// A latency of the progress line: `-` when there is none.
fn ms_cell(v: Option<f64>) -> String {
    v.map_or_else(|| format!("{:>7}", "-"), |v| format!("{v:>7.2}"))
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
}

struct Coord {
    workers: Vec<WorkerProc>,
    rx: Receiver<(usize, Option<Event>)>,
    next_id: u64,
    latest: Vec<Progress>,
    iv_ack: Hist,
    iv_deliver: Hist,
    start: Instant,
    next_print: Instant,
    prev: (f64, u64, u64, u64),
    samples: Vec<Sample>,
    tty: bool,
}

impl Coord {
    /// `groups`: number of groups and members per group (`group` scenario; else `(0, 0)`).
    fn spawn(
        common: &Common,
        gates: &Gates,
        total: u32,
        seed: u64,
        groups: (u32, u32),
    ) -> anyhow::Result<Coord> {
        let src_ips = if common.src_ips == "none" {
            Vec::new()
        } else {
            parse_src_ips(&common.src_ips).context("--src-ips")?
        };
        let per = common.max_conns_per_worker.max(1);
        let nw = common.workers.max(total.div_ceil(per)).max(1);
        let exe = std::env::current_exe().context("current_exe")?;
        let (tx, rx) = mpsc::channel();
        let mut workers = Vec::new();
        for w in 0..nw {
            let first = (total as u64 * w as u64 / nw as u64) as u32;
            let end = (total as u64 * (w as u64 + 1) / nw as u64) as u32;
            let plan = Plan {
                worker: w,
                first,
                count: end - first,
                total,
                cores: common.cores_per_worker.max(1),
                pin: common.pin,
                io_memory_kib: common.io_memory_kib,
                server: gates.server.clone(),
                token_secret: common.token_secret.clone(),
                uid_base: common.uid_base,
                src_ips: src_ips.clone(),
                heartbeat_secs: common.heartbeat_secs,
                login_timeout_ms: (common.login_timeout_secs * 1000.0) as u64,
                ack_timeout_ms: common.ack_timeout_ms,
                body_size: common.body_size.max(BODY_HEADER),
                track: !common.no_track,
                // The run id (high 32 bits) is the same in every worker; the low bits differ.
                seed: (seed & 0xffff_ffff_0000_0000)
                    | ((seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9)) & 0xffff_ffff),
                groups: groups.0,
                group_size: groups.1,
                gate_ids: gates.ids.clone(),
                backoff: gates.backoff,
                login_retry_ms: (common.login_retry_secs * 1000.0) as u64,
                resend_ms: common.resend_ms,
                no_deliver_ack: common.no_deliver_ack,
            };
            let mut child = Proc::new(&exe)
                .arg("worker")
                .arg("--plan")
                .arg(serde_json::to_string(&plan)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("spawning worker {w}"))?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let tx = tx.clone();
            let wi = w as usize;
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            if tx.send((wi, Some(ev))).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("worker {wi}: unreadable event ({e}): {line:.200}"),
                    }
                }
                let _ = tx.send((wi, None));
            });
            workers.push(WorkerProc { child, stdin });
        }
        let now = Instant::now();
        Ok(Coord {
            latest: vec![Progress::default(); workers.len()],
            workers,
            rx,
            next_id: 1,
            iv_ack: Hist::default(),
            iv_deliver: Hist::default(),
            start: now,
            next_print: now + Duration::from_secs(1),
            prev: (0.0, 0, 0, 0),
            samples: Vec::new(),
            tty: std::io::stderr().is_terminal(),
        })
    }

    fn sum(&self, f: impl Fn(&Progress) -> u64) -> u64 {
        self.latest.iter().map(f).sum()
    }

    fn print_progress(&mut self) {
        let t = self.start.elapsed().as_secs_f64();
        let (sent, acked, dlv) = (
            self.sum(|p| p.sent),
            self.sum(|p| p.acked),
            self.sum(|p| p.delivered),
        );
        let dt = (t - self.prev.0).max(1e-3);
        let s = Sample {
            t,
            conns: self.sum(|p| p.logged_in),
            sent_per_s: (sent - self.prev.1.min(sent)) as f64 / dt,
            acked_per_s: (acked - self.prev.2.min(acked)) as f64 / dt,
            delivered_per_s: (dlv - self.prev.3.min(dlv)) as f64 / dt,
            ack_p50_ms: self.iv_ack.ms_opt(0.5),
            ack_p99_ms: self.iv_ack.ms_opt(0.99),
            deliver_p50_ms: self.iv_deliver.ms_opt(0.5),
            deliver_p99_ms: self.iv_deliver.ms_opt(0.99),
            deliver_p999_ms: self.iv_deliver.ms_opt(0.999),
        };
        self.prev = (t, sent, acked, dlv);
        self.iv_ack.reset();
        self.iv_deliver.reset();
        let line = format!(
            "[{:5.0}s] conns {:>7} (open {}, fail {}, drop {}) | /s sent {:>7.0} ack {:>7.0} dlv {:>7.0} | p99 ms ack {} dlv {} | rss {} MiB",
            t,
            s.conns,
            self.sum(|p| p.connected),
            self.sum(|p| p.login_failed),
            self.sum(|p| p.disconnects),
            s.sent_per_s,
            s.acked_per_s,
            s.delivered_per_s,
            ms_cell(s.ack_p99_ms),
            ms_cell(s.deliver_p99_ms),
            self.sum(|p| p.rss_kib) / 1024,
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.samples.push(s);
    }

    fn send(&mut self, op: Op) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let line = serde_json::to_string(&Request { id, op })?;
        for (i, w) in self.workers.iter_mut().enumerate() {
            writeln!(w.stdin, "{line}")
                .and_then(|_| w.stdin.flush())
                .with_context(|| format!("worker {i} is gone"))?;
        }
        Ok(id)
    }

    /// Sends `op` to every worker and waits for all of them; returns the merged report.
    fn request(&mut self, op: Op) -> anyhow::Result<Report> {
        let id = self.send(op)?;
        let mut done = vec![false; self.workers.len()];
        let mut merged = Report::default();
        while done.iter().any(|d| !d) {
            let wait = self.next_print.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok((w, Some(Event::Progress(p)))) => {
                    self.iv_ack.merge(&p.ack_us);
                    self.iv_deliver.merge(&p.deliver_us);
                    self.latest[w] = *p;
                }
                Ok((w, Some(Event::Done { id: got, report }))) if got == id => {
                    done[w] = true;
                    if let Some(r) = report {
                        merged.merge(&r);
                    }
                }
                Ok((_, Some(Event::Done { .. }))) => {}
                Ok((w, Some(Event::Fatal { message }))) => bail!("worker {w}: {message}"),
                Ok((w, None)) => bail!("worker {w} exited unexpectedly"),
                Err(RecvTimeoutError::Timeout) => {
                    self.next_print += Duration::from_secs(1);
                    self.print_progress();
                }
                Err(RecvTimeoutError::Disconnected) => bail!("all workers gone"),
            }
        }
        Ok(merged)
    }

    fn finish(mut self) {
        if self.tty {
            eprintln!();
        }
        let _ = self.send(Op::Quit);
        let deadline = Instant::now() + Duration::from_secs(10);
        for w in &mut self.workers {
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Kernel-side numbers read before and after a run.
#[derive(Clone, Debug, Default, Serialize)]
struct SysSnap {
    server_rss_kib: u64,
    tcp_mem_pages: u64,
    tcp_inuse: u64,
    slab_kib: u64,
}

fn sys_snap(pids: &[u32]) -> SysSnap {
    let mut s = SysSnap {
        server_rss_kib: pids.iter().filter_map(|p| rss_kib(&p.to_string())).sum(),
        ..Default::default()
    };
    if let Ok(t) = std::fs::read_to_string("/proc/net/sockstat") {
        if let Some(l) = t.lines().find(|l| l.starts_with("TCP:")) {
            let f: Vec<&str> = l.split_whitespace().collect();
            for w in f.windows(2) {
                match w[0] {
                    "mem" => s.tcp_mem_pages = w[1].parse().unwrap_or(0),
                    "inuse" => s.tcp_inuse = w[1].parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = t.lines().find(|l| l.starts_with("Slab:")) {
            s.slab_kib = l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    s
}

/// CPU time used so far, in clock ticks: by the loadgen (this process and its workers) and by
/// the `--server-pid` processes (`None` without one, or when one has gone).
#[derive(Clone, Copy)]
struct CpuSnap {
    loadgen: u64,
    server: Option<u64>,
}

impl Coord {
    fn cpu(&self, server_pids: &[u32]) -> CpuSnap {
        let mut loadgen = cpu_ticks("self").unwrap_or(0);
        for w in &self.workers {
            loadgen += cpu_ticks(&w.child.id().to_string()).unwrap_or(0);
        }
        let server = (!server_pids.is_empty())
            .then(|| {
                server_pids
                    .iter()
                    .map(|p| cpu_ticks(&p.to_string()))
                    .sum::<Option<u64>>()
            })
            .flatten();
        CpuSnap { loadgen, server }
    }
}

/// CPU used between two snapshots per message sent (`what`: "message", "post"): a text line and
/// the JSON of the report.
fn cpu_report(a: CpuSnap, b: CpuSnap, sent: u64, what: &str) -> (String, Value) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let per = |ticks: u64| ticks as f64 / hz * 1e6 / sent.max(1) as f64;
    let lg = b.loadgen.saturating_sub(a.loadgen);
    let mut t = format!(
        "  cpu (user+system) per {what} sent: loadgen {:.1} µs ({:.2} s)",
        per(lg),
        lg as f64 / hz
    );
    let mut j = json!({
        "loadgen_secs": lg as f64 / hz,
        "loadgen_us_per_msg": per(lg),
    });
    if let (Some(x), Some(y)) = (a.server, b.server) {
        let sv = y.saturating_sub(x);
        t += &format!(", server {:.1} µs ({:.2} s)", per(sv), sv as f64 / hz);
        j["server_secs"] = (sv as f64 / hz).into();
        j["server_us_per_msg"] = per(sv).into();
    }
    t.push('\n');
    (t, j)
}

fn secs_between(a: Option<u64>, b: Option<u64>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => 0.0,
    }
}

fn lat(h: &Hist) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": h.ms(0.5),
        "p99_ms": h.ms(0.99),
        "p999_ms": h.ms(0.999),
        "max_ms": h.max_ms(),
    })
}

fn lat_row(name: &str, h: &Hist) -> String {
    format!(
        "  {name:<22} n={:<9} p50 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  max {:>8.2} ms\n",
        h.len(),
        h.ms(0.5),
        h.ms(0.99),
        h.ms(0.999),
        h.max_ms()
    )
}

fn traffic_json(r: &Report, j: Option<&Join>, secs: f64) -> Value {
    json!({
        "sent": r.sent,
        "acked": r.acked,
        "send_errors": r.send_errors,
        "ack_timeouts": r.ack_timeouts,
        "sent_per_s": r.sent as f64 / secs.max(1e-9),
        "acked_per_s": r.acked as f64 / secs_between(r.first_send_ns, r.last_ack_ns).max(1e-9),
        "delivered": r.delivered,
        "delivered_per_s": r.delivered as f64 / secs_between(r.first_send_ns, r.last_deliver_ns).max(1e-9),
        "delivered_by_sync": r.delivered_by_sync,
        "echoes": r.echoes,
        "lost": j.map(|j| j.lost),
        "delivered_unacked": j.map(|j| j.delivered_unacked),
        "phantom": j.map(|j| j.phantom),
        "undelivered_offline": j.map(|j| j.undelivered_offline),
        "lost_examples": j.map(|j| j.lost_examples.clone()),
        "raw_dups": r.raw_dups,
        "dedup_dups": r.dedup_dups,
        "out_of_order": r.out_of_order,
        "reordered_by_resend": r.reordered_by_resend,
        "gaps": r.gaps,
        "push_reorders": r.push_reorders,
        "sync_requests": r.sync_requests,
        "ack_latency": lat(&r.ack_us),
        "deliver_latency": lat(&r.deliver_us),
        "disconnects": r.disconnects,
        "reconnected": r.reconnected,
        "reconnect_latency": lat(&r.reconnect_us),
        "reconnect_times": r.reconnect_times,
        "retries": r.retries,
        "resent": r.resent,
        "not_back": r.not_back,
    })
}

fn traffic_table(r: &Report, j: Option<&Join>, secs: f64) -> String {
    let mut s = String::new();
    s += &format!(
        "  sent {} ({:.0}/s), acked {} ({:.0}/s), errors {:?}, ack timeouts {}\n",
        r.sent,
        r.sent as f64 / secs.max(1e-9),
        r.acked,
        r.acked as f64 / secs_between(r.first_send_ns, r.last_ack_ns).max(1e-9),
        r.send_errors,
        r.ack_timeouts
    );
    s += &format!(
        "  delivered {} ({:.0}/s; {} via sync), own echoes {}\n",
        r.delivered,
        r.delivered as f64 / secs_between(r.first_send_ns, r.last_deliver_ns).max(1e-9),
        r.delivered_by_sync,
        r.echoes
    );
    match j {
        Some(j) => {
            s += &format!(
                "  lost {} (acked, never delivered), delivered-unacked {}, phantom {}\n",
                j.lost, j.delivered_unacked, j.phantom
            );
            if j.undelivered_offline > 0 {
                s += &format!(
                    "  undelivered {} (acked; the recipient was not back at the end: stored for its next login)\n",
                    j.undelivered_offline
                );
            }
            if !j.lost_examples.is_empty() {
                s += &format!("  lost e.g. (from,to,counter): {:?}\n", j.lost_examples);
            }
        }
        None => s += "  lost: not tracked (--no-track)\n",
    }
    s += &format!(
        "  duplicates: raw (same seq) {}, after dedup {}; out of order {} (and {} accepted late at the loadgen's own repetition); gaps {} (pushes out of seq order {}); syncs {}\n",
        r.raw_dups, r.dedup_dups, r.out_of_order, r.reordered_by_resend, r.gaps, r.push_reorders, r.sync_requests
    );
    s += &reconnect_rows(r);
    s += &lat_row("send→ack", &r.ack_us);
    s += &lat_row("send→deliver", &r.deliver_us);
    if r.reconnect_us.len() > 0 {
        s += &lat_row("lost→back", &r.reconnect_us);
    }
    s
}

/// The table rows about lost connections: how they came back, and who did not.
fn reconnect_rows(r: &Report) -> String {
    let mut s = String::new();
    if !r.disconnects.is_empty() || r.retries > 0 {
        s += &format!(
            "  disconnects {:?} (reconnected and synced: {}; attempts after a failure {}; sends repeated after a re-login {})\n",
            r.disconnects, r.reconnected, r.retries, r.resent
        );
    }
    if r.not_back > 0 {
        s += &format!(
            "  NOT BACK at the end: {} users (e.g. indices {:?})\n",
            r.not_back,
            &r.not_back_ids[..r.not_back_ids.len().min(10)]
        );
    }
    s
}

fn login_json(r: &Report) -> Value {
    let secs = secs_between(r.first_connect_ns, r.last_login_ns);
    json!({
        "attempted": r.attempted,
        "logged_in": r.logged_in,
        "failures": r.login_failures,
        "gave_up": r.gave_up,
        "seconds": secs,
        "logins_per_s": if secs > 0.0 { r.logged_in as f64 / secs } else { 0.0 },
        "login_latency": lat(&r.login_us),
    })
}

fn login_table(r: &Report) -> String {
    let secs = secs_between(r.first_connect_ns, r.last_login_ns);
    let mut s = format!(
        "  logins {}/{} attempts in {:.2} s = {:.0} logins/s; failures {:?}; users that gave up {}\n",
        r.logged_in,
        r.attempted,
        secs,
        if secs > 0.0 {
            r.logged_in as f64 / secs
        } else {
            0.0
        },
        r.login_failures,
        r.gave_up
    );
    s += &lat_row("connect+login", &r.login_us);
    s
}

fn output(common: &Common, coord: &Coord, table: String, mut result: Value) -> anyhow::Result<()> {
    result["timeline"] = serde_json::to_value(&coord.samples)?;
    if common.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{table}");
    }
    if let Some(p) = &common.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &common.svg {
        let title = result["scenario"].as_str().unwrap_or("run").to_string();
        std::fs::write(p, crate::svg::plot(&title, &coord.samples))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn params(common: &Common) -> Value {
    json!({
        "server": common.server.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "uid_base": common.uid_base,
        "rate": common.rate,
        "src_ips": common.src_ips,
        "max_conns_per_worker": common.max_conns_per_worker,
        "cores_per_worker": common.cores_per_worker,
        "heartbeat_secs": common.heartbeat_secs,
        "body_size": common.body_size,
    })
}

/// Why a finished run failed, for the exit status (2): logins that failed (all or some), sends
/// never acknowledged in time, or an accounting that found an acknowledged message that never
/// arrived, a message never sent, or a group copy to a non-member.
pub(crate) fn verdict(result: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let login = &result["login"];
    let (attempted, logged_in, gave_up) = (
        login["attempted"].as_u64().unwrap_or(0),
        login["logged_in"].as_u64().unwrap_or(0),
        login["gave_up"].as_u64().unwrap_or(0),
    );
    if logged_in > 0 && gave_up > 0 {
        bad.push(format!(
            "{gave_up} users never logged in (failed attempts by reason: {})",
            login["failures"]
        ));
    }
    if attempted > 0 && login["logged_in"].as_u64() == Some(0) {
        bad.push(
            "no connection logged in: is a server listening at --server? (the default \
             --src-ips 127.0.0.2-127.0.0.9 reach only a loopback server: use --src-ips none \
             for another)"
                .to_string(),
        );
    }
    // A storm cuts connections right after their sends: an ack lost with its connection is
    // expected there (the message itself is still accounted for).
    let storm = result["scenario"] == "storm";
    let mut check = |what: String, v: &Value| {
        for k in [
            "lost",
            "phantom",
            "non_member",
            "ack_timeouts",
            "dedup_dups",
            "out_of_order",
            "order_mismatch_members",
        ] {
            if k == "ack_timeouts" && storm {
                continue;
            }
            if let Some(n) = v[k].as_u64().filter(|&n| n > 0) {
                bad.push(format!("{what}: {n} {k}"));
            }
        }
    };
    check("c2c".into(), &result["c2c"]);
    check("group".into(), &result["group"]["accounting"]);
    // A group run's ack timeouts, duplicates and per-sender order are in its traffic counters,
    // next to the accounting.
    let group_traffic = json!({
        "ack_timeouts": result["group"]["ack_timeouts"],
        "dedup_dups": result["group"]["dedup_dups"],
        "out_of_order": result["group"]["out_of_order"],
    });
    check("group".into(), &group_traffic);
    check("max warm-up".into(), &result["warmup"]);
    for row in result["steps"].as_array().into_iter().flatten() {
        check(format!("max step {}", row["rate"]), &row["c2c"]);
    }
    // large-group: the build, the members' readiness and the group timeline's own checks.
    let large = &result["large"];
    for (k, v) in [
        ("batches never added", &large["build"]["adds_failed"]),
        ("members not ready", &large["ready"]["not_ready"]),
        (
            "holes in the group's timeline",
            &large["timeline"]["group_holes"],
        ),
        ("posts with two seqs", &large["seqs"]["posts_with_two_seqs"]),
        ("seqs with two posts", &large["seqs"]["seqs_with_two_posts"]),
        (
            "members without the @all mention entry",
            &large["mention_all"]["missing"],
        ),
        (
            "duplicate @all mention entries",
            &large["mention_all"]["duplicates"],
        ),
        (
            "@all mention entries to the poster",
            &large["mention_all"]["to_poster"],
        ),
    ] {
        if let Some(n) = v.as_u64().filter(|&n| n > 0) {
            bad.push(format!("large-group: {n} {k}"));
        }
    }
    let mention = &large["mention_all"];
    if mention["acked"].as_u64() == Some(0) {
        bad.push(format!(
            "large-group: the @all post was not acknowledged (errors {}, ack timeouts {})",
            mention["send_errors"], mention["ack_timeouts"]
        ));
    }
    if mention["other_msg_ids"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        bad.push(format!(
            "large-group: @all mention entries with another msg_id than the post's: {}",
            mention["other_msg_ids"]
        ));
    }
    for k in ["c2c", "group", "warmup"] {
        if let Some(n) = result[k]["not_back"].as_u64().filter(|&n| n > 0) {
            bad.push(format!(
                "{k}: {n} users that were online were not back (logged in and synced) at the end"
            ));
        }
    }
    bad
}

pub fn main(cli: &Cli) -> anyhow::Result<()> {
    let c = &cli.common;
    let seed = c
        .seed
        .unwrap_or_else(|| crate::exec::now_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15) | (1 << 32));
    let total = match &cli.scenario {
        Scenario::Idle { conns, .. } | Scenario::Storm { conns, .. } => *conns,
        Scenario::C2c { users, .. }
        | Scenario::Max { users, .. }
        | Scenario::Group { users, .. }
        | Scenario::LargeGroup { users, .. } => *users,
        Scenario::Worker { .. } | Scenario::Logins { .. } => unreachable!("handled in main"),
    };
    if total == 0 {
        bail!("nothing to do: 0 users");
    }
    let groups = match &cli.scenario {
        Scenario::Group {
            users,
            members,
            groups,
            ..
        } => group_layout(*users, *members, *groups)?,
        Scenario::LargeGroup {
            users,
            members,
            add_batch,
            ..
        } => {
            if members < users {
                bail!("--members ({members}) must be at least --users ({users}): the connected users are members 0..N");
            }
            if *add_batch == 0 || *add_batch > u16::MAX as u32 {
                bail!("--add-batch must be 1..=65535, not {add_batch}");
            }
            // One group whose online members are all the users: the posting and the
            // accounting of the `group` scenario then apply as they are.
            (1, *users)
        }
        _ => (0, 0),
    };
    let gates = match &c.iplist {
        Some(url) => fetch_iplist(url, c.uid_base)?,
        None => Gates {
            server: c.server.clone(),
            ids: Vec::new(),
            backoff: Backoff {
                initial_ms: c.reconnect_initial_ms,
                max_ms: c.reconnect_max_ms,
                multiplier: c.reconnect_multiplier,
                jitter: c.reconnect_jitter,
            },
        },
    };
    let mut coord = Coord::spawn(c, &gates, total, seed, groups)?;
    let workers = coord.workers.len();
    eprintln!(
        "im-loadgen: {total} users over {workers} worker process(es) × {} executor(s), server {}",
        c.cores_per_worker,
        gates
            .server
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let res = run(cli, &mut coord, total, workers);
    match res {
        Ok((table, result)) => {
            let bad = verdict(&result);
            let out = output(c, &coord, table, result);
            coord.finish();
            out?;
            if !bad.is_empty() {
                for b in &bad {
                    eprintln!("im-loadgen: FAILED: {b}");
                }
                std::process::exit(2);
            }
            Ok(())
        }
        Err(e) => {
            coord.finish();
            Err(e)
        }
    }
}

/// The gates every user walks (in its own order) and the reconnect backoff.
struct Gates {
    server: Vec<SocketAddr>,
    /// Gate ids from the iplist (same order as `server`); empty with `--server`.
    ids: Vec<u16>,
    backoff: Backoff,
}

/// `GET <url>/v1/iplist?uid=<uid>` of a logic node's API (plain HTTP): the live gates and the
/// backoff. Each user then orders the gates itself by the iplist's rendezvous weight, so one
/// request serves every user of the run. As docs/API.md tells clients, an answer `503` (no gate
/// registered yet, the directory unavailable) or a failed connect is retried with backoff, here
/// for up to a minute.
fn fetch_iplist(url: &str, uid: u64) -> anyhow::Result<Gates> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wait = Duration::from_millis(250);
    loop {
        match fetch_iplist_once(url, uid) {
            Ok(g) => return Ok(g),
            Err(e) if Instant::now() + wait < deadline => {
                eprintln!("im-loadgen: {e:#}; trying again in {} ms", wait.as_millis());
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(4));
            }
            Err(e) => return Err(e.context("--iplist: no usable answer within 60 s")),
        }
    }
}

fn fetch_iplist_once(url: &str, uid: u64) -> anyhow::Result<Gates> {
    use std::io::{Read, Write};
    let hostport = url
        .strip_prefix("http://")
        .with_context(|| format!("--iplist {url}: only http:// URLs"))?
        .trim_end_matches('/');
    let mut sock = std::net::TcpStream::connect(hostport)
        .with_context(|| format!("--iplist: connecting to {hostport}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        sock,
        "GET /v1/iplist?uid={uid} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    sock.read_to_string(&mut resp)
        .context("--iplist: reading the answer")?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("--iplist: no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "--iplist: {} ({body:.200})",
            head.lines().next().unwrap_or("")
        );
    }
    let v: Value = serde_json::from_str(body).context("--iplist: not JSON")?;
    let mut server = Vec::new();
    let mut ids = Vec::new();
    for g in v["gates"].as_array().into_iter().flatten() {
        let addr = g["tcp"].as_str().context("--iplist: gate without tcp")?;
        server.push(
            addr.parse()
                .with_context(|| format!("--iplist: gate address {addr}"))?,
        );
        ids.push(g["id"].as_u64().context("--iplist: gate without id")? as u16);
    }
    if server.is_empty() {
        bail!("--iplist: no gate in the list");
    }
    let b = &v["backoff"];
    let backoff = Backoff {
        initial_ms: b["initial_ms"].as_u64().context("--iplist: backoff")?,
        max_ms: b["max_ms"].as_u64().context("--iplist: backoff")?,
        multiplier: b["multiplier"].as_f64().context("--iplist: backoff")?,
        jitter: b["jitter"].as_f64().context("--iplist: backoff")?,
    };
    Ok(Gates {
        server,
        ids,
        backoff,
    })
}

/// `(groups, members per group)` of the `group` scenario, checked.
fn group_layout(users: u32, members: u32, groups: Option<u32>) -> anyhow::Result<(u32, u32)> {
    let max = im_shared::proto::MAX_GROUP_MEMBERS as u32;
    if members == 0 || members > users {
        bail!("--members must be 1..=--users ({users}), not {members}");
    }
    if members > max {
        bail!("--members {members}: the server allows at most {max} members per group");
    }
    let groups = groups.unwrap_or(users / members).max(1);
    Ok((groups, members))
}

fn group_json(r: &Report, j: Option<&GroupJoin>, secs: f64) -> Value {
    let mut v = traffic_json(r, None, secs);
    v["member_deliveries"] = r.delivered.into();
    v["member_deliveries_per_s"] =
        (r.delivered as f64 / secs_between(r.first_send_ns, r.last_deliver_ns).max(1e-9)).into();
    v["accounting"] = serde_json::to_value(j).unwrap_or(Value::Null);
    for k in [
        "lost",
        "delivered_unacked",
        "phantom",
        "undelivered_offline",
        "lost_examples",
        "echoes",
    ] {
        if let Some(o) = v.as_object_mut() {
            o.remove(k);
        }
    }
    v
}

fn group_table(r: &Report, j: Option<&GroupJoin>, secs: f64) -> String {
    let mut s = String::new();
    s += &format!(
        "  posts sent {} ({:.0}/s), acked {} ({:.0}/s), errors {:?}, ack timeouts {}\n",
        r.sent,
        r.sent as f64 / secs.max(1e-9),
        r.acked,
        r.acked as f64 / secs_between(r.first_send_ns, r.last_ack_ns).max(1e-9),
        r.send_errors,
        r.ack_timeouts
    );
    s += &format!(
        "  member deliveries {} ({:.0}/s fan-out; {} via sync)\n",
        r.delivered,
        r.delivered as f64 / secs_between(r.first_send_ns, r.last_deliver_ns).max(1e-9),
        r.delivered_by_sync,
    );
    match j {
        Some(j) => {
            s += &format!(
                "  expected {} copies of {} acked posts (poster's own copy included), received {} ({} own copies)\n",
                j.expected, j.posts_acked, j.received, j.own_copies
            );
            s += &format!(
                "  lost {} (acked post, member never got it; in {} posts), delivered-unacked {}, phantom {}, to non-members {}\n",
                j.lost, j.posts_with_loss, j.delivered_unacked, j.phantom, j.non_member
            );
            if j.undelivered_offline > 0 {
                s += &format!(
                    "  undelivered {} copies (acked post; the member was not back at the end: stored for its next login)\n",
                    j.undelivered_offline
                );
            }
            if !j.lost_examples.is_empty() {
                s += &format!("  lost e.g. (from,member,counter): {:?}\n", j.lost_examples);
            }
            s += &format!(
                "  group order: {} of {} (group, member) timelines disagree with the group's order ({} copies out of place)\n",
                j.order_mismatch_members, j.order_checked, j.order_mismatch_entries
            );
            if !j.order_examples.is_empty() {
                s += &format!("  order e.g. (group,member): {:?}\n", j.order_examples);
                s += &format!(
                    "  out of place e.g. (group,member,from,counter): {:?}; reference (group,member): {:?}\n",
                    j.order_copies, j.order_refs
                );
            }
        }
        None => s += "  lost / group order: not tracked (--no-track)\n",
    }
    s += &format!(
        "  duplicates: raw (same seq) {}, after dedup {}; sender order (counter backwards per sender, group, member) {} (and {} accepted late at the loadgen's own repetition); gaps {} (pushes out of seq order {}); syncs {}\n",
        r.raw_dups, r.dedup_dups, r.out_of_order, r.reordered_by_resend, r.gaps, r.push_reorders, r.sync_requests
    );
    s += &reconnect_rows(r);
    s += &lat_row("send→ack", &r.ack_us);
    s += &lat_row("send→deliver (members)", &r.deliver_us);
    s
}

/// The table of a `large-group` run: posts, member copies, and the checks of the group's
/// timeline (every connected member is a member of the one group).
fn large_table(r: &Report, j: Option<&GroupJoin>, seqs: Option<&SeqCheck>, secs: f64) -> String {
    let mut s = String::new();
    s += &format!(
        "  posts sent {} ({:.1}/s), acked {} ({:.1}/s), errors {:?}, ack timeouts {}\n",
        r.sent,
        r.sent as f64 / secs.max(1e-9),
        r.acked,
        r.acked as f64 / secs_between(r.first_send_ns, r.last_ack_ns).max(1e-9),
        r.send_errors,
        r.ack_timeouts
    );
    s += &format!(
        "  member copies delivered {} ({:.0}/s; {} via GroupSync); GroupDeliver pushes {}\n",
        r.delivered,
        r.delivered as f64 / secs_between(r.first_send_ns, r.last_deliver_ns).max(1e-9),
        r.delivered_by_sync,
        r.group_pushes,
    );
    match j {
        Some(j) => {
            s += &format!(
                "  expected {} copies of {} acked posts (poster's own copy included), received {} ({} own copies)\n",
                j.expected, j.posts_acked, j.received, j.own_copies
            );
            s += &format!(
                "  lost {} (acked post, member never got it; in {} posts), delivered-unacked {}, phantom {}, to non-members {}\n",
                j.lost, j.posts_with_loss, j.delivered_unacked, j.phantom, j.non_member
            );
            if j.undelivered_offline > 0 {
                s += &format!(
                    "  undelivered {} copies (the member was not back at the end)\n",
                    j.undelivered_offline
                );
            }
            if !j.lost_examples.is_empty() {
                s += &format!("  lost e.g. (from,member,counter): {:?}\n", j.lost_examples);
            }
            s += &format!(
                "  order: {} of {} members disagree with the group's order ({} copies out of place)\n",
                j.order_mismatch_members, j.order_checked, j.order_mismatch_entries
            );
            if !j.order_copies.is_empty() {
                s += &format!(
                    "  out of place e.g. (group,member,from,counter): {:?}\n",
                    j.order_copies
                );
            }
        }
        None => s += "  lost / order: not tracked (--no-track)\n",
    }
    if let Some(q) = seqs {
        s += &format!(
            "  group seqs: {} posts, {} with two seqs, {} seqs with two posts{}\n",
            q.posts,
            q.posts_with_two_seqs,
            q.seqs_with_two_posts,
            if q.examples.is_empty() {
                String::new()
            } else {
                format!(" (e.g. (from,counter,seq) {:?})", q.examples)
            }
        );
    }
    s += &format!(
        "  duplicates: raw (same group seq) {}, after dedup {}; sender order backwards {} (and {} accepted late at the loadgen's own repetition)\n",
        r.group_raw_dups, r.dedup_dups, r.out_of_order, r.reordered_by_resend
    );
    s += &format!(
        "  group timeline: gaps {} (a push whose prev_seq the member did not hold), pushes out of seq order {}, GroupSyncs {}, holes in the group's timeline {}\n",
        r.group_gaps, r.group_push_reorders, r.group_sync_requests, r.group_holes
    );
    s += &reconnect_rows(r);
    s += &lat_row("send→ack", &r.ack_us);
    s += &lat_row("send→deliver (members)", &r.deliver_us);
    s
}

/// `large-group --mention-all`, after the posts drained: the owner posts one `@all` to group
/// `id`; then every executor waits (at most `secs`) until each member that was online, but the
/// owner, holds its mention entry. The table rows and the JSON of the phase.
fn mention_all_phase(
    coord: &mut Coord,
    c: &Common,
    id: u64,
    secs: f64,
) -> anyhow::Result<(String, Value)> {
    let t0 = Instant::now();
    let mut m = coord.request(Op::MentionAll { group: id })?;
    // Not acked: nothing to wait for; every expected entry is missing.
    let got = coord.request(Op::MentionWait {
        max_secs: if m.acked > 0 { secs } else { 0.0 },
        quiet_ms: c.drain_quiet_ms,
    })?;
    let wait_secs = t0.elapsed().as_secs_f64();
    // Entries that came before the wait began are in the first report.
    m.merge(&got);
    let msg_id = m.mention_msg_id;
    let other_ids: Vec<u64> = m
        .mention_msg_ids
        .iter()
        .copied()
        .filter(|i| *i != msg_id)
        .collect();
    let mut t = format!(
        "  @all (owner's post mentioning uid 0; msg_id {msg_id}): sent {}, acked {}, errors {:?}, ack timeouts {}; its post copies (GroupDeliver) {}\n",
        m.sent, m.acked, m.send_errors, m.ack_timeouts, m.delivered
    );
    t += &format!(
        "  @all mention entries: expected {} (members online but the owner), received {}, missing {}, duplicates {}, to the poster {}, with another msg_id {other_ids:?}; {wait_secs:.2} s from the send to the end of the wait\n",
        m.mention_expected, m.mention_received, m.mention_missing, m.mention_dups, m.mention_to_poster
    );
    t += &lat_row("@all send→ack", &m.ack_us);
    t += &lat_row("@all send→mention", &m.mention_us);
    let j = json!({
        "group": id,
        "msg_id": msg_id,
        "sent": m.sent,
        "acked": m.acked,
        "send_errors": m.send_errors,
        "ack_timeouts": m.ack_timeouts,
        "ack_latency": lat(&m.ack_us),
        "post_copies": m.delivered,
        "expected": m.mention_expected,
        "received": m.mention_received,
        "missing": m.mention_missing,
        "duplicates": m.mention_dups,
        "to_poster": m.mention_to_poster,
        "other_msg_ids": other_ids,
        "seconds": wait_secs,
        "deliver_latency": lat(&m.mention_us),
    });
    Ok((t, j))
}

fn drain(c: &Common) -> Op {
    Op::Drain {
        quiet_ms: c.drain_quiet_ms,
        max_secs: c.drain_max_secs,
    }
}

fn run(
    cli: &Cli,
    coord: &mut Coord,
    total: u32,
    workers: usize,
) -> anyhow::Result<(String, Value)> {
    let c = &cli.common;
    let mut result = json!({ "params": params(c), "workers": workers, "users": total });
    let mut t = String::new();
    match &cli.scenario {
        Scenario::Idle { hold_secs, .. } => {
            result["scenario"] = "idle".into();
            let before = sys_snap(&c.server_pid);
            let login = coord.request(Op::Login { rate: c.rate })?;
            coord.request(Op::Hold { secs: *hold_secs })?;
            let after = sys_snap(&c.server_pid);
            let hold = coord.request(Op::Report)?;
            let n = login.logged_in.max(1) as f64;
            let still = coord.sum(|p| p.logged_in);
            t += &format!("== idle: {total} connections, held {hold_secs} s ==\n");
            t += &login_table(&login);
            t += &format!(
                "  during hold: heartbeats {} acked {}, disconnects {:?}, still logged in {}\n",
                hold.heartbeats, hold.heartbeat_acks, hold.disconnects, still
            );
            let mut mem = json!({
                "before": before, "after": after,
                "loadgen_rss_kib": hold.rss_kib,
                "loadgen_rss_per_conn_bytes": hold.rss_kib as f64 * 1024.0 / n,
                "kernel_tcp_mem_delta_bytes": (after.tcp_mem_pages as f64 - before.tcp_mem_pages as f64) * 4096.0,
                "kernel_tcp_mem_per_conn_bytes": (after.tcp_mem_pages as f64 - before.tcp_mem_pages as f64) * 4096.0 / n,
                "slab_delta_per_conn_bytes": (after.slab_kib as f64 - before.slab_kib as f64) * 1024.0 / n,
            });
            t += &format!(
                "  kernel: TCP sockets in use {} → {}, sockstat TCP mem {} → {} pages ({:.0} B/conn), slab {:+.0} B/conn (both ends of each connection are on this machine)\n",
                before.tcp_inuse,
                after.tcp_inuse,
                before.tcp_mem_pages,
                after.tcp_mem_pages,
                (after.tcp_mem_pages as f64 - before.tcp_mem_pages as f64) * 4096.0 / n,
                (after.slab_kib as f64 - before.slab_kib as f64) * 1024.0 / n
            );
            if !c.server_pid.is_empty() {
                let d = after.server_rss_kib as f64 - before.server_rss_kib as f64;
                mem["server_rss_delta_kib"] = d.into();
                mem["server_rss_per_conn_bytes"] = (d * 1024.0 / n).into();
                t += &format!(
                    "  server RSS {} KiB → {} KiB: {:+.0} B per connection\n",
                    before.server_rss_kib,
                    after.server_rss_kib,
                    d * 1024.0 / n
                );
            }
            t += &format!(
                "  loadgen RSS {} KiB ({:.0} B per connection)\n",
                hold.rss_kib,
                hold.rss_kib as f64 * 1024.0 / n
            );
            result["login"] = login_json(&login);
            result["hold"] = json!({"secs": hold_secs, "heartbeats": hold.heartbeats, "heartbeat_acks": hold.heartbeat_acks, "disconnects": hold.disconnects, "still_logged_in": still});
            result["memory"] = mem;
        }
        Scenario::C2c { msg_rate, secs, .. } => {
            result["scenario"] = "c2c".into();
            let login = coord.request(Op::Login { rate: c.rate })?;
            t += &format!("== c2c: {total} users, {msg_rate} msgs/s for {secs} s ==\n");
            t += &login_table(&login);
            let cpu0 = coord.cpu(&c.server_pid);
            coord.request(Op::Send {
                rate: *msg_rate,
                secs: *secs,
            })?;
            coord.request(drain(c))?;
            let cpu1 = coord.cpu(&c.server_pid);
            let r = coord.request(Op::Report)?;
            let j = (!c.no_track).then(|| join(&r));
            t += &traffic_table(&r, j.as_ref(), *secs);
            let (ct, cj) = cpu_report(cpu0, cpu1, r.sent, "message");
            t += &ct;
            result["cpu"] = cj;
            result["login"] = login_json(&login);
            result["msg_rate"] = (*msg_rate).into();
            result["secs"] = (*secs).into();
            result["c2c"] = traffic_json(&r, j.as_ref(), *secs);
        }
        Scenario::Max {
            start_rate,
            step,
            step_secs,
            p99_bound_ms,
            max_steps,
            warmup_secs,
            ..
        } => {
            result["scenario"] = "max".into();
            let login = coord.request(Op::Login { rate: c.rate })?;
            t += &format!(
                "== max: {total} users, from {start_rate} msgs/s by {step} every {step_secs} s until p99 send→deliver > {p99_bound_ms} ms or loss ==\n"
            );
            t += &login_table(&login);
            t += "  rate/s   sent/s   acked   delivered  lost  p99 ack ms  p99 dlv ms  pass\n";
            let mut rows = Vec::new();
            let mut best: Option<f64> = None;
            // One step: send at `rate` for `secs`, drain, and account; its table row's cells.
            let mut run = |rate: f64, secs: f64| -> anyhow::Result<_> {
                coord.request(Op::Send { rate, secs })?;
                coord.request(drain(c))?;
                let r = coord.request(Op::Report)?;
                let j = (!c.no_track).then(|| join(&r));
                let lost = j.as_ref().map_or(0, |j| j.lost);
                let sent_rate = r.sent as f64 / secs;
                let row = format!(
                    "  {:>7.0} {:>8.0} {:>8} {:>10} {:>5} {:>11.2} {:>11.2}",
                    rate,
                    sent_rate,
                    r.acked,
                    r.delivered,
                    lost,
                    r.ack_us.ms(0.99),
                    r.deliver_us.ms(0.99),
                );
                let json = traffic_json(&r, j.as_ref(), secs);
                Ok((r, lost, sent_rate, row, json))
            };
            let mut warm_lost = 0;
            if *warmup_secs > 0.0 {
                let (_, lost, _, row, json) = run(*start_rate, *warmup_secs)?;
                warm_lost = lost;
                t += &format!("{row}  warm-up ({warmup_secs} s, not judged)\n");
                result["warmup"] = json;
            }
            for i in 0..if warm_lost > 0 { 0 } else { *max_steps } {
                let rate = start_rate + step * i as f64;
                let (r, lost, sent_rate, row, json) = run(rate, *step_secs)?;
                let pass = r.deliver_us.ms(0.99) <= *p99_bound_ms
                    && lost == 0
                    && r.ack_timeouts == 0
                    && r.send_errors.is_empty()
                    && r.dedup_dups == 0
                    && sent_rate >= 0.95 * rate;
                t += &format!("{row}  {}\n", if pass { "yes" } else { "NO" });
                rows.push(json!({"rate": rate, "pass": pass, "c2c": json}));
                if !pass {
                    if sent_rate < 0.95 * rate {
                        t += "  (the loadgen could not generate the target rate: the limit may be this machine, not the server)\n";
                    }
                    break;
                }
                best = Some(rate);
            }
            t += &format!(
                "  highest passing rate: {}\n",
                best.map_or("none".into(), |b| format!("{b:.0} msgs/s"))
            );
            result["login"] = login_json(&login);
            result["steps"] = rows.into();
            result["best_rate"] = best.into();
            result["p99_bound_ms"] = (*p99_bound_ms).into();
        }
        Scenario::Storm {
            msgs_per_user,
            send_secs,
            storm_rate,
            storm_fraction,
            ..
        } => {
            result["scenario"] = "storm".into();
            let login = coord.request(Op::Login { rate: c.rate })?;
            let share = storm_fraction.clamp(0.0, 1.0);
            t += &format!(
                "== storm: {} of {total} connections drop and log in again ==\n",
                if share >= 1.0 {
                    "all".to_string()
                } else {
                    format!("{:.1} %", share * 100.0)
                }
            );
            t += &login_table(&login);
            let rate = total as f64 * msgs_per_user / send_secs.max(1e-3);
            coord.request(Op::Send {
                rate,
                secs: *send_secs,
            })?;
            // No drain: deliveries still in flight are cut off by the drop and must come back
            // through sync.
            let t0 = Instant::now();
            let storm = coord.request(Op::Storm {
                rate: *storm_rate,
                fraction: *storm_fraction,
            })?;
            let storm_secs = t0.elapsed().as_secs_f64();
            coord.request(drain(c))?;
            let rest = coord.request(Op::Report)?;
            let mut all = storm.clone();
            all.merge(&rest);
            let j = (!c.no_track).then(|| join(&all));
            t += &format!(
                "  storm: {} back (logged in and synced) in {:.2} s; failures {:?}; disconnects {:?}\n",
                storm.synced, storm_secs, storm.login_failures, storm.disconnects
            );
            t += &lat_row("drop→back", &storm.back_us);
            t += &format!(
                "  relogin rate {:.0}/s\n",
                storm.logged_in as f64 / storm_secs.max(1e-9)
            );
            t += "  messages sent before the storm:\n";
            t += &traffic_table(&all, j.as_ref(), *send_secs);
            result["login"] = login_json(&login);
            result["storm"] = json!({
                "dropped": storm.dropped,
                "back": storm.synced,
                "seconds": storm_secs,
                "failures": storm.login_failures,
                "back_latency": lat(&storm.back_us),
                "relogin": login_json(&storm),
            });
            result["c2c"] = traffic_json(&all, j.as_ref(), *send_secs);
        }
        Scenario::Group {
            members,
            groups,
            msg_rate,
            secs,
            ..
        } => {
            result["scenario"] = "group".into();
            let (groups, size) = group_layout(total, *members, *groups)?;
            let login = coord.request(Op::Login { rate: c.rate })?;
            t += &format!(
                "== group: {total} users, {groups} groups × {size} members, {msg_rate} posts/s for {secs} s ==\n"
            );
            t += &login_table(&login);
            let t0 = Instant::now();
            let created = coord.request(Op::CreateGroups)?;
            let create_secs = t0.elapsed().as_secs_f64();
            let mut ids = vec![0u64; groups as usize];
            for (g, id) in &created.group_ids {
                if let Some(slot) = ids.get_mut(*g as usize) {
                    *slot = *id;
                }
            }
            let made = ids.iter().filter(|id| **id != 0).count();
            t += &format!(
                "  groups created {made}/{groups} in {create_secs:.2} s; failures {:?}\n",
                created.group_create_errors
            );
            if made == 0 {
                bail!(
                    "no group could be created: {:?}",
                    created.group_create_errors
                );
            }
            coord.request(Op::SetGroups { ids })?;
            let cpu0 = coord.cpu(&c.server_pid);
            coord.request(Op::SendGroup {
                rate: *msg_rate,
                secs: *secs,
            })?;
            coord.request(drain(c))?;
            let cpu1 = coord.cpu(&c.server_pid);
            let r = coord.request(Op::Report)?;
            let (ct, cj) = cpu_report(cpu0, cpu1, r.sent, "post");
            result["cpu"] = cj;
            let j = (!c.no_track).then(|| join_group(&r, size, total));
            let events = created.group_events + r.group_events;
            t += &group_table(&r, j.as_ref(), *secs);
            t += &format!(
                "  group-created events accepted {events} (expected {}; ignored by the accounting)\n",
                made as u64 * size as u64
            );
            t += &ct;
            result["login"] = login_json(&login);
            result["groups"] = groups.into();
            result["members"] = size.into();
            result["msg_rate"] = (*msg_rate).into();
            result["secs"] = (*secs).into();
            result["create"] = json!({
                "created": made,
                "seconds": create_secs,
                "failures": created.group_create_errors,
                "events": events,
            });
            result["group"] = group_json(&r, j.as_ref(), *secs);
        }
        Scenario::LargeGroup {
            members,
            msg_rate,
            secs,
            add_batch,
            add_window,
            create_members,
            ready_secs,
            p99_bound_ms,
            mention_all,
            mention_all_secs,
            ..
        } => {
            result["scenario"] = "large-group".into();
            let login = coord.request(Op::Login { rate: c.rate })?;
            t += &format!(
                "== large-group: {total} online members of one {members}-member group, {msg_rate} posts/s for {secs} s ==\n"
            );
            t += &login_table(&login);
            let initial = (*create_members).clamp(1, *members);
            let t0 = Instant::now();
            let built = coord.request(Op::BuildLarge {
                members: *members,
                initial,
                batch: *add_batch,
                window: *add_window,
            })?;
            let build_secs = t0.elapsed().as_secs_f64();
            let Some(&(_, id)) = built.group_ids.first() else {
                bail!(
                    "the group could not be created: {:?}",
                    built.group_create_errors
                );
            };
            let batches = (members - initial).div_ceil(*add_batch);
            let size = initial as u64 + built.members_added;
            t += &format!(
                "  group {id} built in {build_secs:.2} s: created with {initial} members, then {} added by {}/{batches} GroupAdds of {add_batch} (window {add_window}): {size} members; refusals {:?}; batches never added {}\n",
                built.members_added, built.adds_ok, built.add_errors, built.adds_failed
            );
            t += &lat_row("GroupAdd→OpResult", &built.add_us);
            let large = built.head_error.is_none();
            match &built.head_error {
                None => t += &format!("  group head after the build: seq {}\n", built.large_head),
                Some(e) => {
                    t += &format!(
                        "  the group is NOT large (its head could not be read: {e}): posts go to the members' own timelines\n"
                    )
                }
            }
            coord.request(Op::SetGroups { ids: vec![id] })?;
            let t1 = Instant::now();
            let ready = coord.request(Op::LargeReady {
                group: id,
                head: built.large_head,
                max_secs: if large { *ready_secs } else { 0.0 },
            })?;
            let ready_secs_taken = t1.elapsed().as_secs_f64();
            // The build's events may still be on their way to the members online: let them
            // arrive before posting, so that the posts are measured alone.
            let t2 = Instant::now();
            coord.request(drain(c))?;
            let settle_secs = t2.elapsed().as_secs_f64();
            let late = coord.request(Op::Report)?;
            let build_pushes = built.build_pushes + ready.build_pushes + late.build_pushes;
            let build_bytes =
                built.build_push_bytes + ready.build_push_bytes + late.build_push_bytes;
            let late_pushes = late.group_pushes;
            t += &format!(
                "  group events pushed live (GroupDeliver) during the build to the members online: {build_pushes} frames, {:.1} MiB of bodies\n",
                build_bytes as f64 / 1048576.0
            );
            if large {
                t += &format!(
                    "  members ready (BecameLarge in their own timeline) {}/{} after {ready_secs_taken:.2} s more; the build's pushes settled {settle_secs:.2} s later ({late_pushes} arrived after the head was read)\n",
                    ready.large_ready,
                    ready.large_ready + ready.large_not_ready
                );
            }
            let cpu0 = coord.cpu(&c.server_pid);
            coord.request(Op::SendGroup {
                rate: *msg_rate,
                secs: *secs,
            })?;
            coord.request(drain(c))?;
            let cpu1 = coord.cpu(&c.server_pid);
            let r = coord.request(Op::Report)?;
            let (ct, cj) = cpu_report(cpu0, cpu1, r.sent, "post");
            let j = (!c.no_track).then(|| join_group(&r, total, total));
            let seqs = (!c.no_track).then(|| check_post_seqs(&r.post_seqs));
            t += &large_table(&r, j.as_ref(), seqs.as_ref(), *secs);
            let events = login.group_events
                + built.group_events
                + ready.group_events
                + late.group_events
                + r.group_events;
            t += &format!(
                "  group events accepted (own timelines and, after the build, the group's; ignored by the accounting): {events}\n"
            );
            let p99 = r.deliver_us.ms(0.99);
            let met = r.deliver_us.len() > 0 && p99 <= *p99_bound_ms;
            t += &format!(
                "  target p99 send→deliver ≤ {p99_bound_ms} ms over every member copy: p99 {p99:.2} ms: {}\n",
                if met { "met" } else { "NOT met" }
            );
            t += &ct;
            let mut cj = cj;
            if let Some(sv) = cj["server_secs"].as_f64() {
                let per_copy = sv * 1e6 / r.delivered.max(1) as f64;
                cj["server_us_per_copy"] = per_copy.into();
                t += &format!(
                    "  server cpu per member copy delivered: {per_copy:.2} µs ({} copies)\n",
                    r.delivered
                );
            }
            result["cpu"] = cj;
            let mention = if *mention_all {
                let (mt, mj) = mention_all_phase(coord, c, id, *mention_all_secs)?;
                t += &mt;
                mj
            } else {
                Value::Null
            };
            result["login"] = login_json(&login);
            result["members"] = (*members).into();
            result["msg_rate"] = (*msg_rate).into();
            result["secs"] = (*secs).into();
            result["group"] = group_json(&r, j.as_ref(), *secs);
            result["large"] = json!({
                "group": id,
                "members": size,
                "online": total,
                "large": large,
                "build": {
                    "seconds": build_secs,
                    "created_with": initial,
                    "add_batch": add_batch,
                    "add_window": add_window,
                    "adds": batches,
                    "adds_ok": built.adds_ok,
                    "members_added": built.members_added,
                    "refusals": built.add_errors,
                    "adds_failed": built.adds_failed,
                    "add_latency": lat(&built.add_us),
                    "head": built.large_head,
                    "head_error": built.head_error,
                    "live_event_frames": build_pushes,
                    "live_event_bytes": build_bytes,
                },
                "ready": {
                    "seconds": ready_secs_taken,
                    "settle_seconds": settle_secs,
                    "late_build_pushes": late_pushes,
                    "ready": ready.large_ready,
                    "not_ready": ready.large_not_ready,
                },
                "timeline": {
                    "pushes": r.group_pushes,
                    "raw_dups": r.group_raw_dups,
                    "gaps": r.group_gaps,
                    "push_reorders": r.group_push_reorders,
                    "sync_requests": r.group_sync_requests,
                    "group_holes": r.group_holes,
                },
                "seqs": seqs,
                "events": events,
                "target": {
                    "p99_bound_ms": p99_bound_ms,
                    "p99_ms": p99,
                    "met": met,
                },
                "mention_all": mention,
            });
        }
        Scenario::Worker { .. } | Scenario::Logins { .. } => unreachable!("handled in main"),
    }
    Ok((t, result))
}

#[cfg(test)]
mod verdict_tests {
    use super::verdict;
    use serde_json::json;

    #[test]
    fn a_run_fails_when_nobody_logged_in_or_a_message_was_lost() {
        let ok = json!({"login": {"attempted": 10, "logged_in": 10},
                        "c2c": {"lost": 0, "phantom": 0}});
        assert!(verdict(&ok).is_empty());
        let nobody = json!({"login": {"attempted": 10, "logged_in": 0}, "c2c": {"lost": 0}});
        assert!(verdict(&nobody)[0].contains("no connection logged in"));
        let lost = json!({"login": {"attempted": 10, "logged_in": 10}, "c2c": {"lost": 3}});
        assert_eq!(verdict(&lost), ["c2c: 3 lost"]);
        // Retried attempts are no failure; users that never logged in are.
        let retried = json!({"login": {"attempted": 14, "logged_in": 10, "gave_up": 0},
                             "c2c": {"lost": 0}});
        assert!(verdict(&retried).is_empty());
        let some = json!({"login": {"attempted": 10, "logged_in": 7, "gave_up": 3,
                                    "failures": {"BadToken": 3}},
                          "c2c": {"lost": 0}});
        assert_eq!(
            verdict(&some),
            [r#"3 users never logged in (failed attempts by reason: {"BadToken":3})"#]
        );
        // Users still away at the end fail the run; their messages are not counted lost.
        let away = json!({"login": {"attempted": 10, "logged_in": 10},
                          "c2c": {"lost": 0, "undelivered_offline": 5, "not_back": 2}});
        assert_eq!(
            verdict(&away),
            ["c2c: 2 users that were online were not back (logged in and synced) at the end"]
        );
        let slow = json!({"login": {"attempted": 10, "logged_in": 10},
                          "c2c": {"lost": 0, "ack_timeouts": 4}});
        assert_eq!(verdict(&slow), ["c2c: 4 ack_timeouts"]);
        let group = json!({"login": {"attempted": 4, "logged_in": 4},
                           "group": {"accounting": {"lost": 0, "phantom": 1}}});
        assert_eq!(verdict(&group), ["group: 1 phantom"]);
        let group_slow = json!({"login": {"attempted": 4, "logged_in": 4},
                                "group": {"ack_timeouts": 2, "accounting": {"lost": 0}}});
        assert_eq!(verdict(&group_slow), ["group: 2 ack_timeouts"]);
        // Duplicates after dedup and per-sender reordering are violations too.
        let dup = json!({"login": {"attempted": 4, "logged_in": 4},
                         "c2c": {"lost": 0, "dedup_dups": 1, "out_of_order": 2}});
        assert_eq!(verdict(&dup), ["c2c: 1 dedup_dups", "c2c: 2 out_of_order"]);
        let group_order = json!({"login": {"attempted": 4, "logged_in": 4},
                                 "group": {"out_of_order": 3, "reordered_by_resend": 9,
                                           "accounting": {"order_mismatch_members": 1}}});
        assert_eq!(
            verdict(&group_order),
            ["group: 1 order_mismatch_members", "group: 3 out_of_order"]
        );
        let max = json!({"login": {"attempted": 4, "logged_in": 4},
                         "steps": [{"rate": 1000, "c2c": {"lost": 0}},
                                   {"rate": 2000, "c2c": {"lost": 2}}]});
        assert_eq!(verdict(&max), ["max step 2000: 2 lost"]);
        let warm = json!({"login": {"attempted": 4, "logged_in": 4},
                          "warmup": {"lost": 1}, "steps": []});
        assert_eq!(verdict(&warm), ["max warm-up: 1 lost"]);
        // large-group: its build, readiness and group-timeline checks fail the run too; a
        // missed latency target does not.
        let large = json!({"login": {"attempted": 4, "logged_in": 4},
                           "group": {"accounting": {"lost": 0}},
                           "large": {"build": {"adds_failed": 1}, "ready": {"not_ready": 0},
                                     "timeline": {"group_holes": 2},
                                     "seqs": {"posts_with_two_seqs": 0, "seqs_with_two_posts": 3},
                                     "target": {"met": false}}});
        assert_eq!(
            verdict(&large),
            [
                "large-group: 1 batches never added",
                "large-group: 2 holes in the group's timeline",
                "large-group: 3 seqs with two posts"
            ]
        );
        // large-group --mention-all: missing, duplicated or misplaced mention entries fail
        // the run, and so does an @all that was not acknowledged.
        let mention = |m: serde_json::Value| {
            json!({"login": {"attempted": 4, "logged_in": 4},
                   "group": {"accounting": {"lost": 0}},
                   "large": {"mention_all": m}})
        };
        let clean = json!({"acked": 1, "expected": 3, "received": 3, "missing": 0,
                           "duplicates": 0, "to_poster": 0, "other_msg_ids": []});
        assert!(verdict(&mention(clean)).is_empty());
        let bad = json!({"acked": 1, "expected": 3, "received": 2, "missing": 1,
                         "duplicates": 2, "to_poster": 1, "other_msg_ids": [5]});
        assert_eq!(
            verdict(&mention(bad)),
            [
                "large-group: 1 members without the @all mention entry",
                "large-group: 2 duplicate @all mention entries",
                "large-group: 1 @all mention entries to the poster",
                "large-group: @all mention entries with another msg_id than the post's: [5]"
            ]
        );
        let unacked = json!({"acked": 0, "send_errors": {"Forbidden": 1}, "ack_timeouts": 0,
                             "expected": 0, "missing": 0, "other_msg_ids": []});
        assert_eq!(
            verdict(&mention(unacked)),
            [
                r#"large-group: the @all post was not acknowledged (errors {"Forbidden":1}, ack timeouts 0)"#
            ]
        );
        // Untracked runs (--no-track) have no counts: nothing to judge.
        let untracked = json!({"login": {"attempted": 4, "logged_in": 4}, "c2c": {"lost": null}});
        assert!(verdict(&untracked).is_empty());
    }
}
