//! GPU enumeration and isolated worker processes for distributed-computing.
//!
//! - [`discover`] finds the GPUs a node may use: NVML loaded at run time (no driver means no
//!   GPU and one log line, never a crash), `DC_FAKE_GPUS=N` for N fake devices in tests, and an
//!   inherited `CUDA_VISIBLE_DEVICES` restricting the set the way CUDA parses it.
//! - [`worker_env`] is the environment that pins one worker process to one device.
//! - [`proc`] (the `dc-proc` crate, re-exported) spawns worker processes in their own process
//!   group with a parent-death signal and stops them TERM → grace → KILL.
//!
//! This crate never initialises CUDA itself: `CUDA_VISIBLE_DEVICES` only counts before that.

mod devices;
pub use dc_proc as proc;

pub use devices::*;
