//! A [`DownstreamSink`] that records what logic sends to gates, for tests that drive logic
//! without a gate (the worker's unit tests, `logic/tests/commit_stall.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use im_shared::frame::FrameCodec;
use im_shared::link::{Down, DownstreamSink};
use im_shared::{Command, ConnId};

/// Every [`Down`] sent to any gate, in the order sent.
#[derive(Debug, Default)]
pub struct RecordingSink(Mutex<Vec<Down>>);

impl DownstreamSink for RecordingSink {
    fn send(&self, _gate: u16, _core: u16, batch: Vec<Down>) {
        self.downs().extend(batch);
    }
}

/// One frame a connection received: its command, request id, and whether the gate was told to
/// close the connection after it (`Close`) or to bind it to a user (`Bind`).
#[derive(Clone, Debug)]
pub struct DownFrame {
    pub conn: ConnId,
    pub req_id: u32,
    pub cmd: Command,
    pub close: bool,
    pub bind: bool,
}

impl DownFrame {
    /// Decodes a [`Down`] into the frame each of its connections receives (one, or one per
    /// connection of a [`Down::SendMany`]); logic sends one client frame per `Down`, and anything
    /// else (no frame, two frames, a frame or body that does not decode, a `SendMany` for no
    /// connection or for connections of several gate cores) fails the test.
    pub fn decode(d: &Down) -> Vec<DownFrame> {
        let (conns, data, close, bind) = match d {
            Down::Send { conn, data } => (std::slice::from_ref(conn), data, false, false),
            Down::Close { conn, data } => (std::slice::from_ref(conn), data, true, false),
            Down::Bind { conn, data, .. } => (std::slice::from_ref(conn), data, false, true),
            Down::SendMany { conns, data } => {
                assert!(!conns.is_empty(), "SendMany for no connection");
                assert!(
                    conns.iter().all(|c| c.0 >> 32 == conns[0].0 >> 32),
                    "SendMany across gate cores: {conns:?}"
                );
                (&conns[..], data, false, false)
            }
        };
        let mut buf = BytesMut::from(&data[..]);
        let f = FrameCodec::new(1 << 24)
            .decode(&mut buf)
            .expect("a valid frame")
            .expect("a whole frame");
        assert!(buf.is_empty(), "one frame per down");
        let cmd = Command::decode(&f).expect("a valid body");
        conns
            .iter()
            .map(|&conn| DownFrame {
                conn,
                req_id: f.req_id,
                cmd: cmd.clone(),
                close,
                bind,
            })
            .collect()
    }
}

impl RecordingSink {
    fn downs(&self) -> std::sync::MutexGuard<'_, Vec<Down>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything received since the last `take`, decoded, and forgets it.
    pub fn take(&self) -> Vec<DownFrame> {
        std::mem::take(&mut *self.downs())
            .iter()
            .flat_map(DownFrame::decode)
            .collect()
    }

    /// How many [`Down`]s were received since the last `take`.
    pub fn len(&self) -> usize {
        self.downs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything received since the last `take`, decoded (kept).
    pub fn frames(&self) -> Vec<DownFrame> {
        self.downs().iter().flat_map(DownFrame::decode).collect()
    }

    /// Waits until `pred` holds for [`RecordingSink::frames`]; panics naming `what` after
    /// `deadline`.
    pub fn wait(&self, what: &str, deadline: Duration, pred: impl Fn(&[DownFrame]) -> bool) {
        let end = Instant::now() + deadline;
        while !pred(&self.frames()) {
            assert!(
                Instant::now() < end,
                "timed out after {deadline:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
