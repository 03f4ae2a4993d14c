//! The gate's WebSocket side as a browser's bytes reach it: the HTTP upgrade request parser and
//! handshake check, then the RFC 6455 frame decoder fed in arbitrary chunks.
#![no_main]

use bytes::BytesMut;
use im_gate::transport::{http, ws};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Handshake: parse a request head; a complete one goes through the upgrade checks.
    if let http::Parsed::Complete(len, req) = http::parse(data) {
        assert!(len <= data.len());
        let _ = ws::wants_upgrade(&req);
        let _ = ws::handshake(&req, &["https://example.com".to_owned()]);
    }
    // Frames: the first byte picks a chunk size so frames split at every kind of boundary.
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let chunk = (k as usize % 17) + 1;
    let mut d = ws::Decoder::new(4096);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    for piece in rest.chunks(chunk) {
        input.extend_from_slice(piece);
        match d.decode(&mut input, &mut out, |_| {}) {
            Ok(ws::Status::NeedMore) => {}
            Ok(ws::Status::Closed(_)) | Err(_) => return,
        }
        // A message never exceeds the decoder's limit (plus what one call may add).
        assert!(out.len() <= 4096 + rest.len());
        out.clear();
    }
});
