//! Machine-readable test vectors of the frames a client decodes (`docs/vectors/server-frames.json`):
//! each is a frame as the server encodes it (hex) and its fields as a client should read them,
//! written here by hand from PROTOCOL.md (not derived from the Rust decoder). The web codec's
//! tests decode every vector and compare (web/tests/vectors.test.mjs); a client in another
//! language can do the same.
//!
//! This test fails when the file differs from what the encoder produces now;
//! `IM_WRITE_VECTORS=1 cargo test -p im-shared --test vectors` writes it again.
//!
//! Field conventions of the file: `u64` as a decimal string (it does not fit a double), `u8`,
//! `u16`, `u32` as numbers, `bytes` and fixed byte arrays as lower-case hex, names as in
//! web/static/proto.js (camelCase).

use bytes::Bytes;
use im_shared::files::{FileKind, FileRef};
use im_shared::org::{self, OrgEntity, OrgRecord};
use im_shared::proto::{GroupDesc, Message, CONV_C2C, CONV_C2G};
use im_shared::{Command, ErrorCode, GroupId, MsgId, Seq, UserId};
use serde_json::{json, Value};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn message(seq: u64, prev: u64, conv: u8, body: Bytes) -> (Message, Value) {
    let m = Message {
        seq: Seq(seq),
        prev_seq: Seq(prev),
        msg_id: MsgId(7_405_000_000_000_000_000 + seq),
        conv,
        from: UserId(1001),
        to: UserId(1002),
        client_msg_id: 90 + seq,
        server_time_ms: 1_767_225_600_000 + seq,
        body: body.clone(),
    };
    let v = json!({
        "seq": seq.to_string(),
        "prevSeq": prev.to_string(),
        "msgId": (7_405_000_000_000_000_000u64 + seq).to_string(),
        "conv": conv,
        "from": "1001",
        "to": "1002",
        "clientMsgId": (90 + seq).to_string(),
        "serverTimeMs": (1_767_225_600_000u64 + seq).to_string(),
        "body": hex(&body),
    });
    (m, v)
}

