//! Feeds arbitrary bytes to the protocol v1 frame decoder as a client stream would arrive, then
//! decodes every complete frame's body with `Command::decode`, and a message body as the file
//! reference the server checks (`FileRef::from_body`). None may panic; whatever decodes must
//! re-encode to the same frame (or file reference).
#![no_main]

use bytes::BytesMut;
use im_shared::files::FileRef;
use im_shared::{Command, FrameCodec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit so the fuzzer also reaches the "too large" path cheaply.
    let codec = FrameCodec::new(4096);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if let Ok(cmd) = Command::decode(&frame) {
            // Re-encoding what decoded must decode to the same command (trailing bytes of the
            // original body are dropped, so compare commands, not bytes).
            let again = cmd.to_frame(frame.req_id);
            assert_eq!(again.cmd, frame.cmd);
            assert_eq!(Command::decode(&again).as_ref(), Ok(&cmd));
            if let Command::SendC2c { body, .. } | Command::SendC2g { body, .. } = &cmd {
                if let Ok(Some(f)) = FileRef::from_body(body) {
                    assert_eq!(FileRef::from_body(&f.to_body()), Ok(Some(f)));
                }
            }
        }
    }
});
