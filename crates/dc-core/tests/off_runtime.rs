//! A pool encodes jobs and updates, and decodes big outputs, away from the async runtime's
//! threads: on a single-threaded runtime, other tasks keep running while a payload's CBOR is
//! made or read.
//!
//! Each payload here encodes (or decodes) only once another task of the same single-threaded
//! runtime has seen it start: done on the runtime's one thread, that task could never run, and
//! the payload gives up waiting and says so; done on a blocking thread, it goes through.

use dc_core::broker::JobQueue;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dc_core::broker::{NodeId, SessionId, WorkerId};
use dc_core::{BoxError, LocalBroker, Pool, PoolError, Worker, WorkerContext};
use futures::StreamExt;
use serde::de::{Deserialize, Deserializer};
use serde::ser::{Error as _, Serialize, Serializer};

/// How long a payload waits for the other task before it gives up.
const PATIENCE: Duration = Duration::from_secs(10);

/// A payload's CBOR work waits at the gate until a task of the runtime opens it.
struct Gate {
    reached: AtomicBool,
    open: AtomicBool,
}

impl Gate {
    const fn new() -> Self {
        Gate {
            reached: AtomicBool::new(false),
            open: AtomicBool::new(false),
        }
    }

    /// Say the work started, and wait (blocking the thread) for the gate to open; false when
    /// it never did.
    fn pass(&self) -> bool {
        self.reached.store(true, Ordering::Release);
        let until = Instant::now() + PATIENCE;
        while !self.open.load(Ordering::Acquire) {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A task that opens the gate once the work reached it (it can run only while the runtime's
    /// thread is free).
    fn opener(&'static self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while !self.reached.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.open.store(true, Ordering::Release);
        })
    }
}

static JOB: Gate = Gate::new();
static UPDATE: Gate = Gate::new();
static OUTPUT: Gate = Gate::new();

/// Bytes whose CBOR passes a gate: `JOB` or `UPDATE` to encode (as chosen), `OUTPUT` to decode.
struct Gated(&'static Gate, Vec<u8>);

impl Serialize for Gated {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !self.0.pass() {
            return Err(S::Error::custom("encoded on the runtime's thread"));
        }
        serde_bytes::Bytes::new(&self.1).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Gated {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?.into_vec();
        if !OUTPUT.pass() {
            return Err(serde::de::Error::custom("decoded on the runtime's thread"));
        }
        Ok(Gated(&OUTPUT, bytes))
    }
}

struct Echo;

impl Worker for Echo {
    const KIND: &'static str = "off-runtime";
    type Init = ();
    type Job = Gated;
    type Output = Gated;
    type Update = Gated;

    fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> {
        Ok(Echo)
    }
    fn run(&mut self, job: Gated) -> Result<Gated, BoxError> {
        Ok(job)
    }
}

/// CBOR of `n` bytes as a byte string (what a worker's output of `Gated` is).
fn output_of(n: usize) -> Bytes {
    let mut out = Vec::new();
    ciborium::into_writer(&serde_bytes::Bytes::new(&vec![7u8; n]), &mut out).expect("encode");
    Bytes::from(out)
}

#[tokio::test(flavor = "current_thread")]
async fn payload_cbor_never_holds_the_runtime() -> Result<(), PoolError> {
    let broker = Arc::new(LocalBroker::new());
    let pool = Pool::<Echo>::builder(())
        .broker_instance(broker.clone())
        .connect()
        .await?;
    let session = SessionId(pool.session_id());

    // An update.
    let opener = UPDATE.opener();
    pool.update_workers(Gated(&UPDATE, vec![1; 64])).await?;
    opener.await.expect("opener");

    // A job, then its 2 MiB output: this test plays the node.
    let opener = JOB.opener();
    let decode_opener = OUTPUT.opener();
    let mut stream = pool.imap_unordered(vec![Gated(&JOB, vec![2; 64])]);
    let node = async {
        let (node, worker) = (NodeId("n".into()), WorkerId("n/0".into()));
        loop {
            let taken = broker
                .take_jobs(&session, &node, &worker, 1, Duration::from_millis(50))
                .await
                .expect("take");
            if let Some(job) = taken.into_iter().next() {
                broker
                    .complete(&job.lease, Ok(output_of(2 << 20)))
                    .await
                    .expect("complete");
                return;
            }
        }
    };
    let (item, ()) = tokio::join!(stream.next(), node);
    let (index, out) = item.expect("one item")?;
    assert_eq!((index, out.1.len()), (0, 2 << 20));
    opener.await.expect("opener");
    decode_opener.await.expect("decode opener");
    pool.close().await
}
