//! The worker-process protocol: length-prefixed CBOR frames on a dedicated channel.
//!
//! The node agent and a worker process talk over a Unix socket passed to the worker as file
//! descriptor 3 (`DC_WORKER_FD`), never over stdout, because user code prints. Each frame is a
//! 4-byte big-endian length followed by that many bytes of CBOR: one [`FromWorker`] or
//! [`ToWorker`] message, serde's externally tagged enum form (`{"Job": {...}}`, `"Ready"`).
//! `docs/worker-protocol.md` is the full description, for writing a worker in another language.

use std::borrow::Cow;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Name sent in the handshake.
pub const PROTOCOL_NAME: &str = "dc-worker";
/// Version of this protocol; the agent refuses a worker that speaks another.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts (1 GiB); a longer length prefix is taken as garbage.
pub const MAX_FRAME: usize = 1 << 30;
/// The hidden sub-command under which a node binary serves as a worker process.
pub const WORKER_SUBCOMMAND: &str = "__dc-worker";

/// Bytes in a frame: borrowed when the agent sends them (no copy of a big job), owned when
/// decoded. Always a CBOR byte string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload<'a>(pub Cow<'a, [u8]>);

impl<'a> Payload<'a> {
    /// Borrow `bytes` for sending.
    pub fn borrowed(bytes: &'a [u8]) -> Self {
        Payload(Cow::Borrowed(bytes))
    }
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for Payload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Payload<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let buf = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Payload(Cow::Owned(buf.into_vec())))
    }
}

/// Agent → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker<'a> {
    /// Build the worker. Answered by `Ready`, `InitError` or `UnknownKind`.
    Init {
        /// `Worker::KIND` to build.
        kind: String,
        /// `Worker::Init`, CBOR.
        init: Payload<'a>,
        /// The node.
        node_id: String,
        /// This worker: `<node>/<slot>`.
        worker_id: String,
        /// Index on the node.
        slot: u32,
        /// GPU UUIDs it was given.
        devices: Vec<String>,
    },
    /// Run one job. Answered by `Result` or `JobError`.
    Job {
        /// The job's id.
        job_id: u64,
        /// Which attempt this is.
        attempt: u32,
        /// `Worker::Job`, CBOR.
        payload: Payload<'a>,
    },
    /// Apply one update. Answered by `UpdateApplied` or `UpdateError`.
    Update {
        /// Its place in the log (1, 2, 3…).
        seq: u64,
        /// `Worker::Update`, CBOR.
        payload: Payload<'a>,
    },
    /// Exit cleanly now.
    Shutdown,
}

/// Worker → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// First frame of every worker: the handshake.
    Hello {
        /// Always [`PROTOCOL_NAME`].
        protocol: String,
        /// [`PROTOCOL_VERSION`] of the worker.
        version: u32,
        /// The worker's pid.
        pid: u32,
        /// Worker kinds this program can build.
        kinds: Vec<String>,
    },
    /// The worker is built and waits for jobs.
    Ready,
    /// `Worker::new` failed (or the init data did not decode).
    InitError {
        /// Why.
        message: String,
    },
    /// This program has no such worker kind.
    UnknownKind {
        /// The kinds it has.
        known: Vec<String>,
    },
    /// A job's output.
    Result {
        /// The job's id.
        job_id: u64,
        /// `Worker::Output`, CBOR.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A job failed; it is not retried.
    JobError {
        /// The job's id.
        job_id: u64,
        /// The worker's message.
        message: String,
        /// True when the payload did not decode as the worker's `Job` type.
        undecodable: bool,
    },
    /// An update was applied.
    UpdateApplied {
        /// Its sequence number.
        seq: u64,
    },
    /// An update could not be applied (bad CBOR or `handle_update` failed).
    UpdateError {
        /// Its sequence number.
        seq: u64,
        /// Why.
        message: String,
    },
}

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The other side closed the channel.
    #[error("channel closed")]
    Closed,
    /// An I/O error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A length prefix beyond [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit (garbage on the channel?)")]
    TooLarge(usize),
    /// The bytes were not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Encode a message as one frame (length prefix included).
