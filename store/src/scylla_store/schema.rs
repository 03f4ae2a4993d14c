//! The schema: `deploy/scylla/schema.cql`, compiled in and applied by
//! [`ScyllaStore::create_schema`](super::ScyllaStore::create_schema) with the keyspace and the
//! replication replaced, and the check of keyspace names.

use crate::StoreError;

/// The schema, applied by [`ScyllaStore::create_schema`] with the keyspace and replication
/// replaced.
///
/// [`ScyllaStore::create_schema`]: super::ScyllaStore::create_schema
pub(super) const SCHEMA_CQL: &str = include_str!("../../../deploy/scylla/schema.cql");

/// Keyspace of `deploy/scylla/schema.cql`.
const SCHEMA_KEYSPACE: &str = "im";

/// Checks that `ks` is a plain lowercase CQL identifier (it is spliced into statements).
pub(super) fn check_keyspace(ks: &str) -> Result<(), StoreError> {
    let ok = !ks.is_empty()
        && ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_lowercase())
        && ks
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Io(format!(
            "bad keyspace name {ks:?}: want [a-z][a-z0-9_]{{0,47}}"
        )))
    }
}

/// The statements of `deploy/scylla/schema.cql` for keyspace `ks` with `rf` replicas per
/// datacenter, whitespace normalised.
pub(super) fn schema_statements(ks: &str, rf: u32) -> Result<Vec<String>, StoreError> {
    check_keyspace(ks)?;
    if rf == 0 {
        return Err(StoreError::Io("replication factor 0".into()));
    }
    let bad = |why: String| StoreError::Io(format!("deploy/scylla/schema.cql: {why}"));
    let text: String = SCHEMA_CQL
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for stmt in text.split(';') {
        let stmt = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
        if stmt.is_empty() {
            continue;
        }
        let upper = stmt.to_ascii_uppercase();
        if upper.starts_with("CREATE KEYSPACE ") {
            if !out.is_empty() {
                return Err(bad("the keyspace statement must come first".into()));
            }
            let want = format!("CREATE KEYSPACE IF NOT EXISTS {SCHEMA_KEYSPACE} WITH");
            if !stmt.starts_with(&want) {
                return Err(bad(format!("keyspace statement does not start {want:?}")));
            }
            out.push(format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'NetworkTopologyStrategy', 'replication_factor': {rf}}} \
                 AND durable_writes = true"
            ));
        } else {
            let prefix = format!("CREATE TABLE IF NOT EXISTS {SCHEMA_KEYSPACE}.");
            let Some(rest) = stmt.strip_prefix(&prefix) else {
                return Err(bad(format!("unexpected statement {stmt:?}")));
            };
            if out.is_empty() {
                return Err(bad("the keyspace statement must come first".into()));
            }
            out.push(format!("CREATE TABLE IF NOT EXISTS {ks}.{rest}"));
        }
    }
    if out.is_empty() {
        return Err(bad("no statements".into()));
    }
    Ok(out)
}
