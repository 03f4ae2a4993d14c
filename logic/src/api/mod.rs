//! HTTP server API of logic (being written).
