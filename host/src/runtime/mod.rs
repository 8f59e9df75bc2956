//! The Wasm runtime: loads a plugin component once, checks it against the contract, and hands
//! out isolated instances, one per worker.
//!
//! [`PluginRuntime`] is the one type that knows about wasmtime; the engine sees only the
//! calls of [`PluginInstance`], whatever world (transform, stateful, windowed) the plugin is. Sandbox limits (fuel, epochs, memory) and upgrades attach here.

mod bindings;
mod exports;
mod lift;
pub mod replay;
pub mod sandbox;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use bindings::{
    BatchContext, Header, InputRecord, KeyGroup, KeyUpdate, KeyedValue, Level, OutputRecord, PluginError, PluginInfo,
    Rejection, StateChange, WORLDS,
};
use bindings::{transformer, updater, windower};
use exports::{Exports, Outcome};
pub use lift::OutputTooLarge;
use lift::{OutputBudget, within};
pub use replay::Determinism;
use replay::Moment;
use sandbox::{CapturedOutput, EpochTicker, InstanceLimits, LimitExceeded};
pub use sandbox::{CpuLimit, GrantedDir, Sandbox};

/// What a plugin does, by the world it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// `transformer`: records in, records out, no state.
    Transform,
    /// `updater`: keyed state across batches (`updateStateByKey`, `mapWithState`).
    Stateful,
    /// `windower`: keyed aggregates over sliding windows (`reduceByKeyAndWindow`).
    Windowed,
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Transform => "transform",
            PluginKind::Stateful => "stateful",
            PluginKind::Windowed => "windowed",
        })
    }
}

/// Who a loaded plugin is: its own description plus the digest of its exact bytes, so logs
/// (and later the checkpoint) can tell two builds of the same version apart.
#[derive(Debug, Clone)]
pub struct PluginIdentity {
    /// Name, version and state schema version, as the plugin's `describe` reports them.
    pub info: PluginInfo,
    /// SHA-256 of the component file, hex-encoded.
    pub digest: String,
}

impl fmt::Display for PluginIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (sha256 {})", self.info.name, self.info.version, &self.digest[..12])
    }
}

/// A compiled, validated plugin from which instances are made.
pub struct PluginRuntime {
    pre: Pre,
    config: Vec<(String, String)>,
    identity: PluginIdentity,
    sandbox: Sandbox,
    /// What the host takes from this plugin's calls: per call, and per batch across them.
    budget: Arc<OutputBudget>,
    /// Advances the epoch that call deadlines count in; stops when the runtime is dropped.
    _ticker: Option<EpochTicker>,
}

