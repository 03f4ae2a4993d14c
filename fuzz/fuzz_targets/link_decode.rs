//! Feeds arbitrary bytes to both gate<->logic link decoders (`decode_up`, `decode_down`) as a link
//! stream would arrive. Neither may panic; whatever decodes must round-trip through the encoder.
#![no_main]

use bytes::BytesMut;
use im_shared::link::{decode_down, decode_up, encode_down, encode_up};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(up)) = decode_up(&mut buf) {
        let mut enc = BytesMut::new();
        encode_up(&up, &mut enc);
        assert_eq!(decode_up(&mut enc), Ok(Some(up)));
        assert!(enc.is_empty());
    }

    let mut buf = BytesMut::from(data);
    while let Ok(Some(down)) = decode_down(&mut buf) {
        let mut enc = BytesMut::new();
        encode_down(&down, &mut enc);
        assert_eq!(decode_down(&mut enc), Ok(Some(down)));
        assert!(enc.is_empty());
    }
});
