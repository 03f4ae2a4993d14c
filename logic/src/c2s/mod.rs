//! c2s: client reports queued durably for business servers (being written).