impl PluginRuntime {
    /// Reads, compiles and validates the component at `path`, then makes one instance and calls
    /// its `init` with `config`, so that a bad plugin or a bad configuration is refused before
    /// the job touches Kafka.
    pub fn load(
        path: &Path,
        config: Vec<(String, String)>,
        sandbox: Sandbox,
    ) -> Result<(PluginRuntime, PluginInstance)> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read plugin {}", path.display()))?;
        Self::from_bytes(&bytes, config, sandbox).with_context(|| format!("plugin {}", path.display()))
    }

    /// As [`PluginRuntime::load`], for a component already in memory.
    pub fn from_bytes(
        bytes: &[u8],
        config: Vec<(String, String)>,
        sandbox: Sandbox,
    ) -> Result<(PluginRuntime, PluginInstance)> {
        check_is_component(bytes)?;
        let engine = engine(sandbox.cpu)?;
        let component = Component::new(&engine, bytes).map_err(|e| wasm_error(e, "is not a valid Wasm component"))?;

        let mut linker = Linker::<InstanceState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| wasm_error(e, "cannot link WASI"))?;
        transformer::sluice::plugin::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| wasm_error(e, "cannot link the Sluice host interface"))?;
        let pre = Pre::new(&linker, &component).map_err(|e| {
            let exports: Vec<String> =
                component.component_type().exports(&engine).map(|(name, _)| name.to_string()).collect();
            anyhow!(
                "is not a component of any Sluice world ({}): {e:#}; it exports [{}]",
                WORLDS.join(", "),
                exports.join(", ")
            )
        })?;

        let digest = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let mut runtime = PluginRuntime {
            _ticker: match sandbox.cpu {
                CpuLimit::Epoch => Some(EpochTicker::start(engine.clone())?),
                _ => None,
            },
            pre,
            config,
            identity: PluginIdentity { info: placeholder_info(), digest },
            budget: Arc::new(OutputBudget::new(
                usize::try_from(sandbox.max_output_bytes).unwrap_or(usize::MAX),
                usize::try_from(sandbox.max_batch_output_bytes).unwrap_or(usize::MAX),
            )),
            sandbox,
        };
        let mut first = runtime.instantiate()?;
        runtime.identity.info = first.describe()?;
        first.identity = runtime.identity.clone();
        Ok((runtime, first))
    }

    /// Who this plugin is.
    pub fn identity(&self) -> &PluginIdentity {
        &self.identity
    }

    /// The configuration its instances were initialised with.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// A new batch starts: its calls share the batch's output budget afresh.
    pub fn begin_batch(&self) {
        self.budget.reset();
    }

    /// What this plugin does.
    pub fn kind(&self) -> PluginKind {
        match self.pre {
            Pre::Transform(_) => PluginKind::Transform,
            Pre::Stateful(_) => PluginKind::Stateful,
            Pre::Windowed(_) => PluginKind::Windowed,
        }
    }

    /// A fresh, initialised instance with its own store: for one worker, never shared.
    pub fn instantiate(&self) -> Result<PluginInstance> {
        let mut store = Store::new(self.pre.engine(), InstanceState::new(&self.sandbox)?);
        store.data_mut().plugin = self.identity.info.name.clone();
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        store.data().begin_call(NO_BATCH.0, NO_BATCH.1);
        // Instantiation and `init` run under the same bound as every call.
        let deadline_ticks = self.sandbox.deadline_ticks();
        arm(&mut store, self.sandbox.cpu, deadline_ticks);
        let instance = match &self.pre {
            Pre::Transform(pre) => pre.instance_pre().instantiate(&mut store),
            Pre::Stateful(pre) => pre.instance_pre().instantiate(&mut store),
            Pre::Windowed(pre) => pre.instance_pre().instantiate(&mut store),
        }
        .map_err(|e| anyhow!("cannot instantiate: {e:#}"))?;
        let bindings = match &self.pre {
            Pre::Transform(_) => transformer::Transformer::new(&mut store, &instance).map(Bindings::Transform),
            Pre::Stateful(_) => updater::Updater::new(&mut store, &instance).map(Bindings::Stateful),
            Pre::Windowed(_) => windower::Windower::new(&mut store, &instance).map(Bindings::Windowed),
        }
        .map_err(|e| anyhow!("cannot instantiate: {e:#}"))?;
        let exports = Exports::find(&mut store, &instance, self.kind())?;
        let init = match &bindings {
            Bindings::Transform(b) => b.call_init(&mut store, &self.config),
            Bindings::Stateful(b) => b.call_init(&mut store, &self.config),
            Bindings::Windowed(b) => b.call_init(&mut store, &self.config),
        };
        let mut instance = PluginInstance {
            store,
            bindings,
            exports,
            budget: self.budget.clone(),
            identity: self.identity.clone(),
            cpu: self.sandbox.cpu,
            deadline_ticks,
        };
        // What `init` printed is logged like any call's output, and a crash in it says why.
        let printed = instance.log_output();
        init.map_err(|trap| {
            let (kind, message) = classify(&trap, deadline_ticks);
            match (kind, last_words(&printed)) {
                (FailureKind::Trap, Some(said)) => anyhow!("failed in init: {said} ({message})"),
                _ => anyhow!("failed in init: {message}"),
            }
        })?
        .map_err(|error| anyhow!("refused its configuration: {}", describe_error(&error)))?;
        Ok(instance)
    }
}

/// A component checked against one of the plugin worlds, ready to instantiate.
enum Pre {
    Transform(transformer::TransformerPre<InstanceState>),
    Stateful(updater::UpdaterPre<InstanceState>),
    Windowed(windower::WindowerPre<InstanceState>),
}

