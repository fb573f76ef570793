//! Script replies decoded into typed rows: one function per reply shape, named after its
//! script (each script's reply is described at the top of its `lua/*.lua` file).
//!
//! Bytes from the server are untrusted. Every decoder checks a reply's length and each field's
//! type before it uses it, allocates only for items the reply holds, and answers
//! [`BrokerError::Protocol`] saying what was wrong. Where one damaged row must not spoil the
//! others (a job of a take batch, a result notice, a lease to reap, a node's status), the row
//! carries its own `Result` and the caller decides what a damaged row means. Sizes of chunked
//! values are only decoded here; `staging::fetch` checks them against what it reads.

use dc_core::broker::{
    Abandoned, AttemptRecord, Completion, JobId, NodeId, NodeProblem, NodeStatus, SessionId,
    UpdateSeq, WorkerId,
};
use dc_core::{BrokerError, JobFailure};
use redis::Value;

use crate::codec::{array, bad, bytes, from_cbor, int, opt_bytes, opt_string, string, take, uint};
use crate::keys::Keys;

/// Fields per leased job in a `take` reply.
const TAKE_FIELDS: usize = 8;
/// Fields per notice in a `take_results` reply.
const NOTICE_FIELDS: usize = 9;
/// Fields per lease in a `pending` reply.
const PENDING_FIELDS: usize = 5;
/// Fields per update in a `read_updates` reply.
const UPDATE_FIELDS: usize = 4;

/// A payload as a script hands it over: in the reply, or by chunks in a hash.
#[derive(Debug)]
pub(super) enum Payload {
    Inline(Vec<u8>),
    Chunked { key: String, n: usize, len: usize },
}

/// The `take` script's reply.
#[derive(Debug)]
pub(super) enum Take {
    /// Jobs leased, with the update log's length when they were.
    Leased { log_len: u64, jobs: Vec<LeasedRow> },
    /// Nothing queued: where the job stream ended and the update log's length.
    Empty { last: String, log_len: u64 },
}

/// One job a `take` leased. Its lease fields are sound (else the whole reply is refused); the
/// rest may be damaged, which fails only this job's attempt.
#[derive(Debug)]
pub(super) struct LeasedRow {
    pub(super) job: u64,
    pub(super) attempt: u32,
    /// The lease token (the stream entry id).
    pub(super) entry: String,
    pub(super) body: Result<LeasedBody, BrokerError>,
}

/// What a leased job carries.
#[derive(Debug)]
pub(super) struct LeasedBody {
    pub(super) update_seq: UpdateSeq,
    pub(super) payload: Payload,
}

/// `take`: `{1, log length, (job, attempt, entry, update seq, chunks, length, holder,
/// payload)…}` or `{0, last id, log length}`. A chunked payload's holder must be a key of
/// `session`.
pub(super) fn take_reply(
    reply: Value,
    keys: &Keys,
    session: &SessionId,
) -> Result<Take, BrokerError> {
    let items = array(reply)?;
    let flag = int(items.first().ok_or_else(|| bad("empty reply"))?)?;
    if flag != 1 {
        let [_, last, log_len] = take::<3>(Value::Array(items))?;
        return Ok(Take::Empty {
            log_len: uint(&log_len)?,
            last: string(last)?,
        });
    }
    let mut items = items.into_iter().skip(1);
    let log_len: u64 = uint(&items.next().ok_or_else(|| bad("no log length"))?)?;
    let rest: Vec<Value> = items.collect();
    if rest.is_empty() || rest.len() % TAKE_FIELDS != 0 {
        return Err(bad(format!("a take reply of {} fields", rest.len())));
    }
    let base = keys.base(session);
    let mut jobs = Vec::with_capacity(rest.len() / TAKE_FIELDS);
    let mut fields = rest.into_iter();
    while let (
        Some(job),
        Some(attempt),
        Some(entry),
        Some(upd),
        Some(n),
        Some(len),
        Some(holder),
        Some(data),
    ) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        let job = job_id(job)?;
        let body = (|| {
            let update_seq: UpdateSeq = uint(&upd)?;
            let payload = match opt_bytes(data)? {
                Some(data) => Payload::Inline(data),
                None => match string(holder)? {
                    key if key.starts_with(&base) => Payload::Chunked {
                        key,
                        n: uint(&n)?,
                        len: uint(&len)?,
                    },
                    _ => return Err(bad(format!("{}'s payload is in a foreign key", JobId(job)))),
                },
            };
            Ok(LeasedBody {
                update_seq,
                payload,
            })
        })();
        jobs.push(LeasedRow {
            job,
            attempt: uint(&attempt)?,
            entry: string(entry)?,
            body,
        });
    }
    Ok(Take::Leased { log_len, jobs })
}