/// `(name, req_id, command, fields)` of every vector.
fn vectors() -> Vec<(&'static str, u32, Command, Value)> {
    let file = FileRef {
        kind: FileKind::Image,
        sha256: [0x5a; 32],
        size: 48_213,
        key: [0x3c; 16],
        mime: "image/jpeg".into(),
        name: "beach.jpg".into(),
        width: 1280,
        height: 960,
        duration_ms: 0,
        thumb: Bytes::from_static(b"\xff\xd8tiny"),
    };
    let (text_msg, text_v) = message(5, 4, CONV_C2C, Bytes::from_static("héllo".as_bytes()));
    let (file_msg, file_v) = message(6, 5, CONV_C2C, file.to_body());
    let (g1, g1_v) = message(7, 6, CONV_C2G, Bytes::from_static(b"team"));
    let (g2, g2_v) = message(9, 7, CONV_C2G, Bytes::new());
    let (lg1, lg1_v) = message(3, 2, CONV_C2G, Bytes::from_static(b"all hands"));
    let (lg2, lg2_v) = message(4, 3, CONV_C2G, Bytes::from_static(b"q3"));
    vec![
        (
            "login accepted",
            1,
            Command::LoginResult {
                code: ErrorCode::Ok,
                server_time_ms: 1_767_225_600_000,
                max_seq: Seq(42),
                heartbeat_secs: 30,
                message: String::new(),
            },
            json!({"code": 0, "serverTimeMs": "1767225600000", "maxSeq": "42", "heartbeatSecs": 30, "message": ""}),
        ),
        (
            "login refused: bad token",
            1,
            Command::LoginResult {
                code: ErrorCode::BadToken,
                server_time_ms: 1_767_225_600_000,
                max_seq: Seq(0),
                heartbeat_secs: 0,
                message: "token signature is invalid".into(),
            },
            json!({"code": 10, "serverTimeMs": "1767225600000", "maxSeq": "0", "heartbeatSecs": 0, "message": "token signature is invalid"}),
        ),
        ("logout acknowledged", 9, Command::LogoutAck, json!({})),
        (
            "heartbeat answered",
            2,
            Command::HeartbeatAck {
                server_time_ms: 1_767_225_630_000,
            },
            json!({"serverTimeMs": "1767225630000"}),
        ),
        (
            "kicked out by a device of the same type",
            0,
            Command::Kickout {
                reason: 1,
                message: "logged in on another desktop".into(),
            },
            json!({"reason": 1, "message": "logged in on another desktop"}),
        ),
        (
            "a c2c message stored",
            3,
            Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id: 77,
                msg_id: MsgId(7_405_000_000_000_000_077),
                seq: Seq(43),
                server_time_ms: 1_767_225_601_000,
                prev_seq: Seq(42),
            },
            json!({"code": 0, "clientMsgId": "77", "msgId": "7405000000000000077", "seq": "43", "serverTimeMs": "1767225601000", "prevSeq": "42"}),
        ),
        (
            "a text message pushed",
            0,
            Command::Deliver(text_msg),
            json!({ "message": text_v }),
        ),
        (
            "a file message pushed (an image reference)",
            0,
            Command::Deliver(file_msg),
            json!({ "message": file_v }),
        ),
        (
            "a sync page of two group messages, more to come",
            4,
            Command::SyncPage {
                max_seq: Seq(12),
                has_more: true,
                messages: vec![g1, g2],
            },
            json!({"maxSeq": "12", "hasMore": true, "messages": [g1_v, g2_v]}),
        ),
        (
            "a recipient's device acknowledged",
            0,
            Command::Delivered {
                msg_id: MsgId(7_405_000_000_000_000_077),
                recipient: UserId(1002),
            },
            json!({"msgId": "7405000000000000077", "recipient": "1002"}),
        ),
        (
            "a group created",
            5,
            Command::OpResult {
                code: ErrorCode::Ok,
                id: 5_000_001,
                message: String::new(),
            },
            json!({"code": 0, "id": "5000001", "message": ""}),
        ),
        (
            "a group's members",
            6,
            Command::GroupInfoReply {
                group: GroupDesc {
                    group: GroupId(5_000_001),
                    name: "Ops".into(),
                    creator: UserId(1001),
                    owner: UserId(1001),
                    announcement: "on call: see wiki".into(),
                    created_ms: 1_767_225_000_000,
                },
                members: vec![(UserId(1001), 2), (UserId(1002), 1)],
            },
            json!({"group": "5000001", "name": "Ops", "creator": "1001", "owner": "1001",
                   "announcement": "on call: see wiki", "createdMs": "1767225000000",
                   "members": [{"uid": "1001", "role": 2}, {"uid": "1002", "role": 1}]}),
        ),
        (
            "the user's groups",
            7,
            Command::GroupList {
                groups: vec![(GroupId(5_000_001), "Ops".into()), (GroupId(5_000_002), "日本".into())],
            },
            json!({"groups": [{"group": "5000001", "name": "Ops"}, {"group": "5000002", "name": "日本"}]}),
        ),
        (
            "an organisation tree page: a department and a removed membership",
            8,
            Command::OrgPage {
                version: 12,
                next: 12,
                more: false,
                records: vec![
                    OrgRecord {
                        version: 11,
                        deleted: false,
                        entity: OrgEntity::Dept(org::OrgDept {
                            id: 3,
                            parent: 1,
                            order: 2,
                            hidden: true,
                            name: "Storage".into(),
                        }),
                    },
                    OrgRecord {
                        version: 12,
                        deleted: true,
                        entity: OrgEntity::Member(org::OrgMember {
                            uid: 9,
                            dept: 3,
                            order: 0,
                            title: String::new(),
                        }),
                    },
                ],
            },
            json!({"version": "12", "next": "12", "more": false, "records": [
                {"kind": "dept", "version": "11", "deleted": false, "id": "3", "parent": "1", "order": 2, "hidden": true, "name": "Storage"},
                {"kind": "member", "version": "12", "deleted": true, "uid": "9", "dept": "3", "order": 0, "title": ""}
            ]}),
        ),
        (
            "an organisation tree answer: a person",
            9,
            Command::OrgReply {
                version: 12,
                total: 1,
                records: vec![OrgRecord {
                    version: 5,
                    deleted: false,
                    entity: OrgEntity::Person(org::OrgPerson {
                        uid: 9,
                        name: "Zoë".into(),
                    }),
                }],
            },
            json!({"version": "12", "total": 1, "records": [
                {"kind": "person", "version": "5", "deleted": false, "uid": "9", "name": "Zoë"}
            ]}),
        ),
        (
            "the organisation tree changed",
            0,
            Command::OrgChanged { version: 13 },
            json!({"version": "13"}),
        ),
        (
            "an upload ticket",
            10,
            Command::FileTicket {
                url: "https://files.example.com/v1/files/uploads".into(),
                ticket: "1001.5a5a.48213.1767226500000.0f".into(),
                expires_ms: 1_767_226_500_000,
            },
            json!({"url": "https://files.example.com/v1/files/uploads",
                   "ticket": "1001.5a5a.48213.1767226500000.0f", "expiresMs": "1767226500000"}),
        ),
        (
            "a download URL",
            11,
            Command::FileUrl {
                url: "https://files.example.com/v1/files/5a5a?u=1002&e=1767229200000&m=image%2Fjpeg&s=ab".into(),
                expires_ms: 1_767_229_200_000,
            },
            json!({"url": "https://files.example.com/v1/files/5a5a?u=1002&e=1767229200000&m=image%2Fjpeg&s=ab",
                   "expiresMs": "1767229200000"}),
        ),
        (
            "a typing indicator in a group",
            0,
            Command::TypingNotice {
                conv: CONV_C2G,
                peer: 77,
                from: UserId(1001),
                state: 1,
                ttl_ms: 6000,
            },
            json!({"conv": 2, "peer": "77", "from": "1001", "state": 1, "ttlMs": 6000}),
        ),
        (
            "presence: one user online, one offline since a time",
            0,
            Command::PresenceNotice {
                entries: vec![
                    im_shared::proto::PresenceEntry {
                        uid: UserId(1001),
                        online: true,
                        last_seen_ms: 0,
                    },
                    im_shared::proto::PresenceEntry {
                        uid: UserId(1003),
                        online: false,
                        last_seen_ms: 1_767_225_000_000,
                    },
                ],
            },
            json!({"entries": [
                {"uid": "1001", "online": true, "lastSeenMs": "0"},
                {"uid": "1003", "online": false, "lastSeenMs": "1767225000000"}
            ]}),
        ),
        (
            "a large group's post pushed (the group timeline's seqs)",
            0,
            Command::GroupDeliver(lg1),
            json!({ "message": lg1_v }),
        ),
        (
            "a large group's head after a login",
            0,
            Command::GroupHeads {
                heads: vec![im_shared::proto::GroupHead {
                    group: GroupId(88),
                    head: Seq(4),
                    read: Seq(2),
                }],
            },
            json!({"heads": [{"group": "88", "head": "4", "read": "2"}]}),
        ),
        (
            "a page of a large group's timeline, the last",
            6,
            Command::GroupSyncPage {
                group: GroupId(88),
                head: Seq(4),
                has_more: false,
                messages: vec![lg2],
            },
            json!({"group": "88", "head": "4", "hasMore": false, "messages": [lg2_v]}),
        ),
        (
            "a page of a group's members, more to come",
            7,
            Command::GroupMembersPage {
                group: GroupId(88),
                total: 3001,
                more: true,
                members: vec![(UserId(1001), 2), (UserId(1002), 0)],
            },
            json!({"group": "88", "total": 3001, "more": true, "members": [
                {"uid": "1001", "role": 2}, {"uid": "1002", "role": 0}
            ]}),
        ),
        (
            "a request refused: over the message rate",
            12,
            Command::Error {
                code: ErrorCode::Overloaded,
                message: "over the message rate, retry later".into(),
            },
            json!({"code": 21, "message": "over the message rate, retry later"}),
        ),
    ]
}

