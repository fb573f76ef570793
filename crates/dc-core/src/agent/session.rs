//! Following the broker's active session: a node serves one session at a time with all its
//! slots, refuses a session whose kind it does not have (reporting it to the pool once), and
//! stops its slots when the session closes or another one becomes active.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::slot::run_slot;
use super::updates::UpdateLog;
use super::{NodeShared, heartbeat_loop, retry_backoff, sleep_or_stop};
use crate::broker::{NodeProblem, SessionId, SessionInfo};

/// The agent's main loop: serve the broker's active session while this node has its kind, one
/// session at a time, until the node stops; then deregister the node.
pub(super) async fn run_agent(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let node = shared.config.node_id.clone();
    tracing::info!(%node, slots = shared.config.slots.len(), kinds = ?shared.config.known_kinds(), "node agent started");
    let beat = tokio::spawn(heartbeat_loop(shared.clone(), stop.clone()));
    // The last session this node refused (a kind it does not have): not again.
    let mut refused: Option<SessionId> = None;
    // The last session it served, and when that ended: served again if it is still active a
    // while later (the node may have left it on a glitch: damaged broker state, an answer it
    // could not read), never in a tight loop.
    let mut served: Option<(SessionId, tokio::time::Instant)> = None;
    let mut backoff = retry_backoff();
    while !*stop.borrow() {
        let active = tokio::select! {
            _ = stop.changed() => break,
            r = shared.broker.active_session(shared.config.poll) => r,
        };
        let info = match active {
            Ok(Some(info))
                if refused.as_ref() == Some(&info.id)
                    || served.as_ref().is_some_and(|(id, at)| {
                        *id == info.id && at.elapsed() < SERVE_AGAIN_AFTER
                    }) =>
            {
                // Refused, or just served: wait.
                sleep_or_stop(&mut stop, shared.config.poll).await;
                continue;
            }
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot read the active session; retrying");
                sleep_or_stop(&mut stop, backoff.next_pause()).await;
                continue;
            }
        };
        backoff = retry_backoff();
        if shared.config.command_for(&info.spec.kind).is_none() {
            let known = shared.config.known_kinds();
            tracing::error!(%node, kind = %info.spec.kind, ?known, "pool asks for a worker kind this node does not have");
            let problem = NodeProblem::UnknownKind {
                node: node.clone(),
                known,
            };
            if let Err(e) = shared.broker.report_problem(&info.id, problem).await {
                tracing::warn!(%node, error = %e, "cannot report the unknown worker kind");
            }
            refused = Some(info.id);
        } else {
            tracing::info!(%node, session = %info.id, kind = %info.spec.kind, "serving pool session");
            run_session(&shared, &info, &mut stop).await;
            tracing::info!(%node, session = %info.id, "pool session over");
            served = Some((info.id, tokio::time::Instant::now()));
        }
    }
    let _ = beat.await;
    if let Err(e) = shared.broker.leave(&node).await {
        tracing::warn!(%node, error = %e, "could not deregister the node");
    }
    tracing::info!(%node, "node agent stopped");
}

/// How long after leaving a session a node serves it again if it is still the active one.
const SERVE_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// Serve one session until it closes or the node stops.
async fn run_session(
    shared: &Arc<NodeShared>,
    info: &SessionInfo,
    stop: &mut watch::Receiver<bool>,
) {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let log = Arc::new(UpdateLog::new(info.id.clone()));
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..shared.config.slots.len() {
        slots.spawn(run_slot(
            shared.clone(),
            info.clone(),
            slot,
            log.clone(),
            cancel_rx.clone(),
        ));
    }
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            done = slots.join_next() => {
                if done.is_none() {
                    break;
                }
            }
            _ = tokio::time::sleep(shared.config.poll) => {
                match shared.broker.active_session(Duration::ZERO).await {
                    Ok(Some(s)) if s.id == info.id => {}
                    Ok(_) => break,
                    Err(e) if e.is_transient() => {}
                    Err(_) => break,
                }
            }
        }
    }
    let _ = cancel_tx.send(true);
    while slots.join_next().await.is_some() {}
}