impl Pre {
    /// Matches the component against each world in turn; the error is the transform world's,
    /// the kind most plugins are.
    fn new(linker: &Linker<InstanceState>, component: &Component) -> wasmtime::Result<Pre> {
        let pre = linker.instantiate_pre(component)?;
        if let Ok(stateful) = updater::UpdaterPre::new(pre.clone()) {
            return Ok(Pre::Stateful(stateful));
        }
        if let Ok(windowed) = windower::WindowerPre::new(pre.clone()) {
            return Ok(Pre::Windowed(windowed));
        }
        transformer::TransformerPre::new(pre).map(Pre::Transform)
    }

    fn engine(&self) -> &Engine {
        match self {
            Pre::Transform(pre) => pre.engine(),
            Pre::Stateful(pre) => pre.engine(),
            Pre::Windowed(pre) => pre.engine(),
        }
    }
}

/// An instance's exports, by world.
enum Bindings {
    Transform(transformer::Transformer),
    Stateful(updater::Updater),
    Windowed(windower::Windower),
}

/// What `process` made of one partition task, whatever the plugin's kind.
#[derive(Debug, Default)]
pub struct TaskOutput {
    /// Records to deliver.
    pub outputs: Vec<OutputRecord>,
    pub rejections: Vec<Rejection>,
    /// Keyed values for state or windows (none from a transform).
    pub values: Vec<KeyedValue>,
}

/// One instantiated plugin with its own memory. Used by one worker at a time.
pub struct PluginInstance {
    store: Store<InstanceState>,
    /// `init` and `describe`.
    bindings: Bindings,
    /// The batch functions, with bounded results.
    exports: Exports,
    budget: Arc<OutputBudget>,
    identity: PluginIdentity,
    cpu: CpuLimit,
    /// The call deadline, in epoch ticks.
    deadline_ticks: u64,
}

impl PluginInstance {
    /// Bytes of the instance's linear memories, as they are now.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limits.memory()
    }
}

/// Why a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned a `plugin-error`.
    PluginError,
    /// The plugin trapped: a panic, `unreachable`, an out-of-bounds access.
    Trap,
    /// The call ran past the job's deadline and was interrupted.
    Deadline,
    /// The plugin tried to grow its memory (or a table) past the job's limit.
    Memory,
}

