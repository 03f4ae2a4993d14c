//! Planning of a commit: the ops of a [`WriteBatch`](crate::WriteBatch) merged into one
//! [`Row`] per key, ordered by [`Phase`] and cut into logged batches (see
//! [`ScyllaStore::commit`](super::ScyllaStore#method.commit) for why that order).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use super::rows::{b, encode, id_floor_ms, ordered, timeline_bucket, Key, Row};
use crate::{Op, StoreError};

/// Default bound of the estimated size of one logged batch; larger [`WriteBatch`]es are split.
/// Half of Scylla's default `batch_size_fail_threshold_in_kb` (1024), as margin for the estimate.
///
/// [`WriteBatch`]: crate::WriteBatch
pub(super) const DEFAULT_MAX_BATCH_BYTES: usize = 512 * 1024;

/// Most statements in one logged batch (the protocol allows 65 535).
pub(super) const MAX_BATCH_STATEMENTS: usize = 4096;

/// The order of statements across the logged batches of one commit: a commit that stops between
/// two chunks leaves a prefix of this order durable, and every prefix is safe (see
/// [`ScyllaStore::commit`]).
///
/// [`ScyllaStore::commit`]: super::ScyllaStore#method.commit
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Phase {
    /// First: a msg-id time floor is durable no later than any row of the same commit (the
    /// messages whose ids it covers). Reserving early only skips id time.
    IdFloor,
    /// Reserving seqs early only skips seqs.
    SeqBound,
    /// A group's record before its members (members of a group without a record would be
    /// orphans) and before the events that announce it.
    GroupPut,
    /// Org records with the other records, early: before anything later in the batch that may
    /// announce them (group events, fan-outs, the dedup ack), and before [`Phase::OrgDelete`]
    /// of the version they replace, so that a commit stopped between chunks leaves the key with
    /// its new record, or both (the older one is superseded: readers apply records by version),
    /// never with none.
    OrgPut,
    /// The `uid → group` index is written before the membership row and removed after it, so
    /// that it always holds at least the memberships (an extra entry is visible as "not in
    /// `members`", a missing one would be invisible).
    UserGroupPut,
    /// The `uid → large group` index ([`Op::LargeMember`]) like the `uid → group` one, and
    /// before the timeline rows: it is set in the batch that appends the `BecameLarge` event to
    /// the user's timeline, so that event is never durable without it (the user's shard would
    /// not know to read the group's timeline, and the user would miss its posts); an entry
    /// without its event only makes the user read a group timeline early.
    UserLargeGroupPut,
    /// Memberships before the timeline entries and fan-outs that announce them (a group event
    /// never announces a change that is not durable).
    MemberPut,
    MemberDelete,
    UserGroupDelete,
    /// Removed after the membership row, like the `uid → group` index ([`Op::MemberDelete`]
    /// removes both; [`Op::LargeMember`] `on = false` this one alone).
    UserLargeGroupDelete,
    /// A bucket row without its timeline rows is an empty partition to readers.
    Bucket,
    /// Fan-out records before the sender's own timeline entries and dedup entries.
    OutboxPut,
    /// Timeline rows after their bucket rows (or readers would not find them).
    Timeline,
    /// Push watches of appended messages: written in the same round as the append, right after
    /// the timeline row (a watch never names a missing entry) and before its msg_id index row (a
    /// replayed append, which skips indexed messages, never skips one whose watch is missing).
    PushWatchPut,
    /// "Appended at seq" only once the timeline row is there (replays skip indexed messages).
    MsgIdx,
    /// The bucket rows of large groups' timelines, before their rows (as [`Phase::Bucket`]).
    GroupBucket,
    /// Posts of large groups ([`Op::GroupAppend`]): after the memberships they announce, and
    /// after the users' timeline rows and fan-outs of the same batch, so that the group's first
    /// post (the switch marker, which makes the group load as large: `group_head > 0`) is
    /// never durable before the `BecameLarge` events that tell its members to read the group's
    /// timeline (a stopped commit can leave members told while the group still loads as small,
    /// whose posts then still reach their timelines, never the reverse, where members would
    /// miss them); before the dedup entries, so a post is acknowledged only once durable, and
    /// the group's head (its next seq) covers every acknowledged post.
    GroupTimeline,
    Cursor,
    /// Read cursors of large groups, like the device cursors: independent of the rest.
    GroupRead,
    /// Mutes and push tokens depend on nothing else in a batch.
    MutePut,
    MuteDelete,
    /// Per-user settings ([`Op::UserFlag`]): like mutes, independent of the rest.
    FlagPut,
    FlagDelete,
    PushTokenPut,
    PushTokenDelete,
    /// Only ever deletes fan-outs confirmed by earlier commits.
    OutboxDelete,
    /// Clears watches whose push was decided (sent, or not needed since a device acknowledged
    /// the message, a cursor written earlier in the batch or before): with the other deletes,
    /// after everything else but the dedup entries. A watch left behind is only decided again.
    PushWatchDelete,
    /// The org record an [`Op::OrgPut`] replaces (another key: its own version): with the other
    /// deletes, after its replacement's [`Phase::OrgPut`] (see there), and before the dedup
    /// entries so that the ack vouches for the whole change. One left behind by a stopped commit
    /// is only a superseded record (a later commit of the same key does not delete it: it names
    /// the version it replaces, the newer one).
    OrgDelete,
    /// Last: "accepted, here is the ack" only once everything the ack vouches for is durable.
    Dedup,
}

