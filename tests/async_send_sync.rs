//! Compile-time proof that the pool can live in async services: `Pool` is `Send + Sync`, and
//! every future and stream it returns is `Send` (streams also `'static`), so `tokio::spawn`
//! accepts them. If this file stops compiling, embedding broke.

use std::sync::Arc;

use distributed_computing::{
    BoxError, Broker, LocalBroker, Pool, PoolBuilder, Worker, WorkerContext,
};

struct W;

impl Worker for W {
    const KIND: &'static str = "send-sync";
    type Init = ();
    type Job = Vec<u8>;
    type Output = String;
    type Update = u32;
    fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> {
        Ok(W)
    }
    fn run(&mut self, job: Vec<u8>) -> Result<String, BoxError> {
        Ok(format!("{}", job.len()))
    }
}

fn send<T: Send>(_: &T) {}
fn send_sync<T: Send + Sync>() {}
fn send_static<T: Send + 'static>(_: &T) {}

#[allow(dead_code, clippy::let_underscore_future)]
fn futures_and_streams_are_send(pool: Arc<Pool<W>>) {
    send_sync::<Pool<W>>();
    send_sync::<Arc<dyn Broker>>();
    send_sync::<LocalBroker>();
    send_sync::<distributed_computing::PoolError>();
    send(&Pool::<W>::builder(()).local().connect());
    send(&pool.map(vec![vec![1u8]]));
    send(&pool.update_workers(3));
    send(&pool.workers_count());
    send(&pool.nodes_count());
    send(&pool.close());
    let stream = pool.imap_unordered(vec![vec![1u8]]);
    send_static(&stream);
    let _ = tokio::spawn(async move {
        let pool = pool;
        let _ = pool.map(vec![vec![2u8]]).await;
    });
}

#[allow(dead_code)]
fn builder_is_send(b: PoolBuilder<W>) -> impl Send {
    b
}

#[test]
fn pool_types_are_send_and_sync() {
    // The checks above are at compile time; this runs them through the type checker once more
    // with concrete values that need no runtime.
    send_sync::<Pool<W>>();
}