/// The `take_results` script's reply: where the read ended, and the notices read (none when
/// the results stream held nothing new).
#[derive(Debug)]
pub(super) struct Results {
    pub(super) last: String,
    pub(super) notices: Option<Vec<Result<NoticeRow, BrokerError>>>,
}

/// A result notice whose job id is sound; the rest may be damaged, which fails that job.
#[derive(Debug)]
pub(super) struct NoticeRow {
    pub(super) job: u64,
    /// Attempts the job took (0 when unreadable).
    pub(super) attempts: u32,
    pub(super) outcome: Result<Committed, BrokerError>,
}

/// A committed outcome as its notice carries it.
#[derive(Debug)]
pub(super) enum Committed {
    Done(Payload),
    Failed {
        kind: JobFailure,
        message: String,
        history: Vec<AttemptRecord>,
    },
}

/// `take_results`: `{1, last id, {job, kind, failure, attempts, message, chunks, length,
/// output, history}…}` or `{0, last id}`.
pub(super) fn results_reply(
    reply: Value,
    keys: &Keys,
    session: &SessionId,
) -> Result<Results, BrokerError> {
    let mut items = array(reply)?.into_iter();
    let flag = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
    let last = string(items.next().ok_or_else(|| bad("no stream id"))?)?;
    let notices = (flag == 1).then(|| items.map(|item| notice(item, keys, session)).collect());
    Ok(Results { last, notices })
}

fn notice(item: Value, keys: &Keys, session: &SessionId) -> Result<NoticeRow, BrokerError> {
    let fields = array(item)?;
    if fields.len() < NOTICE_FIELDS {
        return Err(bad("a result notice without a job id"));
    }
    let [job, kind, failure, attempts, message, n, len, data, history] =
        take::<NOTICE_FIELDS>(Value::Array(fields))?;
    let job = job_id(job)?;
    let outcome = (|| {
        Ok(match opt_string(kind)?.as_deref() {
            Some("d") => Committed::Done(match opt_bytes(data)? {
                Some(data) => Payload::Inline(data),
                None => Payload::Chunked {
                    key: keys.output(session, job),
                    n: uint(&n)?,
                    len: uint(&len)?,
                },
            }),
            Some("f") => Committed::Failed {
                kind: from_cbor("a job's failure kind", &bytes(failure)?)?,
                message: string(message)?,
                history: array(history)?
                    .into_iter()
                    .map(|r| from_cbor("an attempt record", &bytes(r)?))
                    .collect::<Result<_, _>>()?,
            },
            _ => return Err(bad("no result is recorded")),
        })
    })();
    Ok(NoticeRow {
        job,
        attempts: uint(&attempts).unwrap_or(0),
        outcome,
    })
}

/// The `active` script's reply.
#[derive(Debug)]
pub(super) enum Active {
    /// The active session and its spec (CBOR).
    Open { id: SessionId, spec: Payload },
    /// None: the `opened` stream's last id, to wait on.
    None { last: String },
}

/// `active`: `{1, id, spec chunks, spec length, spec or nil}` or `{0, last id}`.
pub(super) fn active_reply(reply: Value, keys: &Keys) -> Result<Active, BrokerError> {
    let mut items = array(reply)?.into_iter();
    let flag = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
    if flag != 1 {
        let last = string(items.next().ok_or_else(|| bad("no stream id"))?)?;
        return Ok(Active::None { last });
    }
    let [id, n, len, data] = take::<4>(Value::Array(items.collect()))?;
    let id = SessionId(string(id)?);
    let spec = match opt_bytes(data)? {
        Some(data) => Payload::Inline(data),
        None => Payload::Chunked {
            key: keys.spec(&id),
            n: uint(&n)?,
            len: uint(&len)?,
        },
    };
    Ok(Active::Open { id, spec })
}

