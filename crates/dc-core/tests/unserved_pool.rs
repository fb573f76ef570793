//! A pool whose jobs wait with no worker for its kind says so: a warning after 10 s naming the
//! kind and how many jobs wait, then once a minute while it lasts, and nothing once a worker
//! serves it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dc_core::{BoxError, LocalBroker, Pool, Worker, WorkerContext};
use futures::StreamExt;

struct Nobody;

impl Worker for Nobody {
    const KIND: &'static str = "served-by-nobody";
    type Init = ();
    type Job = u32;
    type Output = u32;
    type Update = ();

    fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> {
        Ok(Nobody)
    }
    fn run(&mut self, job: u32) -> Result<u32, BoxError> {
        Ok(job)
    }
}

/// Log lines written by the subscriber of this test.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn warnings(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().expect("lines"))
            .lines()
            .filter(|l| l.contains("no worker serves"))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn jobs_with_no_worker_for_their_kind_are_named_in_a_warning() {
    let lines = Lines::default();
    let writer = lines.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let broker = Arc::new(LocalBroker::new());
    let pool = Pool::<Nobody>::builder(())
        .broker_instance(broker)
        .connect()
        .await
        .expect("connect");
    let mut stream = pool.imap_unordered(vec![1, 2, 3]);
    let waited = tokio::time::timeout(Duration::from_secs(9), stream.next()).await;
    assert!(waited.is_err(), "a result with no worker: {waited:?}");
    assert!(
        lines.warnings().is_empty(),
        "warned early: {:?}",
        lines.warnings()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let said = lines.warnings();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("served-by-nobody") && said[0].contains("waiting=3"),
        "{said:?}"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(lines.warnings().len(), 1, "said again within the minute");
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(lines.warnings().len(), 2, "said once a minute");
    drop(stream);
    pool.close().await.expect("close");
}
