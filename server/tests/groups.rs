//! Group chat (c2g) with write diffusion, group management and its refusals, multi-device,
//! recall and read receipts — over real sockets against a real server.

mod common;

use std::time::Duration;

use common::*;
use im_client::ClientError;
use im_client::Timeline;
use im_shared::proto::{
    GroupEvent, GroupEventKind, MarkerBody, Message, CONV_C2C, CONV_C2G, CONV_GROUP_EVENT,
    CONV_READ, CONV_RECALL, MAX_GROUP_MEMBERS, ROLE_ADMIN, ROLE_MEMBER, ROLE_OWNER,
};
use im_shared::{Command, DeviceType, ErrorCode, GroupId, MsgId, Seq, UserId};

/// Next delivered message of kind `conv` (acking everything on the way).
fn next_of(c: &mut im_client::Client, conv: u8) -> Message {
    loop {
        let m = next_deliver(c);
        c.deliver_ack(m.seq).unwrap();
        if m.conv == conv {
            return m;
        }
    }
}

fn code(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server refusal: {e}"))
}

#[test]
fn create_post_and_every_member_gets_it_in_one_order() {
    let s = start();
    let mut a = login(s.addr, 1001);
    let mut b = login(s.addr, 1002);
    let mut c = login(s.addr, 1003);
    let g = a
        .create_group("team", &[UserId(1002), UserId(1003)])
        .unwrap();
    assert_ne!(g.0, 0);
    // Everyone learns about the group from a "created" event.
    for cl in [&mut a, &mut b, &mut c] {
        let e = next_of(cl, CONV_GROUP_EVENT);
        assert_eq!(e.to.0, g.0);
        let ev = GroupEvent::decode(e.body).unwrap();
        assert_eq!(ev.kind, GroupEventKind::Created);
        assert_eq!(ev.users, vec![UserId(1001), UserId(1002), UserId(1003)]);
    }
    // Two members post concurrently-ish; all three see the same order.
    let ack1 = a.send_c2g(g, 1, "from a").unwrap();
    let ack2 = b.send_c2g(g, 1, "from b").unwrap();
    assert_eq!(
        ack1.seq,
        Seq(0),
        "a group ack carries no seq: the copy comes as Deliver"
    );
    let mut orders = Vec::new();
    for cl in [&mut a, &mut b, &mut c] {
        let m1 = next_of(cl, CONV_C2G);
        let m2 = next_of(cl, CONV_C2G);
        assert_eq!(m1.to.0, g.0);
        orders.push(vec![m1.msg_id, m2.msg_id]);
    }
    assert!(orders.iter().all(|o| o == &orders[0]), "{orders:?}");
    let mut ids = orders[0].clone();
    ids.sort();
    let mut want = vec![ack1.msg_id, ack2.msg_id];
    want.sort();
    assert_eq!(ids, want);
    // Group info and "my groups".
    let (desc, members) = c.group_info(g).unwrap();
    assert_eq!((desc.name.as_str(), desc.owner), ("team", UserId(1001)));
    assert_eq!(
        members,
        vec![
            (UserId(1001), ROLE_OWNER),
            (UserId(1002), ROLE_MEMBER),
            (UserId(1003), ROLE_MEMBER)
        ]
    );
    assert_eq!(b.my_groups().unwrap(), vec![(g, "team".to_owned())]);
}

#[test]
fn a_broadcast_channel_takes_posts_from_its_owner_only_until_it_is_opened_again() {
    let s = start();
    let mut owner = login(s.addr, 2101);
    let mut member = login(s.addr, 2102);
    let g = owner.create_group("news", &[UserId(2102)]).unwrap();
    // Only the owner may turn the group into a channel, and nothing changes for a refusal.
    assert_eq!(
        code(member.group_posting(g, true).unwrap_err()),
        ErrorCode::Forbidden
    );
    member.send_c2g(g, 1, "still open").unwrap();
    owner.group_posting(g, true).unwrap();
    assert_eq!(
        code(member.send_c2g(g, 2, "not allowed").unwrap_err()),
        ErrorCode::Forbidden
    );
    let news = owner.send_c2g(g, 1, "announcement").unwrap();
    // The member gets its own early post and the owner's, never the refused one.
    assert_eq!(next_of(&mut member, CONV_C2G).body, "still open".as_bytes());
    let m = next_of(&mut member, CONV_C2G);
    assert_eq!(
        (m.msg_id, &m.body[..]),
        (news.msg_id, "announcement".as_bytes())
    );
    // Opened again: the member posts with the client id of its refused post (a refusal is not
    // remembered as a send, so the id is taken as new).
    owner.group_posting(g, false).unwrap();
    member.send_c2g(g, 2, "open again").unwrap();
    assert_eq!(next_of(&mut owner, CONV_C2G).body, "still open".as_bytes());
    assert_eq!(
        next_of(&mut owner, CONV_C2G).body,
        "announcement".as_bytes()
    );
    assert_eq!(next_of(&mut owner, CONV_C2G).body, "open again".as_bytes());
    assert_eq!(
        code(member.group_posting(GroupId(987_654), true).unwrap_err()),
        ErrorCode::NotFound
    );
}

