//! The Wasm runtime: loads a plugin component once, checks it against the contract, and hands
//! out isolated instances, one per worker.
//!
//! [`PluginRuntime`] is the one type that knows about wasmtime; the engine sees only
//! [`PluginInstance::process`]. Sandbox limits (fuel, epochs, memory) and upgrades attach here.

mod bindings;

use std::fmt;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use bindings::{
    BatchContext, BatchOutput, Header, InputRecord, Level, OutputRecord, PluginError, PluginInfo, Rejection,
    TRANSFORMER_WORLD,
};
use bindings::{Transformer, TransformerPre};

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
    pre: TransformerPre<InstanceState>,
    config: Vec<(String, String)>,
    identity: PluginIdentity,
}

impl PluginRuntime {
    /// Reads, compiles and validates the component at `path`, then makes one instance and calls
    /// its `init` with `config`, so that a bad plugin or a bad configuration is refused before
    /// the job touches Kafka.
    pub fn load(path: &Path, config: Vec<(String, String)>) -> Result<(PluginRuntime, PluginInstance)> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read plugin {}", path.display()))?;
        Self::from_bytes(&bytes, config).with_context(|| format!("plugin {}", path.display()))
    }

    /// As [`PluginRuntime::load`], for a component already in memory.
    pub fn from_bytes(bytes: &[u8], config: Vec<(String, String)>) -> Result<(PluginRuntime, PluginInstance)> {
        check_is_component(bytes)?;
        let engine = engine()?;
        let component = Component::new(&engine, bytes).map_err(|e| wasm_error(e, "is not a valid Wasm component"))?;

        let mut linker = Linker::<InstanceState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| wasm_error(e, "cannot link WASI"))?;
        Transformer::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| wasm_error(e, "cannot link the Sluice host interface"))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(TransformerPre::new)
            .map_err(|e| {
                let exports: Vec<String> =
                    component.component_type().exports(&engine).map(|(name, _)| name.to_string()).collect();
                anyhow!(
                    "is not a {TRANSFORMER_WORLD} component ({e}); it exports [{}]",
                    exports.join(", ")
                )
            })?;

        let digest = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let mut runtime = PluginRuntime {
            pre,
            config,
            identity: PluginIdentity { info: placeholder_info(), digest },
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

    /// A fresh, initialised instance with its own store: for one worker, never shared.
    pub fn instantiate(&self) -> Result<PluginInstance> {
        let mut store = Store::new(self.pre.engine(), InstanceState::new());
        let bindings = self.pre.instantiate(&mut store).map_err(|e| anyhow!("cannot instantiate: {e:#}"))?;
        bindings
            .sluice_plugin_lifecycle()
            .call_init(&mut store, &self.config)
            .map_err(|trap| anyhow!("trapped in init: {trap:#}"))?
            .map_err(|error| anyhow!("refused its configuration: {}", describe_error(&error)))?;
        Ok(PluginInstance { store, bindings, identity: self.identity.clone() })
    }
}

/// One instantiated plugin with its own memory. Used by one worker at a time.
pub struct PluginInstance {
    store: Store<InstanceState>,
    bindings: Transformer,
    identity: PluginIdentity,
}

/// Why a partition task failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The plugin returned a `plugin-error`.
    #[error("plugin {plugin} failed on {task}: {message}")]
    Plugin { plugin: String, task: String, message: String },
    /// The plugin trapped (a bug or a resource limit); its instance is unusable afterwards.
    #[error("plugin {plugin} trapped on {task}: {message}")]
    Trap { plugin: String, task: String, message: String },
}

impl PluginInstance {
    /// Runs one partition task through the plugin.
    pub fn process(&mut self, ctx: &BatchContext, records: &[InputRecord]) -> Result<BatchOutput, TaskError> {
        let task = format!("{}:{} [{}, {}) of batch {} ms", ctx.topic, ctx.partition, ctx.from_offset, ctx.until_offset, ctx.batch_time);
        let plugin = self.identity.info.name.clone();
        self.store.data_mut().task = format!("{}:{}", ctx.topic, ctx.partition);
        match self.bindings.sluice_plugin_transform().call_process(&mut self.store, ctx, records) {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(error)) => Err(TaskError::Plugin { plugin, task, message: describe_error(&error) }),
            Err(trap) => Err(TaskError::Trap { plugin, task, message: format!("{trap:#}") }),
        }
    }

    fn describe(&mut self) -> Result<PluginInfo> {
        let info = self
            .bindings
            .sluice_plugin_lifecycle()
            .call_describe(&mut self.store)
            .map_err(|trap| anyhow!("trapped in describe: {trap:#}"))?;
        self.store.data_mut().plugin = info.name.clone();
        Ok(info)
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
fn engine() -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
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

/// Per-instance host state: WASI with no capabilities, plus what log lines are tagged with.
struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    plugin: String,
    task: String,
}

impl InstanceState {
    fn new() -> InstanceState {
        // No files, network or environment: a plugin's stdout and stderr go to the host's
        // stderr (stdout belongs to the job's print sink).
        let wasi = WasiCtxBuilder::new().stdout(wasmtime_wasi::cli::stderr()).inherit_stderr().build();
        InstanceState { wasi, table: ResourceTable::new(), plugin: String::new(), task: String::new() }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::sluice::plugin::types::Host for InstanceState {}

impl bindings::sluice::plugin::host::Host for InstanceState {
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
