//! Payload encoding for a pool: CBOR of init data, jobs and updates (refused past the broker's
//! payload limit as soon as the encoding passes it), decoding of results, and running that CPU
//! work off the async runtime when it may take long.

use bytes::Bytes;
use serde::Serialize;

use crate::broker::{JobOutcome, JobResult};
use crate::error::PoolError;
use crate::worker::Worker;

/// CBOR of `value` (the pool's init data), with no size limit.
pub(super) fn to_cbor<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    ciborium::into_writer(value, &mut buf).map_err(|e| e.to_string())?;
    Ok(Bytes::from(buf))
}

/// A writer that refuses to grow past `limit` bytes.
struct Limited {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes offered in all, the refused ones included.
    offered: usize,
}

impl std::io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.offered = self.offered.saturating_add(data.len());
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other("over the payload limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// CBOR of `value` for a payload of at most `limit` bytes: a value over the limit is refused
/// as soon as its encoding passes it, not after all of it was encoded (`what` names it in a
/// codec error).
pub(super) fn to_payload<T: Serialize>(
    value: &T,
    limit: usize,
    what: &str,
) -> Result<Bytes, PoolError> {
    let mut out = Limited {
        buf: Vec::new(),
        limit,
        offered: 0,
    };
    match ciborium::into_writer(value, &mut out) {
        Ok(()) => Ok(Bytes::from(out.buf)),
        Err(_) if out.offered > limit => Err(PoolError::PayloadTooLarge {
            size: out.offered,
            limit,
        }),
        Err(e) => Err(PoolError::codec(what, e)),
    }
}

/// Outputs at least this big are decoded on a blocking thread (see [`off_runtime`]).
pub(super) const DECODE_OFF_RUNTIME: usize = 1 << 20;

/// Run CPU work that may take seconds (the CBOR of a big job, update or output) on a blocking
/// thread, so it never holds up the pool's keep-alive and result reader, nor the caller's
/// other tasks, on a small runtime. A panic in it (a user's `Serialize` impl) is resumed here.
///
/// # Errors
/// [`PoolError::Closed`] when the runtime is shutting down.
pub(super) async fn off_runtime<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, PoolError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => Ok(r),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(PoolError::Closed),
        },
    }
}

/// The `(index, output)` of a job's result, or its failure as [`PoolError::Job`].
pub(super) fn decode_result<W: Worker>(
    index: usize,
    result: JobResult,
) -> Result<(usize, W::Output), PoolError> {
    match result.outcome {
        JobOutcome::Done(bytes) => ciborium::from_reader::<W::Output, _>(&bytes[..])
            .map(|out| (index, out))
            .map_err(|e| PoolError::codec(&format!("output of job {index}"), e)),
        JobOutcome::Failed {
            kind,
            message,
            history,
        } => Err(PoolError::Job {
            index,
            kind,
            message,
            attempts: result.attempts,
            history,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::to_payload;
    use crate::PoolError;

    #[test]
    fn a_payload_over_the_limit_is_refused_before_it_is_all_encoded() {
        // 100 MB as an array of integers: about 200 MB of CBOR if it were all encoded.
        let big = vec![200u8; 100_000_000];
        match to_payload(&big, 1 << 20, "job 0") {
            Err(PoolError::PayloadTooLarge { size, limit }) => {
                assert_eq!(limit, 1 << 20);
                assert!(
                    size > limit && size < limit + (64 << 10),
                    "encoding went on to {size} bytes"
                );
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        let small = to_payload(&vec![1u8, 2, 3], 1 << 20, "job 1").expect("under the limit");
        assert_eq!(small.as_ref(), [0x83, 1, 2, 3]);
    }
}
