//! The streams of `imap_unordered` (and so of `map`): each stream encodes its jobs off the
//! runtime on its first poll, routes and submits them, then yields results as the session's
//! result reader delivers them.
//!
//! Every job a stream submits gets a route before it is sent (so a result, or a resubmission
//! after the broker lost the session, always finds it); the stream ends after one delivery per
//! submitted job, or at the first abort. A stream dropped early removes the routes of the jobs
//! it still waits for; those jobs still run, and their results are dropped.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::broker::{JobId, JobOutcome, NewJob};
use crate::error::{BrokerError, PoolError};
use crate::util::lock;
use crate::worker::Worker;

use super::codec::{DECODE_OFF_RUNTIME, decode_result, off_runtime, to_payload};
use super::session::{Delivery, Route, SUBMIT_BATCH, Shared};

/// A stream of `(index, output)` for `jobs`, in the order results arrive; see
/// `Pool::imap_unordered`.
pub(super) fn imap_unordered<W: Worker>(
    shared: Arc<Shared>,
    jobs: Vec<W::Job>,
) -> BoxStream<'static, Result<(usize, W::Output), PoolError>>
where
    W::Output: Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Imap::<W> {
        shared,
        jobs: Some(jobs),
        tx: Some(tx),
        rx,
        ready: VecDeque::new(),
        remaining: 0,
        ids: Vec::new(),
        _worker: PhantomData,
    };
    futures::stream::unfold(state, |mut st| async move {
        if let Some(jobs) = st.jobs.take() {
            let limit = st.shared.broker.max_payload();
            let encode = move || -> Vec<Result<Bytes, PoolError>> {
                jobs.iter()
                    .enumerate()
                    .map(|(i, job)| to_payload(job, limit, &format!("job {i}")))
                    .collect()
            };
            match off_runtime(encode).await {
                Ok(prepared) => st.submit(prepared).await,
                Err(e) => st.ready.push_back(Err(e)),
            }
        }
        if let Some(item) = st.ready.pop_front() {
            return Some((item, st));
        }
        if st.remaining == 0 {
            return None;
        }
        let delivery = st.rx.recv().await?;
        st.remaining -= 1;
        let item = match delivery {
            Delivery::Result { index, result }
                if matches!(&result.outcome, JobOutcome::Done(b) if b.len() >= DECODE_OFF_RUNTIME) =>
            {
                off_runtime(move || decode_result::<W>(index, result))
                    .await
                    .unwrap_or_else(Err)
            }
            Delivery::Result { index, result } => decode_result::<W>(index, result),
            Delivery::Abort(err) => {
                st.remaining = 0;
                Err(err)
            }
        };
        Some((item, st))
    })
    .boxed()
}

/// The state of one `imap_unordered` stream.
struct Imap<W: Worker> {
    shared: Arc<Shared>,
    /// The jobs, until the stream's first poll encodes and submits them.
    jobs: Option<Vec<W::Job>>,
    tx: Option<mpsc::UnboundedSender<Delivery>>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    ready: VecDeque<Result<(usize, W::Output), PoolError>>,
    remaining: usize,
    /// Jobs this stream waits for; their routes go when it is dropped.
    ids: Vec<JobId>,
    _worker: PhantomData<fn(W) -> W>,
}

impl<W: Worker> Imap<W> {
    async fn submit(&mut self, prepared: Vec<Result<Bytes, PoolError>>) {
        let Some(tx) = self.tx.take() else { return };
        if self.shared.closed.load(Ordering::Acquire) {
            self.ready.push_back(Err(PoolError::Closed));
            return;
        }
        let limit = self.shared.broker.max_payload();
        let update_seq = self.shared.update_seq.load(Ordering::Acquire);
        let mut batch = Vec::new();
        for (index, payload) in prepared.into_iter().enumerate() {
            let payload = match payload {
                Ok(p) if p.len() > limit => {
                    self.ready.push_back(Err(PoolError::PayloadTooLarge {
                        size: p.len(),
                        limit,
                    }));
                    continue;
                }
                Ok(p) => p,
                Err(e) => {
                    self.ready.push_back(Err(e));
                    continue;
                }
            };
            let id = JobId(self.shared.next_job.fetch_add(1, Ordering::Relaxed));
            self.shared.routes().insert(
                id,
                Route {
                    index,
                    tx: tx.clone(),
                    payload: payload.clone(),
                    update_seq,
                },
            );
            self.ids.push(id);
            batch.push(NewJob {
                id,
                payload,
                update_seq,
            });
        }
        let total = batch.len();
        self.remaining = total;
        // While this runs, the lost-job check leaves the pool alone (these jobs are routed but
        // not all in the broker yet); its quiet time counts from the end of the submission.
        struct Submitting<'s>(&'s Shared);
        impl Drop for Submitting<'_> {
            fn drop(&mut self) {
                *lock(&self.0.last_result) = tokio::time::Instant::now();
                self.0.submitting.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.shared.submitting.fetch_add(1, Ordering::AcqRel);
        let _submitting = Submitting(&self.shared);
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(SUBMIT_BATCH));
            let session = self.shared.id();
            match self.shared.broker.submit(&session, batch).await {
                Ok(()) => {}
                // The jobs are routed: recovery resubmits every routed job, these included.
                Err(BrokerError::SessionGone(_)) => self.shared.recover(&session).await,
                Err(e) => {
                    self.ready.push_back(Err(e.into()));
                    self.remaining = 0;
                    return;
                }
            }
            batch = rest;
        }
    }
}

impl<W: Worker> Drop for Imap<W> {
    fn drop(&mut self) {
        if self.remaining == 0 || self.ids.is_empty() {
            return;
        }
        let mut routes = self.shared.routes();
        for id in &self.ids {
            routes.remove(id);
        }
    }
}
