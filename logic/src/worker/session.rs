//! Sessions: login with an SSO token (kicking the previous device of the same type), a closed
//! connection, and a gate whose link dropped.

use super::*;

impl<S: Store> Worker<S> {
    pub(super) fn on_gate_down(&mut self, gate: u16) {
        let gone: Vec<(ConnId, UserId)> = self
            .users
            .iter()
            .flat_map(|(&uid, u)| u.devices.iter().map(move |d| (d.conn, uid)))
            .filter(|(c, _)| c.gate() == gate)
            .collect();
        for (conn, uid) in gone {
            self.on_closed(conn, uid);
        }
    }

    pub(super) fn on_closed(&mut self, conn: ConnId, uid: UserId) {
        self.unsubscribe_all(conn);
        // A connection kicked by a newer login of the same device type has no device any more.
        let Some(devs) = self.users.get_mut(&uid).map(|u| &mut u.devices) else {
            return;
        };
        let Some(i) = devs.iter().position(|d| d.conn == conn) else {
            return;
        };
        let device_type = devs.remove(i).device_type;
        let empty = devs.is_empty();
        self.publish(crate::publish::DirOp::Offline {
            uid,
            device_type: device_type as u8,
            conn,
        });
        if empty {
            self.large.offline(uid);
            self.went_offline(uid);
        }
    }

    pub(super) async fn on_login(
        &mut self,
        conn: ConnId,
        gate_uid: UserId,
        req_id: u32,
        body: Bytes,
        round: &mut Round,
    ) {
        let now = self.now;
        let refuse = |round: &mut Round, code: ErrorCode, message: &str| {
            let r = Command::LoginResult {
                code,
                server_time_ms: now,
                max_seq: Seq(0),
                heartbeat_secs: 0,
                message: message.to_owned(),
            };
            round.close(conn, r.to_bytes(req_id));
        };
        if self.device(gate_uid, conn).is_some() {
            round.send(
                conn,
                error_frame(ErrorCode::AlreadyLoggedIn, req_id, "already logged in"),
            );
            return;
        }
        let Ok(Command::Login {
            uid,
            device_type,
            device_id,
            token,
            last_seq,
        }) = Command::decode_body(Cmd::Login, body)
        else {
            return refuse(round, ErrorCode::Malformed, "malformed login");
        };
        if uid != gate_uid || uid.0 == 0 {
            return refuse(round, ErrorCode::Malformed, "bad user id");
        }
        if device_id.is_empty() || device_id.len() > MAX_DEVICE_ID_LEN {
            return refuse(
                round,
                ErrorCode::InvalidArgument,
                "device id must be 1..=64 bytes",
            );
        }
        match self.verifier.verify(uid, &token, self.now / 1000) {
            Ok(()) => {}
            Err(TokenError::Expired) => {
                return refuse(round, ErrorCode::TokenExpired, "token expired")
            }
            Err(e) => return refuse(round, ErrorCode::BadToken, &e.to_string()),
        }
        if let Err(e) = self.load_user(uid).await {
            tracing::warn!("login of {uid}: {e}");
            return refuse(round, ErrorCode::Unavailable, "store unavailable, retry");
        }
        // A cursor not yet written (see `Worker::lazy`) is newer than the store's.
        let cursor = match self.lazy.cursor_of(uid, &device_id) {
            Some(c) => Ok(c),
            None => self.store.cursor(uid, &device_id).await,
        };
        let cursor = match cursor {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cursor of {uid}: {e}");
                return refuse(round, ErrorCode::Unavailable, "store unavailable, retry");
            }
        };
        // The user's large groups and read cursors, for `GroupHeads` after the result.
        let reads = match self.large_reads(uid).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("large groups of {uid}: {e}");
                return refuse(round, ErrorCode::Unavailable, "store unavailable, retry");
            }
        };
        let was_online = self.online(uid);
        let u = self.users.get_mut(&uid).expect("loaded above");
        // One device per type: kick the previous one.
        let kicked = u.devices.take_if(|d| d.device_type == device_type);
        // What the device may acknowledge: what it had acknowledged, or what it says it holds.
        let sent = cursor.max(Seq(last_seq.0.min(u.last_seq)));
        let device_id = device_id.into_boxed_str();
        let route_device_id = device_id.to_string();
        u.devices.push(Device {
            conn,
            device_type,
            device_id,
            cursor,
            sent,
            typing_tat: 0,
        });
        for old in kicked.into_iter().map(|d| d.conn) {
            // Its presence subscriptions go with it now, not when the gate's close report comes
            // back (until then it would still be sent notices).
            self.unsubscribe_all(old);
            let k = Command::Kickout {
                reason: KickReason::SameDeviceType as u8,
                message: "logged in on another device of the same type".into(),
            };
            round.close(old, k.to_bytes(0));
        }
        if !was_online {
            self.came_online(uid);
        }
        self.large_login(uid, conn, reads, !was_online, round);
        Metrics::inc(&self.metrics.logins);
        self.publish(crate::publish::DirOp::Online {
            uid,
            route: crate::directory::RouteEntry {
                device_type: device_type as u8,
                device_id: route_device_id,
                gate: conn.gate(),
                core: conn.core(),
                conn: conn.0,
                epoch: self.now,
            },
        });
        let max_seq = Seq(self.users[&uid].last_seq);
        let r = Command::LoginResult {
            code: ErrorCode::Ok,
            server_time_ms: self.now,
            max_seq,
            heartbeat_secs: self.cfg.heartbeat_secs,
            message: String::new(),
        };
        round
            .downs
            .entry(conn.0 >> 32)
            .or_default()
            .push(Down::Bind {
                conn,
                uid,
                data: r.to_bytes(req_id),
            });
    }
}