/// One update of a `read_updates` reply.
#[derive(Debug)]
pub(super) struct UpdateRow {
    pub(super) seq: UpdateSeq,
    pub(super) payload: Payload,
}

/// `read_updates`: `(seq, body or nil, chunks, length)…`.
pub(super) fn updates_reply(
    reply: Value,
    keys: &Keys,
    session: &SessionId,
) -> Result<Vec<UpdateRow>, BrokerError> {
    let items = array(reply)?;
    if items.len() % UPDATE_FIELDS != 0 {
        return Err(bad(format!("an update list of {} fields", items.len())));
    }
    let mut out = Vec::with_capacity(items.len() / UPDATE_FIELDS);
    let mut it = items.into_iter();
    while let (Some(seq), Some(data), Some(n), Some(len)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        let seq: UpdateSeq = match seq {
            Value::Nil => return Err(bad("an update entry without a sequence number")),
            v => uint(&v)?,
        };
        let payload = match (opt_bytes(data)?, n, len) {
            (Some(data), _, _) => Payload::Inline(data),
            (None, Value::Nil, _) | (None, _, Value::Nil) => {
                return Err(bad(format!("update {seq} has neither a body nor chunks")));
            }
            (None, n, len) => Payload::Chunked {
                key: keys.update_body(session, seq),
                n: uint(&n)?,
                len: uint(&len)?,
            },
        };
        out.push(UpdateRow { seq, payload });
    }
    Ok(out)
}

/// A lease as the `pending` script lists it.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) job: u64,
    pub(super) attempt: u32,
    pub(super) entry: String,
    pub(super) node: NodeId,
    pub(super) worker: WorkerId,
}

/// `pending`: `(job, attempt, entry, node, worker)…`, each lease decoded on its own (a damaged
/// one must not keep the others from being reaped). Trailing fields that make no whole lease
/// are one damaged row.
pub(super) fn pending_reply(reply: Value) -> Result<Vec<Result<Held, BrokerError>>, BrokerError> {
    let items = array(reply)?;
    let cut_short = items.len() % PENDING_FIELDS != 0;
    let mut held = Vec::with_capacity(items.len() / PENDING_FIELDS + 1);
    let mut it = items.into_iter();
    while let (Some(job), Some(attempt), Some(entry), Some(node), Some(worker)) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    {
        held.push((|| {
            Ok(Held {
                job: job_id(job)?,
                attempt: uint(&attempt)?,
                entry: string(entry)?,
                node: NodeId(string(node)?),
                worker: WorkerId(string(worker)?),
            })
        })());
    }
    if cut_short {
        held.push(Err(bad("a lease record cut short")));
    }
    Ok(held)
}

/// `sessions`: the active session's id and every registered one.
pub(super) fn sessions_reply(
    reply: Value,
) -> Result<(Option<String>, Vec<SessionId>), BrokerError> {
    let [active, all] = take::<2>(reply)?;
    let all = array(all)?
        .into_iter()
        .map(|v| string(v).map(SessionId))
        .collect::<Result<_, _>>()?;
    Ok((opt_string(active)?, all))
}

/// `lost`: the ids of the lost jobs.
pub(super) fn lost_reply(reply: Value) -> Result<Vec<JobId>, BrokerError> {
    array(reply)?
        .into_iter()
        .map(|id| job_id(id).map(JobId))
        .collect()
}

/// `end_attempt`: `"requeued"`, `"failed"` or `"stale"`.
pub(super) fn end_attempt_reply(reply: Value) -> Result<Abandoned, BrokerError> {
    match string(reply)?.as_str() {
        "requeued" => Ok(Abandoned::Requeued),
        "failed" => Ok(Abandoned::Failed),
        "stale" => Ok(Abandoned::Stale),
        other => Err(bad(format!("end_attempt answered {other:?}"))),
    }
}

/// `complete`: one 1 (accepted) or 0 (discarded) per outcome sent, `outcomes` of them.
pub(super) fn complete_reply(
    reply: Value,
    outcomes: usize,
) -> Result<Vec<Completion>, BrokerError> {
    let answers = array(reply)?;
    if answers.len() != outcomes {
        return Err(bad(format!(
            "{} answers for {outcomes} outcomes",
            answers.len()
        )));
    }
    answers
        .iter()
        .map(|a| {
            Ok(if int(a)? == 1 {
                Completion::Accepted
            } else {
                Completion::Discarded
            })
        })
        .collect()
}

