//! One-to-one chat: online delivery with acks, offline sync in pages, retries, roaming.

mod common;

use std::time::Duration;

use common::*;
use im_client::{Offer, Timeline};
use im_shared::{Command, DeviceType, ErrorCode, Seq, UserId};

#[test]
fn online_c2c_ack_delivery_and_delivered_notice() {
    let s = start();
    let mut alice = login(s.addr, 100);
    let mut bob = login(s.addr, 200);
    let ack = alice.send_c2c(UserId(200), 1, "hello bob").unwrap();
    assert!(ack.seq > Seq(0));
    let m = next_deliver(&mut bob);
    assert_eq!(&m.body[..], b"hello bob");
    assert_eq!(
        (m.from, m.to, m.msg_id),
        (UserId(100), UserId(200), ack.msg_id)
    );
    assert_eq!(m.prev_seq, Seq(0));
    // Bob's device acks: alice learns the message was delivered.
    bob.deliver_ack(m.seq).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(std::time::Instant::now() < deadline, "no delivered notice");
        if let Some(Command::Delivered { msg_id, recipient }) =
            alice.recv(Duration::from_millis(200)).unwrap()
        {
            assert_eq!((msg_id, recipient), (ack.msg_id, UserId(200)));
            break;
        }
    }
    // A reply travels the other way, and seqs keep increasing per timeline.
    let ack2 = bob.send_c2c(UserId(100), 1, "hi alice").unwrap();
    assert!(ack2.seq > m.seq);
    let r = next_deliver(&mut alice);
    assert_eq!(&r.body[..], b"hi alice");
    assert_eq!(
        r.prev_seq, ack.seq,
        "alice's own sent message is in her timeline"
    );
    // The sending device places its own message from the ack, then the reply follows it: no gap.
    let mut tl = Timeline::new(Seq(0));
    assert_eq!(
        tl.on_sent(&ack, UserId(100), UserId(200), "hello bob".into()),
        Offer::Accepted
    );
    assert_eq!(tl.offer(&r), Offer::Accepted);
    assert_eq!(ack.prev_seq, Seq(0));
    assert_eq!(
        ack2.prev_seq, m.seq,
        "bob's reply follows the message he received"
    );
}

#[test]
fn messages_keep_order_and_ids_increase() {
    let s = start();
    let mut a = login(s.addr, 101);
    let mut b = login(s.addr, 201);
    let mut last_id = 0;
    for i in 0..200u64 {
        let ack = a.send_c2c(UserId(201), i + 1, format!("m{i}")).unwrap();
        assert!(ack.msg_id.0 > last_id);
        last_id = ack.msg_id.0;
    }
    let mut tl = Timeline::new(Seq(0));
    while tl.messages.len() < 200 {
        let m = next_deliver(&mut b);
        tl.on_deliver(&mut b, &m).unwrap();
    }
    for (i, m) in tl.messages.iter().enumerate() {
        assert_eq!(m.body, format!("m{i}").as_bytes());
    }
}

#[test]
fn offline_messages_sync_in_pages() {
    let s = start();
    let mut a = login(s.addr, 102);
    for i in 0..450u64 {
        a.send_c2c(UserId(202), i + 1, format!("off{i}")).unwrap();
    }
    let (mut b, info) = login_as(s.addr, 202, DeviceType::Phone, "b-phone");
    assert!(info.max_seq > Seq(0));
    let mut pages = 0;
    let mut got = Vec::new();
    let mut after = Seq(0);
    loop {
        let (msgs, more, max_seq) = b.sync_page(after, 200).unwrap();
        assert_eq!(max_seq, info.max_seq);
        pages += 1;
        after = msgs.last().map_or(after, |m| m.seq);
        got.extend(msgs);
        if !more {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(got.len(), 450);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.body, format!("off{i}").as_bytes());
        if i > 0 {
            assert_eq!(m.prev_seq, got[i - 1].seq);
        }
    }
    assert_eq!(after, info.max_seq);
    // A second device syncing from a middle seq gets only the rest.
    let (mut b2, _) = login_as(s.addr, 202, DeviceType::Desktop, "b-pc");
    let (rest, _, _) = b2.sync_page(got[399].seq, 200).unwrap();
    assert_eq!(rest.len(), 50);
}

