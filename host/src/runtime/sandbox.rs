//! The sandbox a plugin instance runs in: a CPU deadline per call, memory and table limits,
//! and only the WASI capabilities the job grants — by default none: no files, network,
//! environment variables or inherited stdio. What a plugin writes to stdout or stderr is
//! captured per call and logged, tagged with the plugin and the task.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::replay::{Determinism, Moment};

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Bytes of stdout plus stderr kept per plugin call; the rest is counted and dropped, so a
/// plugin that prints without end cannot exhaust the host's memory or log.
const OUTPUT_PER_CALL: usize = 64 * 1024;

/// How a plugin call's CPU time is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLimit {
    /// Wall-clock deadline by epoch interruption (the default; see docs/BENCHMARKS.md for why).
    Epoch,
    /// A budget of fuel (roughly, Wasm instructions) per call.
    Fuel(u64),
    /// No bound: only for measuring what the others cost.
    Unbounded,
}

/// Limits and capabilities of a job's plugin instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// How plugin calls are bounded; with `Epoch`, by `deadline`.
    pub cpu: CpuLimit,
    /// How long one plugin call (one partition task) may run.
    pub deadline: Duration,
    /// Linear memory per instance, in bytes.
    pub max_memory: u64,
    /// Elements per table (function tables), per instance.
    pub max_table_elements: u32,
    /// Core instances, tables and memories a component may create (a component holds several).
    pub max_instances: u32,
    /// Bytes the host copies out of one plugin call's result, at most.
    pub max_output_bytes: u64,
    /// Bytes the host copies out of all of one batch's plugin calls together, at most.
    pub max_batch_output_bytes: u64,
    /// Environment variables the plugin may read.
    pub env: Vec<(String, String)>,
    /// Host directories the plugin may read, and where it sees them.
    pub dirs: Vec<GrantedDir>,
    /// The clocks and randomness plugins read.
    pub determinism: Determinism,
}

/// A host directory granted read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedDir {
    pub host: PathBuf,
    /// The path the plugin opens it by.
    pub guest: String,
}

impl Default for Sandbox {
    fn default() -> Sandbox {
        Sandbox {
            cpu: CpuLimit::Epoch,
            deadline: Duration::from_secs(30),
            max_memory: 256 << 20,
            max_table_elements: 100_000,
            max_instances: 64,
            // Twice the default memory: a result's host-side form (vectors, options) is
            // larger than its encoding in the plugin's memory, and an honest plugin cannot
            // return more than its memory holds — unless its results alias one buffer.
            max_output_bytes: 512 << 20,
            max_batch_output_bytes: 1 << 30,
            env: Vec::new(),
            dirs: Vec::new(),
            determinism: Determinism::default(),
        }
    }
}

impl Sandbox {
    /// Epoch ticks a call may run: the deadline rounded up, plus one for the tick in progress.
    pub fn deadline_ticks(&self) -> u64 {
        self.deadline.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64 + 1
    }

    /// The limits of one instance.
    pub fn limits(&self) -> InstanceLimits {
        InstanceLimits {
            max_memory: usize::try_from(self.max_memory).unwrap_or(usize::MAX),
            max_table_elements: self.max_table_elements as usize,
            max_instances: self.max_instances as usize,
            memory: 0,
            table_elements: 0,
        }
    }

    /// The WASI context of one instance: only what the job granted, with stdout and stderr
    /// going to `output`, and clocks and randomness following `moment` (unless granted).
    pub fn wasi(&self, output: &CapturedOutput, moment: &Moment) -> Result<WasiCtx> {
        let mut builder = WasiCtxBuilder::new();
        builder.stdout(output.clone()).stderr(output.clone());
        self.determinism.install(&mut builder, moment);
        for (key, value) in &self.env {
            builder.env(key, value);
        }
        for dir in &self.dirs {
            builder
                .preopened_dir(&dir.host, &dir.guest, FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot grant directory {} to the plugin", dir.host.display()))?;
        }
        Ok(builder.build())
    }
}

/// The limits of one plugin instance over all its memories and tables together. A component
/// holds several core instances, and multi-memory lets one module declare many memories: a
/// limit per memory (wasmtime's `StoreLimits`) would let one instance reach many times
/// `--max-memory`.
#[derive(Debug)]
pub struct InstanceLimits {
    max_memory: usize,
    max_table_elements: usize,
    max_instances: usize,
    /// Bytes of every linear memory of the instance, as they are now.
    memory: usize,
    /// Elements of every table of the instance, as they are now.
    table_elements: usize,
}

impl InstanceLimits {
    /// Bytes of every linear memory of the instance, as they are now.
    pub fn memory(&self) -> usize {
        self.memory
    }
}

/// A memory or table that would grow past the instance's limit. Returned from the limiter, it
/// makes the growing instruction (or the instantiation) trap with this error.
#[derive(Debug, thiserror::Error)]
#[error("its {what} would grow to {wanted} {unit} in all, past the limit of {limit} ({flag})")]
pub struct LimitExceeded {
    pub what: &'static str,
    pub wanted: usize,
    pub limit: usize,
    pub unit: &'static str,
    pub flag: &'static str,
}

/// One memory or table growing from `current` to `desired`: the instance's total of that
/// resource (`used`, over all its memories or tables) must stay within `limit`.
fn grow_within(
    used: &mut usize,
    limit: usize,
    current: usize,
    desired: usize,
    (what, unit, flag): (&'static str, &'static str, &'static str),
) -> wasmtime::Result<bool> {
    let total = (*used - current.min(*used)).saturating_add(desired);
    if total > limit {
        return Err(LimitExceeded { what, wanted: total, limit, unit, flag }.into());
    }
    *used = total;
    Ok(true)
}

impl ResourceLimiter for InstanceLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let what = ("linear memory", "bytes", "--max-memory");
        grow_within(&mut self.memory, self.max_memory, current, desired, what)
    }

    /// A refused grow traps, saying why: a plugin's allocator would otherwise abort with a
    /// bare `unreachable`.
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let what = ("tables", "elements", "--max-table-elements");
        grow_within(&mut self.table_elements, self.max_table_elements, current, desired, what)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_instances
    }

    fn memories(&self) -> usize {
        self.max_instances
    }
}

/// Advances an engine's epoch every [`EPOCH_TICK`] until dropped, so calls past their deadline
/// trap. One thread per loaded plugin; cheaper than fuel, which instruments every loop.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("cannot start the plugin deadline thread")?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A plugin's stdout and stderr, kept in memory for the call in progress.
#[derive(Debug, Clone, Default)]
pub struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl CapturedOutput {
    /// What the plugin wrote since the last call to this, and how many bytes were dropped.
    pub fn take(&self) -> (Vec<u8>, usize) {
        let mut captured = self.inner.lock().expect("not poisoned");
        (std::mem::take(&mut captured.bytes), std::mem::take(&mut captured.dropped))
    }

    fn write(&self, bytes: &[u8]) {
        let mut captured = self.inner.lock().expect("not poisoned");
        let room = OUTPUT_PER_CALL.saturating_sub(captured.bytes.len());
        let kept = bytes.len().min(room);
        captured.bytes.extend_from_slice(&bytes[..kept]);
        captured.dropped += bytes.len() - kept;
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        CapturedOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accepts (excess is dropped and counted), so a plugin never blocks or fails
        // on output.
        Ok(OUTPUT_PER_CALL)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        CapturedOutput::write(&self, bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
