//! Read receipts: a reader marks a conversation read up to a message; the other side gets a
//! read marker.

use im_shared::proto::{MarkerBody, CONV_C2C, CONV_C2G, CONV_READ};
use im_shared::{ConnId, ErrorCode, MsgId, UserId};

use super::{error_frame, Round, Worker};
use crate::store::Store;

impl<S: Store> Worker<S> {
    /// A read receipt: to the peer and the reader's devices (c2c), or the reader's devices only
    /// (c2g: a receipt per member would cost a timeline entry per member per read).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_read(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        round: &mut Round,
    ) {
        if conv != CONV_C2C && conv != CONV_C2G {
            round.send(
                conn,
                error_frame(
                    ErrorCode::InvalidArgument,
                    req_id,
                    "read: conv must be c2c or c2g",
                ),
            );
            return;
        }
        let body = MarkerBody { conv, msg_id }.to_bytes();
        self.accept_direct(
            conn,
            uid,
            req_id,
            client_msg_id,
            CONV_READ,
            UserId(peer),
            body,
            conv == CONV_C2C,
            round,
        )
        .await
    }
}