///
/// # Errors
/// When the message does not serialise or exceeds [`MAX_FRAME`].
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(msg, &mut buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    buf[..4].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Encode a message whose last field is an empty byte string as the head of a frame whose last
/// field is `len` bytes long: the length prefix and the CBOR up to and including the byte
/// string's header. Writing the head, then the bytes themselves, sends the same frame as
/// [`encode_frame`] of the full message without copying the bytes into it (64 MiB job
/// payloads and results go to and from workers this way).
///
/// # Errors
/// When the message does not serialise, does not end with an empty byte string, or the frame
/// would exceed [`MAX_FRAME`].
pub fn encode_frame_head<T: Serialize>(msg: &T, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(msg, &mut buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    if buf.pop() != Some(0x40) {
        return Err(FrameError::Decode(
            "a frame head needs a message ending with an empty byte string".into(),
        ));
    }
    write_head(&mut buf, 2, len as u64);
    let total = buf.len() - 4 + len;
    if total > MAX_FRAME {
        return Err(FrameError::TooLarge(total));
    }
    let prefix = u32::try_from(total).map_err(|_| FrameError::TooLarge(total))?;
    buf[..4].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// A CBOR item header: major type and argument, shortest form (as ciborium writes it).
fn write_head(buf: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    // Big-endian: the argument's low bytes are the slice's tail.
    let bytes = arg.to_be_bytes();
    match arg {
        0..=23 => buf.push(m | bytes[7]),
        24..=0xff => buf.extend_from_slice(&[m | 24, bytes[7]]),
        0x100..=0xffff => {
            buf.push(m | 25);
            buf.extend_from_slice(&bytes[6..]);
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(m | 26);
            buf.extend_from_slice(&bytes[4..]);
        }
        _ => {
            buf.push(m | 27);
            buf.extend_from_slice(&bytes);
        }
    }
}

/// Reads the few CBOR items of a `Job` or `Result` frame in place.
struct Items<'a> {
    body: &'a [u8],
    at: usize,
}

impl Items<'_> {
    fn head(&mut self) -> Option<(u8, u64)> {
        let first = *self.body.get(self.at)?;
        let size = match first & 31 {
            n @ 0..=23 => {
                self.at += 1;
                return Some((first >> 5, u64::from(n)));
            }
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        let bytes = self.body.get(self.at + 1..self.at + 1 + size)?;
        self.at += 1 + size;
        Some((
            first >> 5,
            bytes.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)),
        ))
    }

    fn text(&mut self, want: &str) -> Option<()> {
        let (3, len) = self.head()? else { return None };
        let end = self.at.checked_add(usize::try_from(len).ok()?)?;
        (self.body.get(self.at..end)? == want.as_bytes()).then(|| self.at = end)
    }
}

/// Where the byte string ends a message `{variant: {fields…}}` whose fields are unsigned
/// integers but the last, a byte string running to the end of `body`: the integers, and the
/// offset of the bytes. `None` for any other layout (then decode the body in full).
fn trailing_bytes<const N: usize>(
    body: &[u8],
    variant: &str,
    fields: [&str; N],
    last: &str,
) -> Option<([u64; N], usize)> {
    let mut items = Items { body, at: 0 };
    if items.head()? != (5, 1) {
        return None;
    }
    items.text(variant)?;
    if items.head()? != (5, N as u64 + 1) {
        return None;
    }
    let mut values = [0u64; N];
    for (value, name) in values.iter_mut().zip(fields) {
        items.text(name)?;
        let (0, v) = items.head()? else { return None };
        *value = v;
    }
    items.text(last)?;
    let (2, len) = items.head()? else { return None };
    (u64::try_from(body.len() - items.at).ok()? == len).then_some((values, items.at))
}

