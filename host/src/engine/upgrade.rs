//! Hot swap: a new plugin build is validated off the hot path, switched in at a batch
//! boundary, watched for its first batches, and rolled back if it fails one of them.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, PluginRun};
use crate::config::JobConfig;
use crate::runtime::{PluginInstance, PluginRuntime};

/// Batches with records a new version must complete before its upgrade counts as done; a
/// failure in any of them rolls it back.
pub const PROBATION_BATCHES: u32 = 2;
/// Keys of the existing state the new version must be able to migrate before it is switched in.
const DRY_RUN_KEYS: usize = 100;

/// An upgrade asked for through the admin endpoint.
pub struct UpgradeRequest {
    pub plugin: PathBuf,
    /// Allow a plugin with another name.
    pub force: bool,
    pub reply: Sender<UpgradeOutcome>,
}

/// How an upgrade ended, as the admin endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum UpgradeOutcome {
    /// The new version completed its first batches.
    Upgraded { from: String, to: String, first_batch: i64 },
    /// The new version failed one of its first batches; the old one re-ran that batch.
    RolledBack { from: String, to: String, batch: i64, reason: String },
    /// The new version was not switched in.
    Refused { reason: String },
}

/// A validated new version, waiting for the next batch boundary.
pub struct Candidate {
    pub runtime: PluginRuntime,
    pub instance: PluginInstance,
    pub reply: Sender<UpgradeOutcome>,
}

/// The version being replaced, kept until the new one has proven itself.
pub struct Probation {
    pub previous_runtime: PluginRuntime,
    pub previous_instances: Vec<PluginInstance>,
    pub batches_left: u32,
    pub first_batch: Option<i64>,
    pub reply: Sender<UpgradeOutcome>,
}

/// Validates upgrade requests as they arrive and hands the good ones to the engine. Runs on a
/// thread of its own: compiling and initialising a component never delays a batch.
pub struct Validator {
    pub job: JobConfig,
    pub checkpoint: std::sync::Arc<Checkpoint>,
    pub requests: Receiver<UpgradeRequest>,
    pub candidates: Sender<Candidate>,
    /// What the engine runs now.
    pub current: std::sync::Arc<std::sync::Mutex<super::Status>>,
}

impl Validator {
    /// Serves requests until the engine goes away.
    pub fn run(self) {
        for request in &self.requests {
            match self.validate(&request) {
                Ok((runtime, instance)) => {
                    tracing::info!("upgrade to {} validated; switching at the next batch", runtime.identity());
                    let candidate = Candidate { runtime, instance, reply: request.reply };
                    if self.candidates.send(candidate).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let reason = format!("{error:#}");
                    tracing::warn!("upgrade refused: {reason}");
                    let _ = request.reply.send(UpgradeOutcome::Refused { reason });
                }
            }
        }
    }

    /// Compiles the component, checks its world, runs `init` with the job's configuration,
    /// reads `describe`, checks it may take over the state, and migrates a sample of the state
    /// with it (a dry run: nothing is written).
    fn validate(&self, request: &UpgradeRequest) -> Result<(PluginRuntime, PluginInstance)> {
        let (runtime, mut instance) =
            PluginRuntime::load(&request.plugin, self.job.plugin_config.clone(), self.job.sandbox.clone())?;
        let (current, kind) = {
            let status = self.current.lock().expect("not poisoned");
            (status.plugin.clone(), status.kind)
        };
        let new = runtime.identity();
        if runtime.kind() != kind {
            bail!("{new} is a {} plugin; the job runs a {kind} plugin", runtime.kind());
        }
        if new.digest == current.digest {
            bail!("{new} is the version already running");
        }
        if new.info.name != current.info.name && !request.force {
            bail!("{new} is not {} (another plugin name); pass --force to switch anyway", current.info.name);
        }
        let last = PluginRun::of(&current, &self.job.plugin_config, &self.job.instance_id, 0);
        if !request.force {
            super::check_can_continue(&last, &runtime, self.checkpoint.path())?;
        }
        let sample = self.checkpoint.sample_state(DRY_RUN_KEYS)?;
        let mut outdated: std::collections::BTreeMap<u32, Vec<Vec<u8>>> = std::collections::BTreeMap::new();
        for (_, stored) in sample {
            if stored.schema > new.info.state_schema_version {
                bail!(
                    "state written with schema {} cannot be read by schema {}",
                    stored.schema,
                    new.info.state_schema_version
                );
            }
            if stored.schema != new.info.state_schema_version {
                outdated.entry(stored.schema).or_default().push(stored.bytes);
            }
        }
        for (from, states) in outdated {
            instance.migrate(from, &states).map_err(|error| {
                anyhow::anyhow!("dry run: cannot migrate a sample of {} states: {error}", states.len())
            })?;
        }
        Ok((runtime, instance))
    }
}
