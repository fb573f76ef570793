//! Fuzzing of every decoder that reads bytes from outside the process: worker frames (length
//! prefix, body, the zero-copy `Job` / `Result` splitters) and the CBOR envelopes a broker
//! holds (session specs, node statuses, attempt records, node problems, failure kinds).
//!
//! Each target runs on random bytes, on mutations of valid encodings (bit flips, truncation,
//! bytes spliced in), and on a seed corpus of hostile headers (lengths of 2^62 for byte and
//! text strings, arrays and maps, nesting past any sane depth). Whatever the input, a decoder
//! returns a value or an error: it never panics, never aborts on an allocation, and never
//! reads past what it was given. The runs are bounded (`DC_FUZZ_CASES` cases per target,
//! 20,000 by default: about half a minute for all targets in a debug build).

use std::io::Cursor;

use dc_core::JobFailure;
use dc_core::broker::{AttemptEnd, AttemptRecord, NodeId, NodeProblem, NodeStatus, WorkerId};
use dc_core::protocol::{self, FromWorker, ToWorker};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("DC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Hostile CBOR headers: huge declared lengths of every major type, indefinite lengths left
/// open, deep nesting, and tags; alone and as the field values of a valid-looking message.
fn hostile_seeds() -> Vec<Vec<u8>> {
    let huge = (1u64 << 62).to_be_bytes();
    let mut seeds = Vec::new();
    for major in [0x40u8, 0x60, 0x80, 0xa0] {
        let mut s = vec![major | 27];
        s.extend_from_slice(&huge);
        seeds.push(s.clone());
        // The same inside a one-entry map, as a message's field.
        let mut m = vec![0xa1, 0x63, b'J', b'o', b'b'];
        m.extend_from_slice(&s);
        seeds.push(m);
        let mut n = vec![major | 26, 0xff, 0xff, 0xff, 0xff];
        n.extend_from_slice(b"short");
        seeds.push(n);
    }
    seeds.push(vec![0x5f, 0x41, 0x00]); // indefinite byte string, never closed
    seeds.push(vec![0x9f; 100_000]); // arrays nested 100,000 deep
    seeds.push(vec![0xa1; 100_000]); // maps nested 100,000 deep
    seeds.push([0xc6u8].repeat(50_000)); // tags on tags
    seeds.push(vec![0xff, 0xff]); // a break with nothing to break
    seeds
}

/// Valid encodings of every message and envelope, to mutate.
fn valid_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |v: Vec<u8>| out.push(v);
    push(cbor(&ToWorker::Job {
        job_id: 7,
        attempt: 2,
        payload: protocol::Payload::borrowed(b"\x18\x2a"),
    }));
    push(cbor(&FromWorker::Result {
        job_id: 7,
        payload: vec![1, 2, 3],
    }));
    push(cbor(&FromWorker::Hello {
        protocol: "dc-worker".into(),
        version: 1,
        pid: 42,
        kinds: vec!["sweep".into()],
    }));
    push(cbor(&AttemptRecord {
        attempt: 3,
        node: NodeId("n".into()),
        worker: WorkerId("n/0".into()),
        end: AttemptEnd::ProcessDied {
            how: "killed by signal 9 (SIGKILL)".into(),
            last_lines: vec!["line".into(); 3],
        },
    }));
    push(cbor(&NodeStatus {
        node: NodeId("n".into()),
        host: "h".into(),
        kinds: vec!["k".into()],
        workers: vec![],
        leases: vec![],
    }));
    push(cbor(&NodeProblem::UnknownKind {
        node: NodeId("n".into()),
        known: vec!["a".into(), "b".into()],
    }));
    push(cbor(&JobFailure::Exhausted));
    push(cbor(&dc_core::testing::spec(
        std::time::Duration::from_secs(5),
        3,
    )));
    out
}

fn cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encode a seed");
    out
}

/// Every decoder, on one input.
fn decode_all(bytes: &[u8]) {
    let _ = protocol::decode_body::<FromWorker>(bytes);
    let _ = protocol::decode_body::<ToWorker<'static>>(bytes);
    if let Some((_, _, at)) = protocol::split_job(bytes) {
        assert!(at <= bytes.len(), "split_job points past the body");
    }
    if let Some((_, at)) = protocol::split_result(bytes) {
        assert!(at <= bytes.len(), "split_result points past the body");
    }
    let _ = ciborium::from_reader::<AttemptRecord, _>(bytes);
    let _ = ciborium::from_reader::<NodeStatus, _>(bytes);
    let _ = ciborium::from_reader::<NodeProblem, _>(bytes);
    let _ = ciborium::from_reader::<JobFailure, _>(bytes);
    let _ = ciborium::from_reader::<dc_core::broker::SessionSpec, _>(bytes);
    // As a frame: a 4-byte length prefix, then the body.
    let mut framed = Vec::with_capacity(bytes.len() + 4);
    framed.extend_from_slice(
        &u32::try_from(bytes.len())
            .expect("a test frame fits")
            .to_be_bytes(),
    );
    framed.extend_from_slice(bytes);
    let _ = protocol::read_frame_blocking::<FromWorker>(&mut Cursor::new(&framed));
    // And the bytes themselves read as a stream of frames (their first four bytes a length).
    let mut stream = Cursor::new(bytes);
    for _ in 0..4 {
        if protocol::read_body_blocking(&mut stream).is_err() {
            break;
        }
    }
}

#[test]
fn hostile_seeds_are_errors_not_aborts() {
    for seed in hostile_seeds() {
        decode_all(&seed);
    }
    // A frame that claims more than the limit is refused before anything is read for it.
    let mut over = Cursor::new(vec![0x7f, 0xff, 0xff, 0xff, 0x00]);
    assert!(matches!(
        protocol::read_body_blocking(&mut over),
        Err(protocol::FrameError::TooLarge(_))
    ));
}

#[test]
fn random_bytes_never_break_a_decoder() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            decode_all(&bytes);
            Ok(())
        })
        .expect("random bytes");
}

#[test]
fn mutated_encodings_never_break_a_decoder() {
    let seeds: Vec<Vec<u8>> = valid_seeds().into_iter().chain(hostile_seeds()).collect();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let mutation = (
        0..seeds.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..8),
    );
    runner
        .run(&mutation, |(which, edits)| {
            let mut bytes = seeds[which].clone();
            for (at, value, how) in edits {
                if bytes.is_empty() {
                    bytes.push(value);
                    continue;
                }
                let at = at % bytes.len();
                match how {
                    0 => bytes[at] ^= value | 1,  // flip bits
                    1 => bytes.truncate(at),      // cut short
                    2 => bytes.insert(at, value), // splice a byte in
                    _ => bytes
                        .splice(
                            at..at,
                            [0x1b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                        )
                        .for_each(drop), // a huge number
                }
            }
            decode_all(&bytes);
            Ok(())
        })
        .expect("mutated encodings");
}