/// The `stats` script's reply.
#[derive(Debug)]
pub(super) struct Stats {
    pub(super) queued: usize,
    pub(super) running: usize,
    pub(super) done: usize,
    pub(super) failed: usize,
    pub(super) problems: Vec<NodeProblem>,
    /// Each node status on its own: one that cannot be read is skipped by the caller.
    pub(super) statuses: Vec<Result<NodeStatus, BrokerError>>,
}

/// `stats`: `{queued, running, done, failed, {problem…}, {node status…}}`.
pub(super) fn stats_reply(reply: Value) -> Result<Stats, BrokerError> {
    let [q, r, d, f, problems, statuses] = take::<6>(reply)?;
    let count = |v: &Value| int(v).map(|i| usize::try_from(i).unwrap_or(0));
    Ok(Stats {
        queued: count(&q)?,
        running: count(&r)?,
        done: count(&d)?,
        failed: count(&f)?,
        problems: array(problems)?
            .into_iter()
            .map(|p| from_cbor::<NodeProblem>("a node problem", &bytes(p)?))
            .collect::<Result<_, _>>()?,
        statuses: array(statuses)?
            .into_iter()
            .map(|raw| bytes(raw).map(|raw| from_cbor("a node status", &raw)))
            .collect::<Result<_, _>>()?,
    })
}

/// The `nodes` script's reply: the server's clock, and each node entry on its own (`None`: a
/// node whose status key is gone).
#[derive(Debug)]
pub(super) struct Nodes {
    pub(super) now: i64,
    pub(super) rows: Vec<Result<Option<NodeRow>, BrokerError>>,
}

/// A node heard from at `at` (server ms).
#[derive(Debug)]
pub(super) struct NodeRow {
    pub(super) at: i64,
    pub(super) status: NodeStatus,
}

/// `nodes`: `{now ms, {node, last heartbeat ms, status or nil}…}`.
pub(super) fn nodes_reply(reply: Value) -> Result<Nodes, BrokerError> {
    let mut items = array(reply)?.into_iter();
    let now = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
    let rows = items
        .map(|item| {
            let [_, at, status] = take::<3>(item)?;
            let Some(status) = opt_bytes(status)? else {
                return Ok(None);
            };
            Ok(Some(NodeRow {
                at: int(&at)?,
                status: from_cbor("a node status", &status)?,
            }))
        })
        .collect();
    Ok(Nodes { now, rows })
}

/// An `XREAD` reply (RESP2 array or RESP3 map): the streams that have new entries.
pub(super) fn xread_reply(reply: Value) -> Result<Vec<String>, BrokerError> {
    match reply {
        Value::Map(pairs) => pairs.into_iter().map(|(name, _)| string(name)).collect(),
        other => array(other)?
            .into_iter()
            .map(|stream| {
                let [name, _] = take::<2>(stream)?;
                string(name)
            })
            .collect(),
    }
}

/// A 1-or-0 answer (`open_session`, `keep_alive`, `close_session`): whether it was 1.
pub(super) fn flag_reply(reply: &Value) -> Result<bool, BrokerError> {
    Ok(int(reply)? == 1)
}

