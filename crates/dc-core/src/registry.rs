//! [`Registry`]: the worker kinds a binary can run, and the worker-process side of the protocol.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufReader, BufWriter};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use crate::protocol::{
    self, FrameError, FromWorker, PROTOCOL_NAME, PROTOCOL_VERSION, ToWorker, WORKER_SUBCOMMAND,
};
use crate::worker::{Worker, WorkerContext};

/// Kinds registered by the `serve_if_worker` call of this process (read by `local()` pools).
static LOCAL_KINDS: OnceLock<Vec<String>> = OnceLock::new();

/// The kinds this process registered through [`Registry::serve_if_worker`], if it did.
pub(crate) fn local_kinds() -> Option<&'static [String]> {
    LOCAL_KINDS.get().map(Vec::as_slice)
}

/// The worker kinds a node binary can run.
///
/// # Examples
/// ```
/// use dc_core::{BoxError, Registry, Worker, WorkerContext};
///
/// struct Echo;
/// impl Worker for Echo {
///     const KIND: &'static str = "echo";
///     type Init = ();
///     type Job = String;
///     type Output = String;
///     type Update = ();
///     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Echo) }
///     fn run(&mut self, job: String) -> Result<String, BoxError> { Ok(job) }
/// }
///
/// let registry = Registry::new().register::<Echo>();
/// assert_eq!(registry.kinds(), vec!["echo".to_string()]);
/// ```
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn KindEntry>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a worker type under its `KIND`.
    ///
    /// # Panics
    /// When another type already registered the same `KIND`: two types under one name would
    /// make jobs land on the wrong code.
    #[must_use]
    pub fn register<W: Worker>(mut self) -> Self {
        let previous = self
            .kinds
            .insert(W::KIND, Box::new(Kind::<W>(Default::default())));
        assert!(
            previous.is_none(),
            "worker kind {:?} registered twice",
            W::KIND
        );
        self
    }

    /// The kinds this process registered through [`Registry::serve_if_worker`], if it did:
    /// what a node started from this executable can run.
    pub fn served_kinds() -> Option<Vec<String>> {
        local_kinds().map(<[String]>::to_vec)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.kinds.keys().map(|k| k.to_string()).collect()
    }

    /// Call first thing in `main`: when this process was spawned as a worker process, serve
    /// and exit; otherwise return (and remember the kinds, for `local()` pools).
    ///
    /// # Examples
    /// ```no_run
    /// # use dc_core::Registry;
    /// fn main() {
    ///     Registry::new() /* .register::<MyWorker>() */ .serve_if_worker();
    ///     // ... the program: open a local pool, run jobs.
    /// }
    /// ```
    pub fn serve_if_worker(&self) {
        let _ = LOCAL_KINDS.set(self.kinds());
        if std::env::args_os().nth(1).as_deref() != Some(WORKER_SUBCOMMAND.as_ref()) {
            return;
        }
        std::process::exit(self.serve_worker_process());
    }

    /// Serve the worker protocol on the inherited channel until shutdown; returns the exit code.
    pub fn serve_worker_process(&self) -> i32 {
        let Some(channel) = dc_gpu::proc::take_inherited_channel() else {
            eprintln!(
                "{WORKER_SUBCOMMAND}: no protocol channel on fd {} ({} unset): worker processes are started by a node, not by hand",
                dc_gpu::proc::CHANNEL_FD,
                dc_gpu::proc::CHANNEL_FD_ENV
            );
            return 2;
        };
        let Ok(write_half) = channel.try_clone() else {
            eprintln!("{WORKER_SUBCOMMAND}: cannot duplicate the protocol channel");
            return 2;
        };
        let mut reader = BufReader::new(channel);
        let mut writer = BufWriter::new(write_half);
        match self.serve(&mut reader, &mut writer) {
            Ok(code) => code,
            Err(FrameError::Closed) => 0,
            Err(e) => {
                eprintln!("{WORKER_SUBCOMMAND}: protocol channel failed: {e}");
                3
            }
        }
    }

    fn serve(
        &self,
        reader: &mut impl std::io::Read,
        writer: &mut impl std::io::Write,
    ) -> Result<i32, FrameError> {
        protocol::write_frame_blocking(
            writer,
            &FromWorker::Hello {
                protocol: PROTOCOL_NAME.into(),
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                kinds: self.kinds(),
            },
        )?;
        let mut worker = match protocol::read_frame_blocking::<ToWorker<'static>>(reader)? {
            ToWorker::Init {
                kind,
                init,
                node_id,
                worker_id,
                slot,
                devices,
            } => {
                let Some(entry) = self.kinds.get(kind.as_str()) else {
                    let known = self.kinds();
                    protocol::write_frame_blocking(writer, &FromWorker::UnknownKind { known })?;
                    return Ok(4);
                };
                let ctx = WorkerContext::new(node_id, worker_id, slot as usize, devices);
                match guarded(|| entry.build(&init, &ctx)) {
                    Ok(worker) => {
                        protocol::write_frame_blocking(writer, &FromWorker::Ready)?;
                        worker
                    }
                    Err(message) => {
                        protocol::write_frame_blocking(writer, &FromWorker::InitError { message })?;
                        return Ok(5);
                    }
                }
            }
            ToWorker::Shutdown => return Ok(0),
            other => {
                return Err(FrameError::Decode(format!(
                    "expected Init first, got {}",
                    variant_name(&other)
                )));
            }
        };
        loop {
            let body = protocol::read_body_blocking(reader)?;
            // A job runs on its payload where it lies in the frame (no copy of a 64 MiB input).
            if let Some((job_id, _, at)) = protocol::split_job(&body) {
                run_job(worker.as_mut(), writer, job_id, &body[at..])?;
                continue;
            }
            match protocol::decode_body::<ToWorker<'static>>(&body)? {
                ToWorker::Job {
                    job_id, payload, ..
                } => run_job(worker.as_mut(), writer, job_id, &payload)?,
                ToWorker::Update { seq, payload } => {
                    let reply = match guarded(|| worker.update(&payload)) {
                        Ok(()) => FromWorker::UpdateApplied { seq },
                        Err(message) => FromWorker::UpdateError { seq, message },
                    };
                    protocol::write_frame_blocking(writer, &reply)?;
                }
                ToWorker::Shutdown => return Ok(0),
                ToWorker::Init { .. } => {
                    return Err(FrameError::Decode("Init sent twice".into()));
                }
            }
        }
    }
}