/// Rows of a batch with one row per key: the later op on a key replaces the earlier one (in the
/// earlier one's place).
#[derive(Default)]
struct Merged {
    rows: Vec<Row>,
    at: HashMap<Key, usize>,
}

impl Merged {
    fn put(&mut self, row: Row) {
        match self.at.entry(row.key()) {
            Entry::Occupied(e) => self.rows[*e.get()] = row,
            Entry::Vacant(e) => {
                e.insert(self.rows.len());
                self.rows.push(row);
            }
        }
    }
}

/// Translates ops into rows, merged per key (the later op wins).
pub(super) fn merge(ops: Vec<Op>) -> Result<Vec<Row>, StoreError> {
    let mut m = Merged::default();
    for op in ops {
        match op {
            Op::IdFloor { generator, ms } => m.put(Row::IdFloor {
                generator: i32::from(generator),
                ms: id_floor_ms(ms)?,
            }),
            Op::SeqBound { uid, bound } => m.put(Row::SeqBound {
                uid: b(uid.0),
                bound: b(bound.0),
            }),
            // The unindexed copy is indexed here too (one more row in the same batch).
            Op::Append { uid, msg } | Op::AppendUnindexed { uid, msg } => {
                let seq = ordered("seq", msg.seq.0)?;
                let bucket = ordered("bucket", timeline_bucket(msg.seq.0))?;
                m.put(Row::Bucket {
                    uid: b(uid.0),
                    bucket,
                });
                m.put(Row::MsgIdx {
                    uid: b(uid.0),
                    msg_id: b(msg.msg_id.0),
                    seq,
                });
                m.put(Row::Timeline {
                    uid: b(uid.0),
                    bucket,
                    seq,
                    msg: encode(&msg),
                });
            }
            Op::Dedup {
                uid,
                client_msg_id,
                entry,
            } => m.put(Row::Dedup {
                uid: b(uid.0),
                client_msg_id: b(client_msg_id),
                msg_id: b(entry.msg_id.0),
                seq: b(entry.seq.0),
                server_time_ms: b(entry.server_time_ms),
                prev_seq: b(entry.prev_seq.0),
            }),
            Op::Cursor {
                uid,
                device_id,
                seq,
            } => m.put(Row::Cursor {
                uid: b(uid.0),
                device_id,
                seq: b(seq.0),
            }),
            Op::OutboxPut(e) => m.put(Row::OutboxPut {
                shard: i32::from(e.shard.0),
                msg_id: ordered("outbox msg_id", e.msg_id.0)?,
                recipients: e.recipients.iter().map(|r| b(r.0)).collect(),
                msg: encode(&e.msg),
            }),
            Op::OutboxDelete { shard, msg_id } => m.put(Row::OutboxDelete {
                shard: i32::from(shard.0),
                msg_id: ordered("outbox msg_id", msg_id.0)?,
            }),
            Op::GroupPut(g) => m.put(Row::GroupPut {
                gid: b(g.group.0),
                name: g.name,
                creator: b(g.creator.0),
                owner: b(g.owner.0),
                announcement: g.announcement,
                created_ms: b(g.created_ms),
            }),
            Op::MemberPut { group, member } => {
                m.put(Row::UserGroupPut {
                    uid: b(member.uid.0),
                    gid: b(group.0),
                });
                m.put(Row::MemberPut {
                    gid: b(group.0),
                    uid: b(member.uid.0),
                    role: i16::from(member.role),
                    joined_ms: b(member.joined_ms),
                });
            }
            Op::MemberDelete { group, uid } => {
                m.put(Row::UserGroupDelete {
                    uid: b(uid.0),
                    gid: b(group.0),
                });
                m.put(Row::MemberDelete {
                    gid: b(group.0),
                    uid: b(uid.0),
                });
                m.put(Row::UserLargeGroupDelete {
                    uid: b(uid.0),
                    gid: b(group.0),
                });
            }
            Op::LargeMember { group, uid, on } => {
                let (uid, gid) = (b(uid.0), b(group.0));
                m.put(if on {
                    Row::UserLargeGroupPut { uid, gid }
                } else {
                    Row::UserLargeGroupDelete { uid, gid }
                });
            }
            Op::GroupAppend { group, msg } => {
                let seq = ordered("group seq", msg.seq.0)?;
                let bucket = ordered("group bucket", timeline_bucket(msg.seq.0))?;
                m.put(Row::GroupBucket {
                    gid: b(group.0),
                    bucket,
                });
                m.put(Row::GroupTimeline {
                    gid: b(group.0),
                    bucket,
                    seq,
                    msg: encode(&msg),
                });
            }
            Op::GroupRead { uid, group, seq } => m.put(Row::GroupRead {
                uid: b(uid.0),
                gid: b(group.0),
                seq: b(seq.0),
            }),
            Op::UserFlag { uid, flag, on } => {
                let (uid, flag) = (b(uid.0), i16::from(flag));
                m.put(if on {
                    Row::FlagPut { uid, flag }
                } else {
                    Row::FlagDelete { uid, flag }
                });
            }
            Op::Mute { uid, peer, muted } => {
                let (uid, peer) = (b(uid.0), b(peer));
                m.put(if muted {
                    Row::MutePut { uid, peer }
                } else {
                    Row::MuteDelete { uid, peer }
                });
            }
            Op::PushToken { uid, token } => {
                let uid = b(uid.0);
                m.put(if token.token.is_empty() {
                    Row::PushTokenDelete {
                        uid,
                        device_id: token.device_id,
                    }
                } else {
                    Row::PushTokenPut {
                        uid,
                        device_id: token.device_id,
                        provider: i16::from(token.provider),
                        token: token.token,
                    }
                });
            }
            Op::PushWatch {
                shard,
                uid,
                seq,
                on,
            } => {
                let (shard, uid) = (i32::from(shard.0), b(uid.0));
                let seq = ordered("push watch seq", seq.0)?;
                m.put(if on {
                    Row::PushWatchPut { shard, uid, seq }
                } else {
                    Row::PushWatchDelete { shard, uid, seq }
                });
            }
            Op::OrgPut { record, replaces } => {
                let version = ordered("org version", record.version)?;
                // The replaced version first: if an earlier op of the batch replaced this very
                // version, the put (later) wins. A record never replaces itself.
                if let Some(old) = replaces.filter(|&v| v != record.version) {
                    m.put(Row::OrgDelete {
                        version: ordered("org version", old)?,
                    });
                }
                m.put(Row::OrgPut {
                    version,
                    record: record.to_bytes().to_vec(),
                });
            }
        }
    }
    Ok(m.rows)
}

/// Merges `ops` (the later op on a key wins), orders the rows by [`Phase`] (stable: op order
/// within a phase) and cuts them into chunks of at most `max_bytes` estimated bytes and
/// [`MAX_BATCH_STATEMENTS`] statements. A row larger than `max_bytes` gets a chunk of its own.
pub(super) fn plan(ops: Vec<Op>, max_bytes: usize) -> Result<Vec<Vec<Row>>, StoreError> {
    let mut rows = merge(ops)?;
    rows.sort_by_key(Row::phase);
    let mut chunks = Vec::new();
    let mut cur: Vec<Row> = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        let size = row.size();
        if !cur.is_empty()
            && (bytes.saturating_add(size) > max_bytes || cur.len() >= MAX_BATCH_STATEMENTS)
        {
            chunks.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        cur.push(row);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    Ok(chunks)
}
