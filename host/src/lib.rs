//! The Sluice engine: direct-Kafka micro-batches through sandboxed Wasm plugins.
//!
//! A job reads Kafka partitions in batches whose offset ranges are fixed before fetching
//! ([`source`]), runs each partition's slice through a plugin component ([`runtime`]) on a
//! bounded pool ([`engine`]), delivers the outputs ([`sinks`]) and only then commits the
//! offsets. [`config`] holds the job's options; [`cli`] the `host` command line.

pub mod admin;
pub mod broker;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod engine;
pub mod failpoint;
pub mod http;
pub mod inspect;
pub mod observe;
pub mod offsets;
pub mod panics;
pub mod report;
pub mod runtime;
pub mod shared_state;
pub mod sinks;
pub mod source;