#[test]
fn retry_with_same_client_msg_id_gives_one_message() {
    let s = start();
    let mut a = login(s.addr, 103);
    let mut b = login(s.addr, 203);
    let first = a.send_c2c(UserId(203), 77, "once").unwrap();
    let again = a.send_c2c(UserId(203), 77, "once").unwrap();
    assert_eq!(first, again);
    // Also across a reconnect of the sender (dedup is on the server, not the connection).
    drop(a);
    let mut a = login(s.addr, 103);
    assert_eq!(a.send_c2c(UserId(203), 77, "once").unwrap(), first);
    let m = next_deliver(&mut b);
    assert_eq!(m.msg_id, first.msg_id);
    assert_no_deliver(&mut b, Duration::from_millis(500));
    let (all, _, _) = b.sync_page(Seq(0), 100).unwrap();
    assert_eq!(all.len(), 1);
}

#[test]
fn sender_devices_roam_their_own_messages() {
    let s = start();
    let (mut phone, _) = login_as(s.addr, 104, DeviceType::Phone, "p");
    let (mut pc, _) = login_as(s.addr, 104, DeviceType::Desktop, "d");
    let _bob = login(s.addr, 204);
    let ack = phone.send_c2c(UserId(204), 1, "from phone").unwrap();
    let m = next_deliver(&mut pc);
    assert_eq!(
        (m.msg_id, m.seq, m.from),
        (ack.msg_id, ack.seq, UserId(104))
    );
    assert_no_deliver(&mut phone, Duration::from_millis(300));
}

#[test]
fn message_to_self_is_stored_once() {
    let s = start();
    let (mut phone, _) = login_as(s.addr, 105, DeviceType::Phone, "p");
    let (mut pc, _) = login_as(s.addr, 105, DeviceType::Desktop, "d");
    let ack = phone.send_c2c(UserId(105), 1, "note to self").unwrap();
    assert_eq!(next_deliver(&mut pc).msg_id, ack.msg_id);
    let (all, _, _) = pc.sync_page(Seq(0), 10).unwrap();
    assert_eq!(all.len(), 1);
}

#[test]
fn recipient_zero_is_refused_and_connection_stays() {
    let s = start();
    let mut a = login(s.addr, 106);
    let err = a.send_c2c(UserId(0), 1, "nobody").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    assert!(a.heartbeat().is_ok());
}

#[test]
fn gap_in_push_is_filled_by_sync() {
    let s = start();
    let mut a = login(s.addr, 107);
    let mut b = login(s.addr, 207);
    a.send_c2c(UserId(207), 1, "one").unwrap();
    a.send_c2c(UserId(207), 2, "two").unwrap();
    let first = next_deliver(&mut b);
    let second = next_deliver(&mut b);
    // The device "lost" the first push: the second one reveals the gap and sync fills it.
    let mut tl = Timeline::new(Seq(0));
    assert_eq!(tl.on_deliver(&mut b, &second).unwrap(), 2);
    assert_eq!(tl.messages[0].msg_id, first.msg_id);
    // The late first push is recognised as a duplicate.
    assert_eq!(tl.on_deliver(&mut b, &first).unwrap(), 0);
}

/// `thread_per_core = false`: every logic worker on a thread of its own (the placement of a
/// node whose gate cores and workers differ in number). The same chat works: ack, delivery to
/// users on both workers, the delivered notice.
#[test]
fn c2c_works_with_a_thread_per_logic_worker() {
    let s = start_with(|c| c.thread_per_core = false);
    // Users 100..108 land on both workers and both cores.
    let mut clients: Vec<_> = (100..108).map(|u| login(s.addr, u)).collect();
    for i in 0..clients.len() {
        let to = 100 + ((i as u64 + 3) % 8);
        let ack = clients[i]
            .send_c2c(UserId(to), 1, format!("from {}", 100 + i))
            .unwrap();
        let m = next_deliver(&mut clients[(to - 100) as usize]);
        assert_eq!((m.from, m.msg_id), (UserId(100 + i as u64), ack.msg_id));
        clients[(to - 100) as usize].deliver_ack(m.seq).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(std::time::Instant::now() < deadline, "no delivered notice");
            if let Some(Command::Delivered { msg_id, .. }) =
                clients[i].recv(Duration::from_millis(200)).unwrap()
            {
                assert_eq!(msg_id, ack.msg_id);
                break;
            }
        }
    }
}
