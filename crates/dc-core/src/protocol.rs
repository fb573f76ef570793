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
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
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
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut body)?;
    decode_body(&body)
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
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut body).await?;
    decode_body(&body)
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
