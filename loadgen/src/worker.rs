//! A worker process: the coordinator re-executes this binary as `im-loadgen worker --plan <json>`.
//! It runs one glommio executor per core it was given, forwards the coordinator's requests (JSON
//! lines on stdin) to every executor, merges their answers and writes events (JSON lines) to stdout.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::{LocalExecutorBuilder, Placement};

use crate::exec::{self, ExecMsg, Live};
use crate::msg::{Event, Hist, Op, Plan, Progress, Report, Request, PROGRESS_EVERY};

enum In {
    Req(Request),
    Eof,
    Exec(usize, ExecMsg),
}

/// An executor that has not handed over its latency interval (every [`PROGRESS_EVERY`], from a
/// timer) for this long is stuck: its timers no longer fire. Seen once at a million connections
/// with the load average at ~170: the executor's thread asleep in `io_uring_enter`
/// (`io_cqring_wait`) for good, a lost wakeup of glommio's sleep (the class of
/// DataDog/glommio#547). Its users would hang the run until a phase's deadline (up to an hour),
/// so the worker reports it as fatal instead.
const STALLED: Duration = Duration::from_secs(60);

/// An executor silent this long is nudged: its thread gets a `SIGUSR1` (whose handler does
/// nothing), which ends its `io_uring_enter` with `EINTR`, so glommio looks at its timers again
/// even if the wakeup it slept for was lost. Four times a second while the silence lasts; a nudge
/// is harmless to an executor that was only slow (starved executors at a million connections on 2
/// CPUs were silent for 3-4 s now and then: hence 10 s). The run still stops at [`STALLED`] if
/// the executor never resumes.
const NUDGE_AFTER: Duration = Duration::from_secs(10);

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs the no-op `SIGUSR1` handler of the nudges, without `SA_RESTART` (the interrupted
/// `io_uring_enter` must return).
fn install_nudge_handler() {
    // SAFETY: a zeroed sigaction with a handler that does nothing (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

/// Sends the nudge to thread `tid` of this process.
fn nudge(tid: i32) -> bool {
    // SAFETY: tgkill to a thread of this process with a signal whose handler is installed.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) == 0 }
}

fn emit(ev: &Event) {
    let mut out = std::io::stdout().lock();
    // The coordinator reads line by line; a broken pipe means it is gone, so exit quietly.
    if serde_json::to_writer(&mut out, ev).is_err()
        || out.write_all(b"\n").is_err()
        || out.flush().is_err()
    {
        std::process::exit(0);
    }
}

/// VmRSS of a process in KiB, from /proc/<pid>/status (`self` for this one).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) process `pid` has used so far, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain anything.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub fn main(plan_json: &str) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_str(plan_json).context("bad --plan")?;
    raise_nofile();
    let plan = Arc::new(plan);
    let cores = plan.cores.max(1) as usize;
    let live = Arc::new(Live::default());
    let (tx, rx) = mpsc::channel::<In>();
    let (etx, erx) = mpsc::channel::<(usize, ExecMsg)>();

    // Executors: users split evenly, each with its share of the worker's rates.
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    install_nudge_handler();
    // Each executor's thread id, for the nudges (0 until its thread runs).
    let tids: Vec<Arc<std::sync::atomic::AtomicI32>> = (0..cores).map(|_| Arc::default()).collect();
    for (i, tid) in tids.iter().enumerate() {
        let lo = plan.first + (plan.count as u64 * i as u64 / cores as u64) as u32;
        let hi = plan.first + (plan.count as u64 * (i as u64 + 1) / cores as u64) as u32;
        let share = if plan.total == 0 {
            0.0
        } else {
            (hi - lo) as f64 / plan.total as f64
        };
        let (rtx, rrx) = mpsc::channel::<Request>();
        senders.push(rtx);
        let placement = if plan.pin {
            Placement::Fixed((plan.worker as usize * cores + i) % ncpu)
        } else {
            Placement::Unbound
        };
        let (p, l, e) = (plan.clone(), live.clone(), etx.clone());
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("lg-w{}-{}", plan.worker, i))
            // Only sockets here: glommio's registered buffer is for file I/O, keep it small so
            // it fits the memlock limit (8 MiB here) even with several executors.
            .io_memory(plan.io_memory_kib * 1024)
            .spawn({
                let tid = tid.clone();
                move || {
                    // SAFETY: gettid has no preconditions.
                    tid.store(unsafe { libc::gettid() }, Relaxed);
                    exec::run(p, i, lo..hi, share, l, rrx, e)
                }
            })
            .map_err(|e| anyhow::anyhow!("glommio executor {i}: {e}"))?;
        handles.push(h);
    }
    drop(etx);
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            while let Ok((i, m)) = erx.recv() {
                if tx.send(In::Exec(i, m)).is_err() {
                    return;
                }
            }
        });
    }
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Request>(&line) {
                    Ok(r) => {
                        if tx.send(In::Req(r)).is_err() {
                            return;
                        }
                    }
                    Err(e) => emit(&Event::Fatal {
                        message: format!("bad request {line:?}: {e}"),
                    }),
                }
            }
            let _ = tx.send(In::Eof);
        });
    }
    drop(tx);

    let mut waiting: HashMap<u64, (usize, Option<Report>)> = HashMap::new();
    let mut iv_ack = Hist::default();
    let mut iv_deliver = Hist::default();
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    let mut quitting: Option<u64> = None;
    let mut last_tick = vec![Instant::now(); cores];
    // Nudges sent to each executor during its current silence.
    let mut nudged = vec![0u32; cores];
    loop {
        let wait = next_progress.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(In::Req(r)) => {
                if matches!(r.op, Op::Quit) {
                    quitting = Some(r.id);
                }
                waiting.insert(r.id, (0, None));
                for s in &senders {
                    let _ = s.send(r.clone());
                }
            }
            Ok(In::Eof) => {
                // Coordinator gone: stop.
                for s in &senders {
                    let _ = s.send(Request {
                        id: u64::MAX,
                        op: Op::Quit,
                    });
                }
                quitting = Some(u64::MAX);
                waiting.insert(u64::MAX, (0, None));
            }
            Ok(In::Exec(i, ExecMsg::Interval { ack, deliver })) => {
                if let Some(t) = last_tick.get_mut(i) {
                    if nudged[i] > 0 {
                        eprintln!(
                            "im-loadgen: worker {} executor {i} resumed after {:.1} s of silence \
                             and {} nudge(s)",
                            plan.worker,
                            t.elapsed().as_secs_f64(),
                            nudged[i]
                        );
                        nudged[i] = 0;
                    }
                    *t = Instant::now();
                }
                iv_ack.merge(&ack);
                iv_deliver.merge(&deliver);
            }
            Ok(In::Exec(_, ExecMsg::Done { id, report })) => {
                let Some(w) = waiting.get_mut(&id) else {
                    continue;
                };
                w.0 += 1;
                if let Some(r) = report {
                    w.1.get_or_insert_with(Report::default).merge(&r);
                }
                if w.0 == cores {
                    let (_, mut rep) = waiting.remove(&id).expect("present");
                    if let Some(r) = rep.as_mut() {
                        r.rss_kib = rss_kib("self").unwrap_or(0);
                    }
                    if id != u64::MAX {
                        emit(&Event::Done {
                            id,
                            report: rep.map(Box::new),
                        });
                    }
                    if quitting == Some(id) {
                        break;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                next_progress += PROGRESS_EVERY;
                for i in 0..cores {
                    let silent = last_tick[i].elapsed();
                    let tid = tids[i].load(Relaxed);
                    // A nudge per progress interval (250 ms) of silence past NUDGE_AFTER.
                    if silent >= NUDGE_AFTER && tid != 0 && nudge(tid) {
                        if nudged[i] == 0 {
                            eprintln!(
                                "im-loadgen: worker {} executor {i} silent for {:.1} s: nudging it",
                                plan.worker,
                                silent.as_secs_f64()
                            );
                        }
                        nudged[i] += 1;
                    }
                }
                if let Some(i) = (0..cores).find(|&i| last_tick[i].elapsed() >= STALLED) {
                    emit(&Event::Fatal {
                        message: format!(
                            "executor {i} of worker {} ran no timer for {} s (stuck in \
                             io_uring_enter: a lost wakeup in glommio; {} nudges did not wake \
                             it); its users cannot be accounted, the run stops",
                            plan.worker,
                            STALLED.as_secs(),
                            nudged[i]
                        ),
                    });
                    std::process::exit(3);
                }
                emit(&Event::Progress(Box::new(Progress {
                    worker: plan.worker,
                    connected: live.connected.load(Relaxed),
                    logged_in: live.logged_in.load(Relaxed),
                    login_failed: live.login_failed.load(Relaxed),
                    sent: live.sent.load(Relaxed),
                    acked: live.acked.load(Relaxed),
                    delivered: live.delivered.load(Relaxed),
                    disconnects: live.disconnects.load(Relaxed),
                    rss_kib: rss_kib("self").unwrap_or(0),
                    ack_us: std::mem::take(&mut iv_ack),
                    deliver_us: std::mem::take(&mut iv_deliver),
                })));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A nudge ends a thread's blocking system call with `EINTR` (the handler is installed
    /// without `SA_RESTART`), which is what brings a glommio executor asleep in `io_uring_enter`
    /// back to its loop.
    #[test]
    fn a_nudge_interrupts_a_blocked_system_call() {
        install_nudge_handler();
        let mut fds = [0i32; 2];
        // SAFETY: a pipe into a stack array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (tid_tx, tid_rx) = mpsc::channel();
        let reader = fds[0];
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let mut b = [0u8; 1];
            // SAFETY: a read into a stack buffer; nothing is ever written to the pipe.
            let r = unsafe { libc::read(reader, b.as_mut_ptr().cast(), 1) };
            (r, std::io::Error::last_os_error().raw_os_error())
        });
        let tid = tid_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Nudge until the read returns (the first signal may come before the read blocks).
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the read was never interrupted");
            assert!(nudge(tid));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(t.join().unwrap(), (-1, Some(libc::EINTR)));
        // SAFETY: closing the two ends made above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn cpu_ticks_reads_this_process_and_grows_with_work() {
        let t0 = cpu_ticks("self").expect("/proc/self/stat");
        assert_eq!(cpu_ticks("4294967295"), None);
        // Burn CPU until a tick is counted (10 ms at 100 Hz), within a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while cpu_ticks("self").unwrap() == t0 {
            assert!(Instant::now() < deadline, "no CPU tick counted in 10 s");
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
    }
}
