//! The agent's side of one worker process: spawning it isolated in its own process group, the
//! version handshake and `Init`, the frame protocol on its dedicated channel (jobs, updates,
//! replies), forwarding its stdout and stderr line by line, and telling how it died.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::NodeShared;
use crate::broker::{AttemptEnd, LeasedJob, SessionInfo, UpdateSeq, WorkerId};
use crate::protocol::{self, FrameError, FromWorker, PROTOCOL_NAME, PROTOCOL_VERSION, ToWorker};
use crate::util::lock;

/// Lines of a worker's output kept for crash reports.
const TAIL_LINES: usize = 20;

/// A frame from a worker as the agent takes it in.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A job's output, sliced out of the frame as read (64 MiB results are not copied again).
    Output { job_id: u64, payload: Bytes },
    /// Any other message (or a `Result` in a layout this crate does not write).
    Msg(FromWorker),
}

fn incoming(body: Vec<u8>) -> Result<Incoming, FrameError> {
    match protocol::split_result(&body) {
        Some((job_id, at)) => Ok(Incoming::Output {
            job_id,
            payload: Bytes::from(body).slice(at..),
        }),
        None => protocol::decode_body(&body).map(Incoming::Msg),
    }
}

/// Why a worker process could not be made ready.
pub(super) enum StartError {
    /// The program has no such kind (it lists those it has).
    UnknownKind(Vec<String>),
    /// It did not start, answer the handshake, or initialize: why.
    Init(String),
}

/// A worker's answer to a job.
pub(super) enum JobReply {
    /// The job's output.
    Output(Bytes),
    /// The job failed (`undecodable`: its payload could not be decoded).
    Failed { message: String, undecodable: bool },
}

/// The agent's side of one worker process.
pub(super) struct WorkerProc {
    child: tokio::process::Child,
    pub(super) pid: u32,
    label: String,
    writer: OwnedWriteHalf,
    pub(super) frames: mpsc::Receiver<Result<Incoming, FrameError>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Updates this worker refused, not yet reported to the pool.
    pub(super) update_errors: Vec<(UpdateSeq, String)>,
}