#[test]
fn an_admin_posts_in_a_channel_and_manages_members_and_only_the_owner_names_admins() {
    let s = start();
    let mut owner = login(s.addr, 2201);
    let mut admin = login(s.addr, 2202);
    let mut member = login(s.addr, 2203);
    let g = owner
        .create_group("ops", &[UserId(2202), UserId(2203)])
        .unwrap();
    assert_eq!(
        code(admin.group_role(g, UserId(2202), true).unwrap_err()),
        ErrorCode::Forbidden
    );
    owner.group_role(g, UserId(2202), true).unwrap();
    let (_, members) = member.group_info(g).unwrap();
    assert!(members.contains(&(UserId(2202), ROLE_ADMIN)), "{members:?}");
    // The member hears of it as a group event, after the group's creation.
    let created = GroupEvent::decode(next_of(&mut member, CONV_GROUP_EVENT).body).unwrap();
    assert_eq!(created.kind, GroupEventKind::Created);
    let e = GroupEvent::decode(next_of(&mut member, CONV_GROUP_EVENT).body).unwrap();
    assert_eq!(
        (e.kind, e.users),
        (GroupEventKind::AdminAdded, vec![UserId(2202)])
    );
    admin.group_posting(g, true).unwrap();
    admin.send_c2g(g, 1, "from the admin").unwrap();
    assert_eq!(
        code(member.send_c2g(g, 1, "from a member").unwrap_err()),
        ErrorCode::Forbidden
    );
    admin.group_add(g, &[UserId(2204)]).unwrap();
    assert_eq!(
        code(admin.group_remove(g, &[UserId(2201)]).unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(owner.group_role(g, UserId(2299), true).unwrap_err()),
        ErrorCode::NotMember
    );
    owner.group_role(g, UserId(2202), false).unwrap();
    assert_eq!(
        code(admin.send_c2g(g, 2, "no longer").unwrap_err()),
        ErrorCode::Forbidden
    );
}

#[test]
fn refusals_non_member_non_owner_unknown_group_and_limits() {
    // No group may grow past the creation limit here, so an add above it is refused (with the
    // defaults it would make the group large: see the large-group test below).
    let s = start_with(|cfg| cfg.max_group_members = MAX_GROUP_MEMBERS);
    let mut owner = login(s.addr, 2001);
    let mut member = login(s.addr, 2002);
    let mut outsider = login(s.addr, 2003);
    let g = owner.create_group("club", &[UserId(2002)]).unwrap();
    // A non-member can neither post nor read the member list; nothing reaches the members.
    assert_eq!(
        code(outsider.send_c2g(g, 1, "spam").unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(outsider.group_info(g).unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(outsider.group_leave(g).unwrap_err()),
        ErrorCode::NotMember
    );
    // Only the owner manages members.
    assert_eq!(
        code(member.group_add(g, &[UserId(2003)]).unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(member.group_remove(g, &[UserId(2001)]).unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(member.group_update(g, "mine", "").unwrap_err()),
        ErrorCode::Forbidden
    );
    // The owner can neither leave nor be removed.
    assert_eq!(
        code(owner.group_leave(g).unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(owner.group_remove(g, &[UserId(2001)]).unwrap_err()),
        ErrorCode::Forbidden
    );
    // Unknown group, group 0.
    assert_eq!(
        code(member.send_c2g(GroupId(12345), 2, "x").unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(member.send_c2g(GroupId(0), 3, "x").unwrap_err()),
        ErrorCode::InvalidArgument
    );
    // Too many members; duplicates and the owner itself do not count twice.
    let mut fits: Vec<UserId> = (1..MAX_GROUP_MEMBERS as u64)
        .map(|i| UserId(800_000 + i))
        .collect();
    fits.push(UserId(2001));
    fits.push(UserId(800_001));
    let big = owner.create_group("exactly full", &fits).unwrap();
    assert_eq!(owner.group_info(big).unwrap().1.len(), MAX_GROUP_MEMBERS);
    let many: Vec<UserId> = (0..MAX_GROUP_MEMBERS as u64)
        .map(|i| UserId(900_000 + i))
        .collect();
    assert_eq!(
        code(owner.create_group("huge", &many).unwrap_err()),
        ErrorCode::GroupFull
    );
    assert_eq!(
        code(owner.group_add(g, &many).unwrap_err()),
        ErrorCode::GroupFull
    );
    // The connection of everyone refused stays usable, and the members saw no spam.
    owner.send_c2g(g, 10, "still here").unwrap();
    let m = next_of(&mut member, CONV_C2G);
    assert_eq!(&m.body[..], b"still here");
    outsider.heartbeat().unwrap();
}

#[test]
fn membership_changes_and_removed_member_loses_access() {
    let s = start();
    let mut owner = login(s.addr, 3001);
    let mut m2 = login(s.addr, 3002);
    let g = owner.create_group("g", &[UserId(3002)]).unwrap();
    next_of(&mut m2, CONV_GROUP_EVENT);
    owner.group_add(g, &[UserId(3003)]).unwrap();
    let e = next_of(&mut m2, CONV_GROUP_EVENT);
    assert_eq!(
        GroupEvent::decode(e.body).unwrap(),
        GroupEvent {
            kind: GroupEventKind::MembersAdded,
            users: vec![UserId(3003)]
        }
    );
    // The new member was offline: it syncs the event and later posts.
    let mut m3 = login(s.addr, 3003);
    owner.send_c2g(g, 1, "welcome").unwrap();
    let mut tl = Timeline::new(Seq(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !tl.messages.iter().any(|m| m.conv == CONV_C2G) {
        assert!(std::time::Instant::now() < deadline, "welcome never synced");
        tl.sync(&mut m3).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tl.messages[0].conv, CONV_GROUP_EVENT);
    assert_eq!(
        &tl.messages
            .iter()
            .find(|m| m.conv == CONV_C2G)
            .unwrap()
            .body[..],
        b"welcome"
    );
    // Removal: the removed member learns it, then can no longer post or read.
    owner.group_remove(g, &[UserId(3002)]).unwrap();
    let e = next_of(&mut m2, CONV_GROUP_EVENT);
    assert_eq!(
        GroupEvent::decode(e.body).unwrap().kind,
        GroupEventKind::MembersRemoved
    );
    assert_eq!(
        code(m2.send_c2g(g, 5, "let me in").unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(code(m2.group_info(g).unwrap_err()), ErrorCode::NotMember);
    assert!(m2.my_groups().unwrap().is_empty());
    // Leave.
    m3.group_leave(g).unwrap();
    assert_eq!(
        code(m3.send_c2g(g, 6, "bye?").unwrap_err()),
        ErrorCode::NotMember
    );
    let (_, members) = owner.group_info(g).unwrap();
    assert_eq!(members, vec![(UserId(3001), ROLE_OWNER)]);
    // Update (owner): name and announcement.
    owner.group_update(g, "renamed", "read the rules").unwrap();
    let (d, _) = owner.group_info(g).unwrap();
    assert_eq!(
        (d.name.as_str(), d.announcement.as_str()),
        ("renamed", "read the rules")
    );
}

#[test]
fn group_post_retry_is_deduplicated() {
    let s = start();
    let mut a = login(s.addr, 4001);
    let mut b = login(s.addr, 4002);
    let g = a.create_group("d", &[UserId(4002)]).unwrap();
    next_of(&mut b, CONV_GROUP_EVENT);
    let first = a.send_c2g(g, 77, "once").unwrap();
    let again = a.send_c2g(g, 77, "once").unwrap();
    assert_eq!(first.msg_id, again.msg_id);
    let m = next_of(&mut b, CONV_C2G);
    assert_eq!(m.msg_id, first.msg_id);
    assert_no_deliver(&mut b, Duration::from_millis(500));
}

#[test]
fn every_device_of_a_member_gets_group_posts_and_own_posts() {
    let s = start();
    let (mut phone, _) = login_as(s.addr, 5001, DeviceType::Phone, "p");
    let (mut desk, _) = login_as(s.addr, 5001, DeviceType::Desktop, "d");
    let mut other = login(s.addr, 5002);
    let g = other.create_group("md", &[UserId(5001)]).unwrap();
    other.send_c2g(g, 1, "to both devices").unwrap();
    for d in [&mut phone, &mut desk] {
        assert_eq!(&next_of(d, CONV_C2G).body[..], b"to both devices");
    }
    // A post from the phone reaches the desktop too (roaming), with the same msg id.
    let ack = phone.send_c2g(g, 2, "from my phone").unwrap();
    let on_desk = next_of(&mut desk, CONV_C2G);
    assert_eq!((on_desk.msg_id, on_desk.from), (ack.msg_id, UserId(5001)));
    let on_phone = next_of(&mut phone, CONV_C2G);
    assert_eq!(on_phone.msg_id, ack.msg_id);
}

#[test]
fn recall_within_window_reaches_every_device_and_refusals() {
    let s = start_with(|c| c.recall_window_secs = 2);
    let mut a = login(s.addr, 6001);
    let (mut b_phone, _) = login_as(s.addr, 6002, DeviceType::Phone, "bp");
    let (mut b_desk, _) = login_as(s.addr, 6002, DeviceType::Desktop, "bd");
    let ack = a.send_c2c(UserId(6002), 1, "oops").unwrap();
    for d in [&mut b_phone, &mut b_desk] {
        next_of(d, CONV_C2C);
    }
    // Someone else's message cannot be recalled (it is in bob's timeline, but alice sent it);
    // nor one that does not exist.
    assert_eq!(
        code(b_phone.recall(CONV_C2C, 6001, ack.msg_id, 9).unwrap_err()),
        ErrorCode::RecallRefused,
    );
    let missing = MsgId(ack.msg_id.0 + (1 << 12));
    assert_eq!(
        code(b_phone.recall(CONV_C2C, 6001, missing, 10).unwrap_err()),
        ErrorCode::NotFound,
    );
    let bob_ack = b_phone.send_c2c(UserId(6001), 2, "mine").unwrap();
    // Wait until bob's message is in alice's timeline (the append follows bob's ack).
    assert_eq!(next_of(&mut a, CONV_C2C).msg_id, bob_ack.msg_id);
    assert_eq!(
        code(a.recall(CONV_C2C, 6002, bob_ack.msg_id, 3).unwrap_err()),
        ErrorCode::RecallRefused,
        "in alice's timeline but sent by bob"
    );
    assert_eq!(
        code(a.recall(7, 6002, ack.msg_id, 4).unwrap_err()),
        ErrorCode::InvalidArgument
    );
    // Recall in time: both of bob's devices learn it.
    a.recall(CONV_C2C, 6002, ack.msg_id, 5).unwrap();
    for d in [&mut b_phone, &mut b_desk] {
        let r = next_of(d, CONV_RECALL);
        assert_eq!(r.from, UserId(6001));
        assert_eq!(
            MarkerBody::decode(r.body).unwrap(),
            MarkerBody {
                conv: CONV_C2C,
                msg_id: ack.msg_id
            }
        );
    }
    // After the window: refused.
    let late = a
        .send_c2c(UserId(6002), 6, "too late to take back")
        .unwrap();
    std::thread::sleep(Duration::from_millis(2300));
    assert_eq!(
        code(a.recall(CONV_C2C, 6002, late.msg_id, 7).unwrap_err()),
        ErrorCode::RecallRefused
    );
    assert_eq!(
        code(a.recall(CONV_C2C, 6002, MsgId(1), 8).unwrap_err()),
        ErrorCode::RecallRefused,
        "an id older than the window"
    );
}

#[test]
fn group_recall_reaches_members() {
    let s = start();
    let mut a = login(s.addr, 6101);
    let mut b = login(s.addr, 6102);
    let g = a.create_group("r", &[UserId(6102)]).unwrap();
    let ack = a.send_c2g(g, 1, "wrong group").unwrap();
    let posted = next_of(&mut b, CONV_C2G);
    assert_eq!(posted.msg_id, ack.msg_id);
    // Own copy must have arrived in a's timeline before a can recall it.
    next_of(&mut a, CONV_C2G);
    assert_eq!(
        code(b.recall(CONV_C2G, g.0, ack.msg_id, 2).unwrap_err()),
        ErrorCode::RecallRefused,
        "b holds the post but did not send it"
    );
    a.recall(CONV_C2G, g.0, ack.msg_id, 3).unwrap();
    let r = next_of(&mut b, CONV_RECALL);
    assert_eq!(r.to.0, g.0);
    assert_eq!(MarkerBody::decode(r.body).unwrap().msg_id, ack.msg_id);
}

#[test]
fn read_receipts_reach_the_peer_and_own_devices() {
    let s = start();
    let mut a = login(s.addr, 7001);
    let (mut b_phone, _) = login_as(s.addr, 7002, DeviceType::Phone, "bp");
    let (mut b_desk, _) = login_as(s.addr, 7002, DeviceType::Desktop, "bd");
    let ack = a.send_c2c(UserId(7002), 1, "read me").unwrap();
    next_of(&mut b_phone, CONV_C2C);
    next_of(&mut b_desk, CONV_C2C);
    b_phone.read_report(CONV_C2C, 7001, ack.msg_id, 2).unwrap();
    let r = next_of(&mut a, CONV_READ);
    assert_eq!(r.from, UserId(7002));
    assert_eq!(MarkerBody::decode(r.body).unwrap().msg_id, ack.msg_id);
    // Bob's other device learns it was read (clears its unread badge).
    let mine = next_of(&mut b_desk, CONV_READ);
    assert_eq!(mine.from, UserId(7002));
    // Bad conversation kind.
    assert_eq!(
        code(b_phone.read_report(9, 7001, ack.msg_id, 3).unwrap_err()),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn offline_member_syncs_group_history_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let server = im_server::start(&cfg).unwrap();
    let addr = server.local_addr();
    let mut a = login(addr, 8001);
    let g = a.create_group("persist", &[UserId(8002)]).unwrap();
    for i in 0..20u64 {
        a.send_c2g(g, 100 + i, format!("m{i}")).unwrap();
    }
    drop(a);
    server.shutdown();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let server = im_server::start(&cfg).unwrap();
    let mut b = login(server.local_addr(), 8002);
    let mut tl = Timeline::new(Seq(0));
    tl.sync(&mut b).unwrap();
    let posts: Vec<_> = tl
        .messages
        .iter()
        .filter(|m| m.conv == CONV_C2G)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(posts, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The group survived the restart: members and posting work.
    let (_, members) = b.group_info(g).unwrap();
    assert_eq!(members.len(), 2);
    b.send_c2g(g, 1, "after restart").unwrap();
    server.shutdown();
}

/// Waits (up to 10 s) for the next push accepted by `want`, skipping others.
fn next_push<T>(c: &mut im_client::Client, mut want: impl FnMut(&Command) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match c.recv(Duration::from_millis(200)).unwrap() {
            Some(Command::Error { code, message }) => panic!("server error {code:?}: {message}"),
            Some(cmd) => {
                if let Some(t) = want(&cmd) {
                    return t;
                }
            }
            None => {}
        }
    }
    panic!("no such push within 10 s");
}

fn group_deliver(c: &mut im_client::Client) -> Message {
    next_push(c, |cmd| match cmd {
        Command::GroupDeliver(m) => Some(m.clone()),
        _ => None,
    })
}

#[test]
fn a_group_past_the_threshold_is_read_from_its_own_timeline() {
    let s = start_with(|cfg| cfg.large_group_threshold = 3);
    let mut a = login(s.addr, 1101);
    let mut b = login(s.addr, 1102);
    let mut d = login(s.addr, 1104);
    let g = a
        .create_group("company", &[UserId(1102), UserId(1103)])
        .unwrap();
    let small = a.send_c2g(g, 1, "small").unwrap();
    a.group_add(g, &[UserId(1104)]).unwrap();
    // Online members, the new one included, get the group's timeline live: the switch's
    // marker, then the posts.
    let post = b.send_c2g(g, 1, "large").unwrap();
    assert_eq!(
        (post.seq, post.prev_seq),
        (Seq(2), Seq(1)),
        "the ack places the post in the group's timeline"
    );
    for cl in [&mut a, &mut b, &mut d] {
        let got: Vec<u64> = (0..2).map(|_| group_deliver(cl).seq.0).collect();
        assert_eq!(got, vec![1, 2]);
    }
    // c was offline: its timeline has the small post then the marker; the group's head comes
    // after the login result, and the rest is read from the group's timeline.
    let mut c = connect(s.addr);
    c.login(UserId(1103), &token(1103), DeviceType::Phone, "c", Seq(0))
        .unwrap();
    let heads = next_push(&mut c, |cmd| match cmd {
        Command::GroupHeads { heads } => Some(heads.clone()),
        _ => None,
    });
    assert_eq!(heads.len(), 1);
    assert_eq!(
        (heads[0].group, heads[0].head, heads[0].read),
        (g, Seq(2), Seq(0))
    );
    let (mine, _, _) = c.sync_page(Seq(0), 100).unwrap();
    let in_group: Vec<&Message> = mine.iter().filter(|m| m.to.0 == g.0).collect();
    assert_eq!(in_group.iter().filter(|m| m.conv == CONV_C2G).count(), 1);
    assert!(in_group.iter().any(|m| m.msg_id == small.msg_id));
    let last = in_group.last().unwrap();
    assert_eq!(
        GroupEvent::decode(last.body.clone()).unwrap().kind,
        GroupEventKind::BecameLarge
    );
    let (posts, more, head) = c.group_sync(g, Seq(0), 0).unwrap();
    assert_eq!((posts.len(), more, head), (2, false, Seq(2)));
    assert_eq!(posts[1].msg_id, post.msg_id);
    assert_eq!(&posts[1].body[..], b"large");
    c.group_read(g, Seq(2)).unwrap();
    c.group_read(g, Seq(1)).unwrap();
    // The member list, paged.
    let page = c.group_members(g, UserId(0), 2).unwrap();
    assert_eq!((page.total, page.more), (4, true));
    assert_eq!(
        page.members,
        vec![(UserId(1101), ROLE_OWNER), (UserId(1102), ROLE_MEMBER)]
    );
    // A non-member can neither read the group nor page its members.
    let mut e = login(s.addr, 1105);
    assert_eq!(
        code(e.group_sync(g, Seq(0), 0).unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(e.group_members(g, UserId(0), 0).unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(e.group_read(g, Seq(1)).unwrap_err()),
        ErrorCode::NotMember
    );
    // A later login reports the read cursor.
    let mut c2 = connect(s.addr);
    c2.login(
        UserId(1103),
        &token(1103),
        DeviceType::Desktop,
        "c-pc",
        Seq(0),
    )
    .unwrap();
    let heads = next_push(&mut c2, |cmd| match cmd {
        Command::GroupHeads { heads } => Some(heads.clone()),
        _ => None,
    });
    assert_eq!(heads[0].read, Seq(2));
}

/// `@all` in a large group: the owner's post reaches every member's own timeline as a mention
/// entry, in chunks of 1 000 members (here three), the offline ones included; a plain member
/// may not, and a second one within the interval is refused (PROTOCOL.md "SendC2g").
#[test]
fn an_all_mention_in_a_large_group_reaches_every_member_chunk_after_chunk() {
    let s = start_with(|cfg| cfg.large_group_threshold = 3);
    let mut a = login(s.addr, 1201);
    let mut b = login(s.addr, 1202);
    let g = a.create_group("everyone", &[UserId(1202)]).unwrap();
    let offline: Vec<UserId> = (0..2_100).map(|i| UserId(20_000 + i)).collect();
    for part in offline.chunks(1_050) {
        a.group_add(g, part).unwrap();
    }
    let all = [UserId(0)];
    assert_eq!(
        code(b.send_c2g_mentioning(g, 1, "@all", &all).unwrap_err()),
        ErrorCode::Forbidden
    );
    let post = a.send_c2g_mentioning(g, 1, "@all standup", &all).unwrap();
    // An online member: the post live, and the mention in its own timeline.
    let m = next_of(&mut b, im_shared::proto::CONV_MENTION);
    assert_eq!((m.msg_id, m.from, m.to.0), (post.msg_id, UserId(1201), g.0));
    assert_eq!(&m.body[..], b"@all standup");
    let err = a.send_c2g_mentioning(g, 2, "@all again", &all).unwrap_err();
    assert_eq!(code(err), ErrorCode::Overloaded);
    // The last member in uid order is in the third chunk; offline, it finds the mention when it
    // syncs (once its chunk is through).
    let last = offline.last().unwrap().0;
    let mut c = login(s.addr, last);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let found = loop {
        let (page, _, _) = c.sync_page(Seq(0), 100).unwrap();
        let mentions: Vec<&Message> = page
            .iter()
            .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
            .collect();
        if !mentions.is_empty() {
            break mentions.iter().map(|m| m.msg_id).collect::<Vec<_>>();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no mention for {last} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(found, vec![post.msg_id], "exactly one, the post's");
}