fn render() -> String {
    let items: Vec<Value> = vectors()
        .into_iter()
        .map(|(name, req_id, cmd, fields)| {
            let frame = cmd.to_bytes(req_id);
            // Every vector decodes back to its command in Rust too.
            let decoded = Command::decode(&im_shared::Frame::new(
                cmd.cmd(),
                req_id,
                frame.slice(im_shared::HEADER_LEN..),
            ))
            .unwrap();
            assert_eq!(decoded, cmd, "{name}");
            json!({
                "name": name,
                "cmd": format!("{:?}", cmd.cmd()),
                "reqId": req_id,
                "hex": hex(&frame),
                "fields": fields,
            })
        })
        .collect();
    let doc = json!({
        "about": "Frames a protocol-v1 client decodes, as the server encodes them (hex), with their fields (docs/PROTOCOL.md). u64 fields are decimal strings; bytes are lower-case hex; names as in web/static/proto.js. Written by shared/tests/vectors.rs.",
        "vectors": items,
    });
    serde_json::to_string_pretty(&doc).unwrap() + "\n"
}

#[test]
fn the_vectors_file_is_what_the_encoder_produces() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/vectors/server-frames.json"
    );
    let now = render();
    if std::env::var("IM_WRITE_VECTORS").is_ok_and(|v| v == "1") {
        std::fs::write(path, &now).unwrap();
    }
    let file = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        file == now,
        "docs/vectors/server-frames.json is not what the encoder produces now: \
         IM_WRITE_VECTORS=1 cargo test -p im-shared --test vectors"
    );
}