/// A job id, sent by the scripts as a decimal string.
pub(super) fn job_id(v: Value) -> Result<u64, BrokerError> {
    let s = string(v)?;
    s.parse()
        .map_err(|_| bad(format!("job id {s:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn session() -> (Keys, SessionId) {
        (Keys::new("dc"), SessionId("s1".into()))
    }

    #[test]
    fn a_take_reply_decodes_into_rows() {
        let (keys, s) = session();
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::Int(3),
            b("7"),
            b("2"),
            b("5-0"),
            b("1"),
            b("1"),
            b("3"),
            b(""),
            b("abc"),
            b("8"),
            b("1"),
            b("6-0"),
            b("0"),
            b("2"),
            b("40"),
            b("dc:{s1}:in:8"),
            Value::Nil,
        ]);
        let Take::Leased { log_len, jobs } = take_reply(reply, &keys, &s).expect("decodes") else {
            panic!("leased expected");
        };
        assert_eq!(log_len, 3);
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].job, jobs[0].attempt, jobs[0].entry.as_str()),
            (7, 2, "5-0")
        );
        let body = jobs[0].body.as_ref().expect("sound");
        assert_eq!(body.update_seq, 1);
        assert!(matches!(&body.payload, Payload::Inline(d) if d == b"abc"));
        let body = jobs[1].body.as_ref().expect("sound");
        assert!(matches!(&body.payload,
            Payload::Chunked { key, n: 2, len: 40 } if key == "dc:{s1}:in:8"));
    }

    #[test]
    fn damaged_take_replies_are_protocol_errors() {
        let (keys, s) = session();
        let bad_len = Value::Array(vec![Value::Int(1), Value::Int(3), b("7")]);
        assert!(matches!(
            take_reply(bad_len, &keys, &s),
            Err(BrokerError::Protocol(_))
        ));
        assert!(matches!(
            take_reply(Value::Int(4), &keys, &s),
            Err(BrokerError::Protocol(_))
        ));
        let mut foreign = vec![Value::Int(1), Value::Int(0)];
        foreign.extend([
            b("1"),
            b("1"),
            b("1-0"),
            b("0"),
            b("1"),
            b("4"),
            b("x:in:1"),
            Value::Nil,
        ]);
        let Take::Leased { jobs, .. } =
            take_reply(Value::Array(foreign), &keys, &s).expect("the lease is sound")
        else {
            panic!("leased expected");
        };
        assert!(matches!(&jobs[0].body, Err(BrokerError::Protocol(m)) if m.contains("foreign")));
    }

    #[test]
    fn pending_rows_fail_one_by_one() {
        let reply = Value::Array(vec![
            b("1"),
            b("1"),
            b("1-0"),
            b("n"),
            b("n/0"),
            b("x"),
            b("1"),
            b("2-0"),
            b("n"),
            b("n/1"),
            b("3"),
        ]);
        let rows = pending_reply(reply).expect("a list");
        assert_eq!(rows.len(), 3);
        assert!(rows[0].is_ok());
        assert!(rows[1].is_err());
        assert!(rows[2].is_err());
    }

    #[test]
    fn a_damaged_notice_fails_its_job_alone() {
        let (keys, s) = session();
        let sound = vec![
            b("4"),
            b("d"),
            b(""),
            b("1"),
            b(""),
            b("2"),
            b("9"),
            Value::Nil,
            Value::Array(vec![]),
        ];
        let mut damaged = sound.clone();
        damaged[0] = b("5");
        damaged[1] = b("q");
        let reply = Value::Array(vec![
            Value::Int(1),
            b("7-0"),
            Value::Array(sound),
            Value::Array(damaged),
            Value::Array(vec![b("6")]),
        ]);
        let read = results_reply(reply, &keys, &s).expect("decodes");
        assert_eq!(read.last, "7-0");
        let notices = read.notices.expect("notices");
        assert_eq!(notices.len(), 3);
        let first = notices[0].as_ref().expect("sound");
        assert!(matches!(&first.outcome,
            Ok(Committed::Done(Payload::Chunked { key, n: 2, len: 9 })) if key == "dc:{s1}:out:4"));
        let second = notices[1].as_ref().expect("its job id is sound");
        assert_eq!(second.job, 5);
        assert!(second.outcome.is_err());
        assert!(notices[2].is_err());
    }

    #[test]
    fn an_update_list_cut_short_is_refused() {
        let (keys, s) = session();
        let whole = Value::Array(vec![b("1"), b("x"), Value::Nil, Value::Nil]);
        let rows = updates_reply(whole, &keys, &s).expect("one update");
        assert!(matches!(&rows[0].payload, Payload::Inline(d) if d == b"x"));
        let cut = Value::Array(vec![b("1"), b("x"), Value::Nil]);
        assert!(matches!(
            updates_reply(cut, &keys, &s),
            Err(BrokerError::Protocol(_))
        ));
    }

    #[test]
    fn completions_must_match_the_outcomes_sent() {
        let reply = Value::Array(vec![Value::Int(1), Value::Int(0)]);
        assert_eq!(
            complete_reply(reply.clone(), 2).expect("two answers"),
            vec![Completion::Accepted, Completion::Discarded]
        );
        assert!(complete_reply(reply, 3).is_err());
    }
}
