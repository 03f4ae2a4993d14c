//! Offline push notifications (being written).
