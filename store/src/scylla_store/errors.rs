//! Mapping of driver errors to [`StoreError`]: [`StoreError::Unavailable`] when a retry may
//! succeed, [`StoreError::Io`] otherwise.

use std::fmt;

use scylla::errors::{
    DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError,
    SchemaAgreementError,
};

use crate::StoreError;

/// Whether a failed attempt may succeed when retried (node down, overloaded, timed out, broken
/// connection) rather than being a bug or a schema problem.
fn attempt_retryable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::RateLimitReached { .. }
                | DbError::ServerError
                | DbError::TruncateError
        ),
        RequestAttemptError::UnableToAllocStreamId
        | RequestAttemptError::BrokenConnectionError(_) => true,
        _ => false,
    }
}

fn prepare_retryable(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_retryable(first_attempt),
        _ => false,
    }
}

fn classify(retryable: bool, msg: String) -> StoreError {
    if retryable {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Io(msg)
    }
}

/// Maps a driver error: [`StoreError::Unavailable`] when a retry may succeed (the client gets a
/// retryable error code), [`StoreError::Io`] otherwise.
///
/// A failed *write* has an unknown outcome: a timed-out logged batch is in the batchlog and will
/// be applied. Callers must not assume that nothing of a failed commit is durable.
pub(super) fn exec_err(what: &str, e: ExecutionError) -> StoreError {
    let retryable = match &e {
        ExecutionError::LastAttemptError(a) => attempt_retryable(a),
        ExecutionError::PrepareError(p) => prepare_retryable(p),
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        _ => false,
    };
    classify(retryable, format!("scylla {what}: {e}"))
}

pub(super) fn prepare_err(cql: &str, e: PrepareError) -> StoreError {
    classify(
        prepare_retryable(&e),
        format!("scylla prepare `{cql}`: {e}"),
    )
}

pub(super) fn session_err(e: NewSessionError) -> StoreError {
    let retryable = matches!(
        e,
        NewSessionError::FailedToResolveAnyHostname(_) | NewSessionError::MetadataError(_)
    );
    classify(retryable, format!("scylla connect: {e}"))
}

pub(super) fn agreement_err(e: SchemaAgreementError) -> StoreError {
    StoreError::Unavailable(format!("scylla schema agreement: {e}"))
}

pub(super) fn corrupt(key: String, why: impl fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key,
        why: why.to_string(),
    }
}