impl FailureKind {
    /// The name used in logs and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::PluginError => "plugin-error",
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed plugin call. A call that trapped (any kind but `PluginError`) leaves its instance
/// unusable; the engine replaces it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {plugin} failed on {task} ({kind}): {message}")]
pub struct TaskError {
    pub kind: FailureKind,
    pub plugin: String,
    pub task: String,
    pub message: String,
}

impl TaskError {
    /// Whether the instance that failed must be replaced before its next call.
    pub fn poisons_instance(&self) -> bool {
        self.kind != FailureKind::PluginError
    }
}

impl PluginInstance {
    /// Runs one partition task through the plugin's `process`.
    pub fn process(&mut self, ctx: &BatchContext, records: &[InputRecord]) -> Result<TaskOutput, TaskError> {
        let task = format!(
            "{}:{} [{}, {}) of batch {} ms",
            ctx.topic, ctx.partition, ctx.from_offset, ctx.until_offset, ctx.batch_time
        );
        self.store.data_mut().task = format!("{}:{}", ctx.topic, ctx.partition);
        let result = self.call((ctx.batch_time, ctx.partition), |exports, store| match exports {
            Exports::Transform { .. } => exports.process(store, ctx, records).map(|outcome| {
                outcome.map(|r| {
                    r.map(|output| TaskOutput {
                        outputs: output.outputs,
                        rejections: output.rejections,
                        values: Vec::new(),
                    })
                })
            }),
            _ => exports.keyed_process(store, ctx, records).map(|outcome| {
                outcome.map(|r| {
                    r.map(|output| TaskOutput {
                        outputs: output.outputs,
                        rejections: output.rejections,
                        values: output.values,
                    })
                })
            }),
        });
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "process"))?;
        self.outcome(task, result)
    }

    /// Runs one state partition's key groups through a stateful plugin's `update`.
    pub fn update(&mut self, ctx: &BatchContext, groups: &[KeyGroup]) -> Result<Vec<KeyUpdate>, TaskError> {
        let task = format!("state partition {} of batch {} ms", ctx.partition, ctx.batch_time);
        self.store.data_mut().task = format!("state:{}", ctx.partition);
        let result = self.call((ctx.batch_time, ctx.partition), |exports, store| exports.update(store, ctx, groups));
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "update"))?;
        let updates = self.outcome(task.clone(), result)?;
        if updates.len() != groups.len() {
            return Err(TaskError {
                kind: FailureKind::PluginError,
                plugin: self.identity.info.name.clone(),
                task,
                message: format!("answered {} key updates for {} key groups", updates.len(), groups.len()),
            });
        }
        Ok(updates)
    }

    /// Re-encodes states of schema `from_version` with a stateful plugin's `migrate`.
    pub fn migrate(&mut self, from_version: u32, states: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, TaskError> {
        let task = format!("migrating {} states from schema version {from_version}", states.len());
        let result = self.call(NO_BATCH, |exports, store| exports.migrate(store, from_version, states));
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "migrate"))?;
        let migrated = self.outcome(task.clone(), result)?;
        self.check_count(task, migrated, states.len())
    }

    /// Folds each list of values into one with a windowed plugin's `reduce`.
    pub fn reduce(&mut self, lists: &[Vec<Vec<u8>>]) -> Result<Vec<Vec<u8>>, TaskError> {
        let task = format!("reducing {} window values", lists.len());
        let result = self.call(NO_BATCH, |exports, store| exports.reduce(store, lists));
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "reduce"))?;
        let reduced = self.outcome(task.clone(), result)?;
        self.check_count(task, reduced, lists.len())
    }

    /// A windowed plugin's `inverse-reduce`, or `None` if it has none.
    pub fn inverse_reduce(&mut self, pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<Option<Vec<Vec<u8>>>, TaskError> {
        let task = format!("inverse-reducing {} window values", pairs.len());
        let result = self.call(NO_BATCH, |exports, store| exports.inverse_reduce(store, pairs));
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "inverse-reduce"))?;
        match self.outcome(task.clone(), result)? {
            Some(values) => self.check_count(task, values, pairs.len()).map(Some),
            None => Ok(None),
        }
    }

    /// Turns one state partition's window results into records with a windowed plugin's `present`.
    pub fn present(&mut self, ctx: &BatchContext, results: &[KeyedValue]) -> Result<Vec<OutputRecord>, TaskError> {
        let task = format!("window ({}, {}] of state partition {}", ctx.from_offset, ctx.until_offset, ctx.partition);
        let result = self.call((ctx.batch_time, ctx.partition), |exports, store| exports.present(store, ctx, results));
        let result = result.ok_or_else(|| self.wrong_kind(task.clone(), "present"))?;
        self.outcome(task, result)
    }

    /// One call of a batch function: armed with its deadline, its clocks and randomness set
    /// for `at` (the batch and partition it works on), its result lifted within the output
    /// budget. `None` when the plugin's kind has no such function.
    fn call<T>(
        &mut self,
        (batch_time, partition): (i64, i32),
        function: impl FnOnce(&Exports, &mut Store<InstanceState>) -> Option<Outcome<T>>,
    ) -> Option<Outcome<T>> {
        self.store.data().begin_call(batch_time, partition);
        self.arm_deadline();
        let (exports, store, budget) = (&self.exports, &mut self.store, &self.budget);
        let mut missing = false;
        let outcome = within(budget, || match function(exports, store) {
            Some(outcome) => outcome,
            None => {
                missing = true;
                Ok(Err(PluginError::Failed(String::new())))
            }
        });
        (!missing).then_some(outcome)
    }

    /// Starts the CPU bound of a call: the deadline counts from now, whatever time passed
    /// since the last call; fuel is refilled.
    fn arm_deadline(&mut self) {
        arm(&mut self.store, self.cpu, self.deadline_ticks);
    }

    /// Classifies a call's result and logs what the plugin printed during it.
    fn outcome<T>(&mut self, task: String, result: wasmtime::Result<Result<T, PluginError>>) -> Result<T, TaskError> {
        let printed = self.log_output();
        let plugin = self.identity.info.name.clone();
        let (kind, message) = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => (FailureKind::PluginError, describe_error(&error)),
            Err(trap) => {
                let (kind, message) = classify(&trap, self.deadline_ticks);
                // A guest that panics says why on stderr before it traps: that line, not the
                // wasm backtrace alone, is what the error (and a dead letter) should carry.
                match (kind, last_words(&printed)) {
                    (FailureKind::Trap, Some(said)) => (kind, format!("{said} ({message})")),
                    _ => (kind, message),
                }
            }
        };
        Err(TaskError { kind, plugin, task, message })
    }

    /// Logs what the plugin wrote to stdout and stderr during the last call, one line each.
    /// Returns it.
    fn log_output(&mut self) -> String {
        let (bytes, dropped) = self.store.data().output.take();
        if bytes.is_empty() && dropped == 0 {
            return String::new();
        }
        let (plugin, task) = (&self.store.data().plugin, &self.store.data().task);
        let printed = String::from_utf8_lossy(&bytes).into_owned();
        for line in printed.lines().filter(|line| !line.trim().is_empty()) {
            tracing::info!(plugin, task, "output: {line}");
        }
        if dropped > 0 {
            tracing::warn!(plugin, task, "dropped {dropped} more bytes of plugin output");
        }
        printed
    }

    fn check_count<T>(&self, task: String, values: Vec<T>, expected: usize) -> Result<Vec<T>, TaskError> {
        if values.len() == expected {
            return Ok(values);
        }
        let message = format!("answered {} values for {expected} inputs", values.len());
        Err(TaskError { kind: FailureKind::PluginError, plugin: self.identity.info.name.clone(), task, message })
    }

    /// The engine calls only what the plugin's kind offers; this guards the contract.
    fn wrong_kind(&self, task: String, function: &str) -> TaskError {
        let message = format!("has no `{function}`: it is not the kind of plugin this job runs");
        TaskError { kind: FailureKind::PluginError, plugin: self.identity.info.name.clone(), task, message }
    }

    fn describe(&mut self) -> Result<PluginInfo> {
        self.arm_deadline();
        let info = match &self.bindings {
            Bindings::Transform(b) => b.call_describe(&mut self.store),
            Bindings::Stateful(b) => b.call_describe(&mut self.store),
            Bindings::Windowed(b) => b.call_describe(&mut self.store),
        };
        let info = info.map_err(|trap| anyhow!("failed in describe: {}", classify(&trap, self.deadline_ticks).1))?;
        self.store.data_mut().plugin = info.name.clone();
        Ok(info)
    }
}

