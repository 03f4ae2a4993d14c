//! Delivery acks: a device's `DeliverAck` moves its cursor and tells the senders (`Delivered`),
//! up to the highest seq that connection was given (a live `Deliver`, a `SyncPage`) or declared
//! at login; an ack beyond it counts only up to it.

use super::*;

impl<S: Store> Worker<S> {
    pub(super) async fn on_deliver_ack(
        &mut self,
        conn: ConnId,
        uid: UserId,
        seq: Seq,
        round: &mut Round,
    ) {
        // Notices pending before this process loaded the user come back from the store first.
        if let Err(e) = self.recover_pending(uid).await {
            tracing::warn!("pending notices of {uid} not recovered yet: {e}");
        }
        let Some(u) = self.users.get_mut(&uid) else {
            return;
        };
        let seq = Seq(seq.0.min(u.last_seq));
        let Some(dev) = u.devices.iter_mut().find(|d| d.conn == conn) else {
            return;
        };
        // Only what this connection was given (or declared at login) can be acknowledged.
        let seq = seq.min(dev.sent);
        if seq <= dev.cursor {
            return;
        }
        dev.cursor = seq;
        self.lazy
            .cursor(uid, dev.device_id.to_string(), seq, self.now);
        let Some(a) = u.active.as_mut() else {
            return;
        };
        let me = self.router.global(self.idx);
        let mut mine = Vec::new();
        let taken = a.pending.take_through(seq.0);
        self.pending_entries -= taken.len();
        for p in taken {
            // "Delivered" notices are a c2c feature: a group post would get one per member.
            if p.conv != CONV_C2C {
                continue;
            }
            let note = DeliveredNote {
                sender: p.sender,
                msg_id: p.msg_id,
                recipient: uid,
            };
            match self.router.owner(p.sender) {
                // The sender is this worker's: its notice goes out with this round, not
                // through the inbox and a round of its own.
                w if w == me => mine.push(note),
                w => round.delivered_out[w].push(note),
            }
        }
        if !mine.is_empty() {
            self.on_delivered(mine, round);
        }
    }

    pub(super) fn on_delivered(&mut self, notes: Vec<DeliveredNote>, round: &mut Round) {
        for n in notes {
            let devs = devices_of(&self.users, n.sender);
            if devs.is_empty() {
                continue;
            }
            let f = Command::Delivered {
                msg_id: n.msg_id,
                recipient: n.recipient,
            }
            .to_bytes(0);
            for d in devs {
                round.send(d.conn, f.clone());
            }
        }
    }
}