/// A `Job` frame body as [`encode_frame_head`] writes it: job id, attempt, and the offset of
/// the payload, which runs to the end of the body. `None` when the body is something else.
pub fn split_job(body: &[u8]) -> Option<(u64, u64, usize)> {
    trailing_bytes(body, "Job", ["job_id", "attempt"], "payload")
        .map(|([id, att], at)| (id, att, at))
}

/// A `Result` frame body: job id and the offset of the output, which runs to the end of the
/// body. `None` when the body is something else (a worker may order its fields otherwise).
pub fn split_result(body: &[u8]) -> Option<(u64, usize)> {
    trailing_bytes(body, "Result", ["job_id"], "payload").map(|([id], at)| (id, at))
}

/// Decode a frame body.
///
/// # Errors
/// [`FrameError::Decode`] when it is not a valid message.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    ciborium::from_reader(body).map_err(|e| FrameError::Decode(e.to_string()))
}

fn checked_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Read one frame, blocking (the worker side).
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of the channel; the other variants for garbage.
pub fn read_frame_blocking<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<T, FrameError> {
    decode_body(&read_body_blocking(r)?)
}

/// Read one frame's body, undecoded, blocking (the worker side).
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of the channel; the other variants for garbage.
pub fn read_body_blocking(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Write one frame, blocking (the worker side).
///
/// # Errors
/// On I/O failure or an oversize message.
pub fn write_frame_blocking<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Read one frame (the agent side).
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of the channel; the other variants for garbage.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    decode_body(&read_body(r).await?)
}