/// What a plugin printed last before it trapped: a Rust guest's panic message (the line
/// after `panicked at`, or the line itself), a Python traceback's last line.
fn last_words(printed: &str) -> Option<String> {
    let lines: Vec<&str> = printed.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let panicked = lines.iter().position(|line| line.contains("panicked at"));
    let said = match panicked {
        Some(at) => {
            let said = lines[at..].iter().take(2).copied().collect::<Vec<_>>().join(" ");
            // Rust prints `thread '<unnamed>' (1) panicked at FILE:LINE:COL:` then the message.
            said[said.find("panicked at").unwrap_or(0)..].to_string()
        }
        None => lines.last()?.to_string(),
    };
    Some(said.chars().take(500).collect())
}

/// Why a call failed without answering: its deadline, a memory limit, or a trap (with the
/// trap's own message and the plugin's backtrace).
fn classify(trap: &wasmtime::Error, deadline_ticks: u64) -> (FailureKind, String) {
    if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel) {
        (FailureKind::Deadline, "ran out of fuel and was stopped".to_string())
    } else if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
        let limit = deadline_ticks.saturating_sub(1) * sandbox::EPOCH_TICK.as_millis() as u64;
        let limit = humantime::format_duration(Duration::from_millis(limit));
        (FailureKind::Deadline, format!("ran past its deadline of {limit} and was stopped"))
    } else if let Some(exceeded) = trap.downcast_ref::<LimitExceeded>() {
        (FailureKind::Memory, format!("exceeded its memory limit: {exceeded}"))
    } else if let Some(too_large) = trap.downcast_ref::<OutputTooLarge>() {
        (FailureKind::Memory, too_large.to_string())
    } else {
        (FailureKind::Trap, format!("{trap:#}"))
    }
}

/// Arms a store's CPU bound for one call.
fn arm(store: &mut Store<InstanceState>, cpu: CpuLimit, deadline_ticks: u64) {
    match cpu {
        CpuLimit::Epoch => store.set_epoch_deadline(deadline_ticks),
        CpuLimit::Fuel(fuel) => store.set_fuel(fuel).expect("fuel is enabled for this engine"),
        CpuLimit::Unbounded => {}
    }
}

