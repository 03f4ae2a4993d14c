//! Requests of the HTTP API handled by a worker: s2c pushes to users, group creation, the groups
//! of a user, dropping an invalid push token.

use im_shared::proto::CONV_S2C;
use im_shared::shard::VSHARDS;
use im_shared::{ErrorCode, Seq, ShardId, UserId};

use super::{ApiOk, ApiReq, Reply, Round, Worker};
use crate::api::{Accepted, ApiError};
use crate::store::{DedupEntry, Op, PushToken, Store};

/// Most recipients of one s2c call.
pub const MAX_S2C_USERS: usize = 1000;

impl<S: Store> Worker<S> {
    /// The lowest virtual shard this worker owns: the outbox shard of its s2c messages.
    fn my_shard(&self) -> ShardId {
        let me = self.router.global(self.idx);
        (0..VSHARDS)
            .map(ShardId)
            .find(|s| self.router.owner_of_shard(*s) == me)
            .unwrap_or(ShardId(0))
    }

    pub(super) async fn on_api(&mut self, req: ApiReq, round: &mut Round) {
        match req {
            ApiReq::ServerSend {
                from,
                to,
                body,
                request_id,
                reply,
            } => {
                let mut to = to;
                to.retain(|u| u.0 != 0);
                to.sort_unstable();
                to.dedup();
                if from.0 == 0 || to.is_empty() || to.len() > MAX_S2C_USERS {
                    let e = ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("from must be non-zero and to 1..={MAX_S2C_USERS} users"),
                    );
                    round.api.push((reply, Err(e)));
                    return;
                }
                if let Err((code, why)) = self.check_body(&body) {
                    round.api.push((reply, Err(ApiError::new(code, why))));
                    return;
                }
                if request_id != 0 {
                    match self.stored_dedup(from, request_id).await {
                        Ok(Some(e)) => {
                            let a = Accepted {
                                msg_id: e.msg_id,
                                server_time_ms: e.server_time_ms,
                            };
                            round.api.push((reply, Ok(ApiOk::Accepted(a))));
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("s2c dedup of {from}: {e}");
                            let e = ApiError::new(ErrorCode::Unavailable, "store unavailable");
                            round.api.push((reply, Err(e)));
                            return;
                        }
                    }
                }
                let now = self.now;
                let msg = im_shared::proto::Message {
                    seq: Seq(0),
                    prev_seq: Seq(0),
                    msg_id: self.ids.next(now),
                    conv: CONV_S2C,
                    from,
                    to: if to.len() == 1 { to[0] } else { UserId(0) },
                    client_msg_id: request_id,
                    server_time_ms: now,
                    body,
                };
                let entry = DedupEntry {
                    msg_id: msg.msg_id,
                    seq: Seq(0),
                    prev_seq: Seq(0),
                    server_time_ms: now,
                };
                if request_id != 0 {
                    round.batch.push(Op::Dedup {
                        uid: from,
                        client_msg_id: request_id,
                        entry,
                    });
                }
                self.metrics.accepted(CONV_S2C);
                let shard = self.my_shard();
                self.fan_out(shard, &msg, to, round);
                let a = Accepted {
                    msg_id: msg.msg_id,
                    server_time_ms: now,
                };
                round.api.push((reply, Ok(ApiOk::Accepted(a))));
            }
            ApiReq::GroupCreate {
                owner,
                name,
                members,
                client_id,
                reply,
            } => self.on_group_create(owner, name, members, client_id, Reply::Api(reply), round),
            ApiReq::GroupsOf { uid, reply } => {
                self.on_my_groups(uid, Reply::Api(reply), round).await
            }
            ApiReq::DropPushToken { uid, device_id } => round.batch.push(Op::PushToken {
                uid,
                token: PushToken {
                    device_id,
                    provider: 0,
                    token: String::new(),
                },
            }),
            ApiReq::Org { change, reply } => self.on_org_change(change, reply, round).await,
        }
    }
}