/// Read one frame's body, undecoded (the agent side).
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of the channel; the other variants for garbage.
pub async fn read_body(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Write one frame (the agent side).
///
/// # Errors
/// On I/O failure or an oversize message.
pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ToWorker::Job {
            job_id: 7,
            attempt: 2,
            payload: Payload::borrowed(&[1, 2, 3]),
        };
        let frame = encode_frame(&msg).expect("encode");
        assert_eq!(
            u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
            frame.len() - 4
        );
        let back: ToWorker<'static> = read_frame_blocking(&mut &frame[..]).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn frame_heads_plus_bytes_are_the_whole_frames() {
        for len in [0usize, 1, 23, 24, 255, 256, 65_535, 65_536, 1 << 20] {
            let payload = vec![0x5Au8; len];
            for (job_id, attempt) in [(0u64, 1u32), (23, 24), (1 << 40, u32::MAX)] {
                let whole = encode_frame(&ToWorker::Job {
                    job_id,
                    attempt,
                    payload: Payload::borrowed(&payload),
                })
                .expect("encode");
                let mut split = encode_frame_head(
                    &ToWorker::Job {
                        job_id,
                        attempt,
                        payload: Payload::borrowed(&[]),
                    },
                    len,
                )
                .expect("head");
                split.extend_from_slice(&payload);
                assert_eq!(split, whole, "Job of {len} bytes");
                let (id, att, at) = split_job(&whole[4..]).expect("a Job");
                assert_eq!((id, att), (job_id, u64::from(attempt)));
                assert_eq!(&whole[4 + at..], &payload[..]);

                let whole = encode_frame(&FromWorker::Result {
                    job_id,
                    payload: payload.clone(),
                })
                .expect("encode");
                let mut split = encode_frame_head(
                    &FromWorker::Result {
                        job_id,
                        payload: Vec::new(),
                    },
                    len,
                )
                .expect("head");
                split.extend_from_slice(&payload);
                assert_eq!(split, whole, "Result of {len} bytes");
                let (id, at) = split_result(&whole[4..]).expect("a Result");
                assert_eq!(id, job_id);
                assert_eq!(&whole[4 + at..], &payload[..]);
            }
        }
    }

    #[test]
    fn other_layouts_are_not_split() {
        let update = encode_frame(&ToWorker::Update {
            seq: 1,
            payload: Payload::borrowed(b"x"),
        })
        .expect("encode");
        assert_eq!(split_job(&update[4..]), None);
        assert_eq!(split_result(&update[4..]), None);
        let error = encode_frame(&FromWorker::JobError {
            job_id: 1,
            message: "no".into(),
            undecodable: false,
        })
        .expect("encode");
        assert_eq!(split_result(&error[4..]), None);
        // A Result whose fields come in another order (another language's encoder), cut short,
        // or with bytes after the payload: decoded in full, not split.
        let swapped: Vec<u8> = [
            &[0xa1, 0x66][..],
            b"Result",
            &[0xa2, 0x67],
            b"payload",
            &[0x41, 0x07, 0x66],
            b"job_id",
            &[0x01],
        ]
        .concat();
        assert_eq!(split_result(&swapped), None);
        let whole = encode_frame(&FromWorker::Result {
            job_id: 3,
            payload: vec![1, 2, 3],
        })
        .expect("encode");
        assert_eq!(split_result(&whole[4..whole.len() - 1]), None);
        let mut longer = whole[4..].to_vec();
        longer.push(0);
        assert_eq!(split_result(&longer), None);
        for cut in 0..whole.len() - 4 {
            assert_eq!(split_result(&whole[4..4 + cut]), None, "cut at {cut}");
            assert_eq!(split_job(&whole[4..4 + cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let huge = [0xffu8, 0xff, 0xff, 0xff, 1, 2];
        assert!(matches!(
            read_frame_blocking::<FromWorker>(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        let bad = [0u8, 0, 0, 3, 0xff, 0x00, 0x13];
        assert!(matches!(
            read_frame_blocking::<FromWorker>(&mut &bad[..]),
            Err(FrameError::Decode(_))
        ));
        let empty: [u8; 0] = [];
        assert!(matches!(
            read_frame_blocking::<FromWorker>(&mut &empty[..]),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn byte_payloads_are_cbor_byte_strings() {
        let frame = encode_frame(&FromWorker::Result {
            job_id: 1,
            payload: vec![0xAB; 1000],
        })
        .expect("encode");
        // A byte string costs 1000 bytes plus a small header, not one CBOR item per byte.
        assert!(frame.len() < 1100, "frame is {} bytes", frame.len());
    }
}

#[cfg(test)]
mod wire_examples {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The byte-exact examples quoted in docs/worker-protocol.md.
    #[test]
    fn documented_frames_are_exact() {
        let frames: Vec<(&str, Vec<u8>)> = vec![
            ("shutdown", encode_frame(&ToWorker::Shutdown).expect("enc")),
            ("ready", encode_frame(&FromWorker::Ready).expect("enc")),
            (
                "job",
                encode_frame(&ToWorker::Job {
                    job_id: 1,
                    attempt: 1,
                    payload: Payload::borrowed(&[0x18, 0x2a]),
                })
                .expect("enc"),
            ),
            (
                "result",
                encode_frame(&FromWorker::Result {
                    job_id: 1,
                    payload: vec![0x18, 0x54],
                })
                .expect("enc"),
            ),
            (
                "hello",
                encode_frame(&FromWorker::Hello {
                    protocol: PROTOCOL_NAME.into(),
                    version: 1,
                    pid: 7,
                    kinds: vec!["sweep".into()],
                })
                .expect("enc"),
            ),
        ];
        let want = [
            ("shutdown", "000000096853687574646f776e"),
            ("ready", "00000006655265616479"),
            (
                "job",
                "00000022a1634a6f62a3666a6f625f69640167617474656d707401677061796c6f616442182a",
            ),
            (
                "result",
                "0000001ca166526573756c74a2666a6f625f696401677061796c6f6164421854",
            ),
            (
                "hello",
                "00000036a16548656c6c6fa46870726f746f636f6c6964632d776f726b65726776657273696f6e016370696407656b696e647381657377656570",
            ),
        ];
        for ((name, frame), (want_name, want_hex)) in frames.iter().zip(want) {
            assert_eq!(*name, want_name);
            assert_eq!(
                hex(frame),
                want_hex,
                "{name} frame changed: update docs/worker-protocol.md"
            );
        }
    }
}
