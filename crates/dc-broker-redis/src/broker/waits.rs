//! Blocking reads: `XREAD BLOCK` on a dedicated blocking connection, alone or pipelined with
//! the script it wakes (so the server runs the script the moment the read unblocks).

use std::time::Duration;

use dc_core::BrokerError;
use dc_core::broker::SessionId;
use redis::{ScriptInvocation, Value};

use super::replies::xread_reply;
use super::{RedisBroker, in_session};
use crate::conn::{Conns, Kind};

impl RedisBroker {
    /// Wait up to `wait` for an entry after `ids` in any of `streams` (XREAD BLOCK on a
    /// dedicated connection); returns the streams that got one (empty when the wait ended).
    pub(super) async fn wait_streams(
        &self,
        streams: &[&str],
        ids: &[&str],
        wait: Duration,
    ) -> Result<Vec<String>, BrokerError> {
        if wait.is_zero() {
            return Ok(Vec::new());
        }
        let mut conn = self.conns().dedicated(Kind::Blocking).await?;
        Conns::arm(&mut conn, wait);
        let result = xread_block(streams, ids, wait)
            .query_async::<Value>(conn.conn())
            .await;
        let reply = conn.finish(result).map_err(|e| self.conns().error(e))?;
        xread_reply(reply)
    }

    /// Wait up to `wait` for an entry after `ids` in any of `streams`, then run `inv` at once:
    /// `XREAD BLOCK` and the script go out as one pipeline on a dedicated connection, so the
    /// server runs the script the moment the read unblocks (no round trip between waking and
    /// taking). Returns the script's reply, whether the wait ended by an entry or by time.
    pub(super) async fn wait_then_run(
        &self,
        session: &SessionId,
        streams: &[&str],
        ids: &[&str],
        wait: Duration,
        inv: &ScriptInvocation<'_>,
    ) -> Result<Value, BrokerError> {
        let mut conn = self.conns().dedicated(Kind::Blocking).await?;
        Conns::arm(&mut conn, wait);
        let mut pipe = redis::pipe();
        pipe.add_command(xread_block(streams, ids, wait))
            .ignore()
            .invoke_script(inv);
        let mut result = pipe.query_async::<(Value,)>(conn.conn()).await;
        if matches!(&result, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // The server lost its scripts (a restart): load and run it now, without waiting.
            result = inv.invoke_async::<Value>(conn.conn()).await.map(|v| (v,));
        }
        let (reply,) = conn
            .finish(result)
            .map_err(|e| in_session(self.conns().error(e), session))?;
        Ok(reply)
    }
}

/// `XREAD BLOCK <wait> COUNT 1 STREAMS <streams> <ids>`.
fn xread_block(streams: &[&str], ids: &[&str], wait: Duration) -> redis::Cmd {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("BLOCK")
        .arg(ms)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(streams)
        .arg(ids);
    cmd
}