/// Run one job and answer it: an output goes as a frame head followed by the output itself (no
/// copy into a frame buffer); an error or a panic as a `JobError` (a panic is the job's failure,
/// like an exception in Python: the worker stays up for the next job).
fn run_job(
    worker: &mut dyn ErasedWorker,
    writer: &mut impl std::io::Write,
    job_id: u64,
    payload: &[u8],
) -> Result<(), FrameError> {
    let reply = match catch_unwind(AssertUnwindSafe(|| worker.run(payload))) {
        Ok(Ok(output)) => {
            let head = protocol::encode_frame_head(
                &FromWorker::Result {
                    job_id,
                    payload: Vec::new(),
                },
                output.len(),
            )?;
            writer.write_all(&head)?;
            writer.write_all(&output)?;
            writer.flush()?;
            return Ok(());
        }
        Ok(Err(JobFail {
            message,
            undecodable,
        })) => FromWorker::JobError {
            job_id,
            message,
            undecodable,
        },
        Err(panic) => FromWorker::JobError {
            job_id,
            message: format!("worker panicked: {}", panic_message(&panic)),
            undecodable: false,
        },
    };
    protocol::write_frame_blocking(writer, &reply)
}

fn variant_name(msg: &ToWorker<'_>) -> &'static str {
    match msg {
        ToWorker::Init { .. } => "Init",
        ToWorker::Job { .. } => "Job",
        ToWorker::Update { .. } => "Update",
        ToWorker::Shutdown => "Shutdown",
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// Run user code, turning a panic into an error message.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&panic))))
}

struct JobFail {
    message: String,
    undecodable: bool,
}

trait KindEntry: Send + Sync {
    fn build(&self, init: &[u8], ctx: &WorkerContext) -> Result<Box<dyn ErasedWorker>, String>;
}

trait ErasedWorker {
    fn run(&mut self, payload: &[u8]) -> Result<Vec<u8>, JobFail>;
    fn update(&mut self, payload: &[u8]) -> Result<(), String>;
}

struct Kind<W>(std::marker::PhantomData<fn() -> W>);

impl<W: Worker> KindEntry for Kind<W> {
    fn build(&self, init: &[u8], ctx: &WorkerContext) -> Result<Box<dyn ErasedWorker>, String> {
        let init: W::Init = ciborium::from_reader(init).map_err(|e| {
            format!(
                "init data does not decode as {}: {e}",
                std::any::type_name::<W::Init>()
            )
        })?;
        let worker = W::new(init, ctx).map_err(|e| e.to_string())?;
        Ok(Box::new(Live(worker)))
    }
}

struct Live<W>(W);

impl<W: Worker> ErasedWorker for Live<W> {
    fn run(&mut self, payload: &[u8]) -> Result<Vec<u8>, JobFail> {
        let job: W::Job = ciborium::from_reader(payload).map_err(|e| JobFail {
            message: format!(
                "job payload does not decode as {}: {e}",
                std::any::type_name::<W::Job>()
            ),
            undecodable: true,
        })?;
        let output = self.0.run(job).map_err(|e| JobFail {
            message: e.to_string(),
            undecodable: false,
        })?;
        let mut buf = Vec::new();
        ciborium::into_writer(&output, &mut buf).map_err(|e| JobFail {
            message: format!("output does not encode as CBOR: {e}"),
            undecodable: false,
        })?;
        Ok(buf)
    }

    fn update(&mut self, payload: &[u8]) -> Result<(), String> {
        let update: W::Update = ciborium::from_reader(payload).map_err(|e| {
            format!(
                "update does not decode as {}: {e}",
                std::any::type_name::<W::Update>()
            )
        })?;
        self.0.handle_update(update).map_err(|e| e.to_string())
    }
}