fn describe_error(error: &PluginError) -> String {
    match error {
        PluginError::InvalidConfig(message) => format!("invalid configuration: {message}"),
        PluginError::Failed(message) => message.clone(),
    }
}

fn placeholder_info() -> PluginInfo {
    PluginInfo { name: "<loading>".into(), version: String::new(), state_schema_version: 0 }
}

/// One engine per process would be enough, but loading happens once per job, so a local one
/// keeps the runtime free of globals. The compilation cache makes restarts cheap.
fn engine(cpu: CpuLimit) -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // Compiled code checks the epoch (or fuel) at loop headers and function entries.
    match cpu {
        CpuLimit::Epoch => config.epoch_interruption(true),
        CpuLimit::Fuel(_) => config.consume_fuel(true),
        CpuLimit::Unbounded => &mut config,
    };
    // `SLUICE_PERF_MAP=1` names compiled plugin functions for `perf` (in /tmp/perf-PID.map),
    // so a profile of the host shows where plugin time goes (docs/BENCHMARKS.md).
    if std::env::var_os("SLUICE_PERF_MAP").is_some_and(|value| value != "0") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    match wasmtime::Cache::from_file(None) {
        Ok(cache) => {
            config.cache(Some(cache));
        }
        Err(error) => tracing::debug!("wasmtime compilation cache disabled: {error:#}"),
    }
    Engine::new(&config).map_err(|e| wasm_error(e, "cannot create the Wasm engine"))
}

/// wasmtime has its own error type; this gives it the context anyhow errors carry.
fn wasm_error(error: wasmtime::Error, context: &'static str) -> anyhow::Error {
    anyhow::Error::from(error).context(context)
}

/// Tells apart "not Wasm at all", "a core module" and "a component" before compiling, because
/// wasmtime's own message for the second case does not say what to do about it.
fn check_is_component(bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!("is not a WebAssembly file (no \\0asm header)");
    }
    // Bytes 4..8 hold version and layer: layer 0 is a core module, layer 1 a component.
    if bytes[6..8] == [0, 0] {
        bail!(
            "is a core Wasm module, not a component; build it for wasm32-wasip2 \
             (or wrap it with `wasm-tools component new`)"
        );
    }
    Ok(())
}

/// Where a call outside any batch (`init`, `describe`, `migrate`, `reduce`) stands for its
/// clocks and randomness: epoch zero, no partition. Such calls must not depend on either.
const NO_BATCH: (i64, i32) = (0, -1);

/// Per-instance host state: the sandbox's WASI context and limits, captured output, and what
/// log lines are tagged with.
struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: InstanceLimits,
    output: CapturedOutput,
    /// The call in progress, as the plugin's clocks and randomness see it.
    moment: Moment,
    job_seed: u64,
    plugin: String,
    task: String,
}

impl InstanceState {
    fn new(sandbox: &Sandbox) -> Result<InstanceState> {
        let output = CapturedOutput::default();
        let moment = Moment::default();
        Ok(InstanceState {
            wasi: sandbox.wasi(&output, &moment)?,
            table: ResourceTable::new(),
            limits: sandbox.limits(),
            output,
            moment,
            job_seed: sandbox.determinism.job_seed,
            plugin: String::new(),
            task: String::new(),
        })
    }

    /// A call for `partition` of the batch at `batch_time` (`-1`, `0`: none) is about to start.
    fn begin_call(&self, batch_time: i64, partition: i32) {
        self.moment.set(self.job_seed, batch_time, partition);
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl transformer::sluice::plugin::types::Host for InstanceState {}

impl transformer::sluice::plugin::host::Host for InstanceState {
    fn log(&mut self, level: Level, message: String) {
        let (plugin, task) = (&self.plugin, &self.task);
        match level {
            Level::Trace => tracing::trace!(plugin, task, "{message}"),
            Level::Debug => tracing::debug!(plugin, task, "{message}"),
            Level::Info => tracing::info!(plugin, task, "{message}"),
            Level::Warn => tracing::warn!(plugin, task, "{message}"),
            Level::Error => tracing::error!(plugin, task, "{message}"),
        }
    }
}