impl WorkerProc {
    pub(super) async fn start(
        shared: &NodeShared,
        info: &SessionInfo,
        slot: usize,
        worker_id: &WorkerId,
    ) -> Result<Self, StartError> {
        let cfg = &shared.config;
        let kind = &info.spec.kind;
        let command = cfg
            .command_for(kind)
            .ok_or_else(|| StartError::UnknownKind(cfg.known_kinds()))?;
        let slot_spec = cfg.slots.get(slot).cloned().unwrap_or_default();
        let mut env = slot_spec.env.clone();
        env.push(("DC_NODE_ID".into(), cfg.node_id.to_string()));
        env.push(("DC_WORKER_ID".into(), worker_id.to_string()));
        let spawned = dc_gpu::proc::spawn_isolated(dc_gpu::proc::SpawnSpec {
            program: command.program.clone(),
            args: command.args.clone(),
            env,
        })
        .await
        .map_err(|e| {
            StartError::Init(format!(
                "cannot start worker program {}: {e}",
                command.program.display()
            ))
        })?;
        let mut child = spawned.child;
        let label = worker_id.to_string();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, label.clone(), tail.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, label.clone(), tail.clone(), true));
        }
        let channel = spawned
            .channel
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(spawned.channel));
        let mut proc = match channel {
            Ok(stream) => {
                let (mut read, writer) = stream.into_split();
                let (tx, frames) = mpsc::channel(4);
                tokio::spawn(async move {
                    loop {
                        let frame = protocol::read_body(&mut read).await.and_then(incoming);
                        let end = frame.is_err();
                        if tx.send(frame).await.is_err() || end {
                            return;
                        }
                    }
                });
                WorkerProc {
                    pid: spawned.pid,
                    child,
                    label,
                    writer,
                    frames,
                    tail,
                    update_errors: Vec::new(),
                }
            }
            Err(e) => {
                dc_gpu::proc::signal_group(spawned.pid, nix_kill());
                return Err(StartError::Init(format!("protocol channel: {e}")));
            }
        };
        proc.handshake(shared, info, slot, worker_id).await?;
        Ok(proc)
    }

    async fn handshake(
        &mut self,
        shared: &NodeShared,
        info: &SessionInfo,
        slot: usize,
        worker_id: &WorkerId,
    ) -> Result<(), StartError> {
        let cfg = &shared.config;
        let hello = match tokio::time::timeout(cfg.hello_timeout, self.next()).await {
            Ok(r) => r,
            Err(_) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "worker process sent no handshake within {:?} (is it a distributed-computing worker program?)",
                    cfg.hello_timeout
                )));
            }
        };
        match hello {
            Ok(FromWorker::Hello {
                protocol, version, ..
            }) if protocol == PROTOCOL_NAME && version == PROTOCOL_VERSION => {}
            Ok(FromWorker::Hello {
                protocol, version, ..
            }) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "worker speaks {protocol} version {version}; this node speaks {PROTOCOL_NAME} version {PROTOCOL_VERSION}: rebuild the worker program against the same release"
                )));
            }
            Ok(other) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "expected the handshake, got {other:?}"
                )));
            }
            Err(end) => return Err(StartError::Init(end.to_string())),
        }
        let slot_spec = cfg.slots.get(slot).cloned().unwrap_or_default();
        let init = ToWorker::Init {
            kind: info.spec.kind.clone(),
            init: protocol::Payload::borrowed(&info.spec.init),
            node_id: cfg.node_id.to_string(),
            worker_id: worker_id.to_string(),
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            devices: slot_spec.devices,
        };
        if let Err(end) = self.send(&init).await {
            return Err(StartError::Init(end.to_string()));
        }
        match self.next().await {
            Ok(FromWorker::Ready) => Ok(()),
            Ok(FromWorker::InitError { message }) => {
                self.kill().await;
                Err(StartError::Init(message))
            }
            Ok(FromWorker::UnknownKind { known }) => {
                self.kill().await;
                Err(StartError::UnknownKind(known))
            }
            Ok(other) => {
                self.kill().await;
                Err(StartError::Init(format!("expected Ready, got {other:?}")))
            }
            Err(end) => Err(StartError::Init(end.to_string())),
        }
    }

    /// The next frame, or how the worker broke.
    async fn next(&mut self) -> Result<FromWorker, AttemptEnd> {
        Ok(match self.next_incoming().await? {
            Incoming::Msg(msg) => msg,
            Incoming::Output { job_id, payload } => FromWorker::Result {
                job_id,
                payload: payload.to_vec(),
            },
        })
    }

    /// The next frame, a job's output kept as the bytes read (no copy), or how the worker broke.
    async fn next_incoming(&mut self) -> Result<Incoming, AttemptEnd> {
        match self.frames.recv().await {
            Some(Ok(msg)) => Ok(msg),
            Some(Err(FrameError::Closed)) | None => Err(self.death().await),
            // A worker that dies with bytes unread (a job sent behind the one it ran) resets
            // the channel instead of closing it: a death all the same.
            Some(Err(FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Err(self.death().await)
            }
            Some(Err(e)) => {
                tracing::warn!(worker = %self.label, error = %e, "worker broke the frame protocol; killing it");
                self.kill().await;
                Err(AttemptEnd::Protocol(e.to_string()))
            }
        }
    }

    async fn send(&mut self, msg: &ToWorker<'_>) -> Result<(), AttemptEnd> {
        match protocol::write_frame(&mut self.writer, msg).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.death().await),
        }
    }

    /// The channel ended: wait briefly for the process to exit and say how it did.
    pub(super) async fn death(&mut self) -> AttemptEnd {
        let status = match tokio::time::timeout(Duration::from_secs(3), self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                // Closed its channel but lives on: it is of no use any more.
                self.kill().await;
                self.child.try_wait().ok().flatten()
            }
        };
        // Give the output forwarders a moment to drain the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let how = status
            .map(|s| dc_gpu::proc::describe_exit(&s))
            .unwrap_or_else(|| "closed its protocol channel".into());
        AttemptEnd::ProcessDied {
            how,
            last_lines: lock(&self.tail).iter().cloned().collect(),
        }
    }

    /// Send a job; a failure is the worker's death.
    pub(super) async fn send_job(&mut self, job: &LeasedJob) -> Result<(), AttemptEnd> {
        match self.write_job(job).await {
            Ok(()) => Ok(()),
            Err(FrameError::Io(_)) => Err(self.death().await),
            Err(e) => Err(AttemptEnd::Protocol(e.to_string())),
        }
    }

    /// Write a job's frame: its head, then the payload as it is (no copy into a frame buffer).
    pub(super) async fn write_job(&mut self, job: &LeasedJob) -> Result<(), FrameError> {
        use tokio::io::AsyncWriteExt;
        let msg = ToWorker::Job {
            job_id: job.lease.job.0,
            attempt: job.lease.attempt,
            payload: protocol::Payload::borrowed(&[]),
        };
        let head = protocol::encode_frame_head(&msg, job.payload.len())?;
        self.writer.write_all(&head).await?;
        self.writer.write_all(&job.payload).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The reply to job `id`, the oldest job sent and not yet answered.
    pub(super) async fn job_reply(&mut self, id: u64) -> Result<JobReply, AttemptEnd> {
        let msg = match self.next_incoming().await? {
            Incoming::Output { job_id, payload } if job_id == id => {
                return Ok(JobReply::Output(payload));
            }
            Incoming::Output { job_id, payload } => FromWorker::Result {
                job_id,
                payload: payload.to_vec(),
            },
            Incoming::Msg(msg) => msg,
        };
        match msg {
            FromWorker::Result { job_id, payload } if job_id == id => {
                Ok(JobReply::Output(Bytes::from(payload)))
            }
            FromWorker::JobError {
                job_id,
                message,
                undecodable,
            } if job_id == id => Ok(JobReply::Failed {
                message,
                undecodable,
            }),
            other => {
                self.kill().await;
                Err(AttemptEnd::Protocol(format!(
                    "expected the result of job {id}, got {}",
                    describe(&other)
                )))
            }
        }
    }

    pub(super) async fn apply_update(
        &mut self,
        seq: UpdateSeq,
        payload: &[u8],
    ) -> Result<(), AttemptEnd> {
        self.send(&ToWorker::Update {
            seq,
            payload: protocol::Payload::borrowed(payload),
        })
        .await?;
        match self.next().await? {
            FromWorker::UpdateApplied { seq: s } if s == seq => Ok(()),
            FromWorker::UpdateError { seq: s, message } if s == seq => {
                tracing::error!(worker = %self.label, seq, %message, "worker could not apply update");
                self.update_errors.push((seq, message));
                Ok(())
            }
            other => {
                self.kill().await;
                Err(AttemptEnd::Protocol(format!(
                    "expected the answer to update {seq}, got {}",
                    describe(&other)
                )))
            }
        }
    }

    pub(super) async fn kill(&mut self) {
        dc_gpu::proc::signal_group(self.pid, nix_kill());
        let _ = self.child.wait().await;
    }

    /// Ask the worker to exit; TERM then KILL its group if it does not.
    pub(super) async fn stop(mut self, grace: Duration) {
        let _ = protocol::write_frame(&mut self.writer, &ToWorker::Shutdown).await;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = dc_gpu::proc::stop_group(&mut self.child, grace).await;
        }
        // Grandchildren of a clean exit may linger in the group.
        dc_gpu::proc::signal_group(self.pid, nix_kill());
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        // Backstop for a cancelled task: never leave a worker (or its children) behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            dc_gpu::proc::signal_group(self.pid, nix_kill());
        }
    }
}

fn nix_kill() -> dc_gpu::proc::Signal {
    dc_gpu::proc::Signal::SIGKILL
}

pub(super) fn describe(msg: &FromWorker) -> String {
    match msg {
        FromWorker::Result { job_id, .. } => format!("a result for job {job_id}"),
        FromWorker::JobError { job_id, .. } => format!("an error for job {job_id}"),
        other => format!("{other:?}"),
    }
}

async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    label: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    is_stderr: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if is_stderr {
            eprintln!("[{label}] {line}");
        } else {
            println!("[{label}] {line}");
        }
        let mut tail = lock(&tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}
