//! Hot swap: a new plugin build is validated off the hot path, switched in at a batch
//! boundary, and put on probation: its batches are delivered but held uncommitted (offsets,
//! state, panes) until [`PROBATION_BATCHES`] batches with records have succeeded, then they
//! commit together. A failure in any of them rolls back: the held batches are dropped and the
//! old build processes them again, so the old build never meets state only the new one can
//! read (docs/adr/0004).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use anyhow::{Context as _, Result, bail};

use super::Engine;
use super::assignment::Replay;
use crate::checkpoint::{Builds, Checkpoint, HeldChanges, PendingBatch, PluginRun};
use crate::config::JobConfig;
use crate::control::{UpgradeOutcome, UpgradeRequest};
use crate::observe::Observer;
use crate::offsets::OffsetRange;
use crate::runtime::{PluginIdentity, PluginInstance, PluginKind, PluginRuntime};

/// Batches with records a new version must complete before its upgrade counts as done; a
/// failure in any of them rolls it back.
pub const PROBATION_BATCHES: u32 = 2;
/// Keys of the existing state the new version must be able to migrate before it is switched in.
const DRY_RUN_KEYS: usize = 100;

/// A validated new version, waiting for the next batch boundary.
pub struct Candidate {
    pub runtime: PluginRuntime,
    pub instance: PluginInstance,
    pub reply: oneshot::Sender<UpgradeOutcome>,
}

/// A new version on probation, and the version it replaces, kept until the new one has proven
/// itself.
pub struct Probation {
    pub previous_runtime: PluginRuntime,
    pub previous_instances: Vec<PluginInstance>,
    /// Batches with records still to succeed.
    pub batches_left: u32,
    pub first_batch: Option<i64>,
    /// The plans of the new version's batches so far (delivered, not committed), oldest first.
    pub held_plans: Vec<PendingBatch>,
    /// Their changes, in the same order: the next batches see the state through them.
    pub held: Vec<HeldChanges>,
    pub reply: oneshot::Sender<UpgradeOutcome>,
}

impl Probation {
    /// Each partition's range over the held batches and `ranges` (the batch committing them).
    pub fn ends(&self, ranges: &[OffsetRange]) -> Vec<OffsetRange> {
        let mut ends: Vec<OffsetRange> = Vec::new();
        for range in self.held_plans.iter().flat_map(|plan| &plan.ranges).chain(ranges) {
            match ends.iter_mut().find(|end| end.partition == range.partition) {
                Some(end) => {
                    end.from = end.from.min(range.from);
                    end.until = end.until.max(range.until);
                }
                None => ends.push(range.clone()),
            }
        }
        ends
    }
}

/// Validates upgrade requests as they arrive and hands the good ones to the engine. Runs on a
/// thread of its own: compiling and initialising a component never delays a batch.
pub struct Validator {
    pub job: JobConfig,
    pub checkpoint: Arc<Checkpoint>,
    pub builds: Builds,
    pub requests: Receiver<UpgradeRequest>,
    pub candidates: Sender<Candidate>,
    /// What the engine runs now, and the new version pending or on probation.
    /// Where refused upgrades are reported.
    pub observer: Arc<Observer>,
    /// Set when the job stops: requests still arriving are answered "job stopping".
    pub stop: Arc<AtomicBool>,
}

impl Validator {
    /// Serves requests until the job stops.
    pub fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            let request = match self.requests.recv_timeout(Duration::from_millis(200)) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            tracing::info!("validating the upgrade to {}", request.plugin.display());
            let validated = self.validate(&request);
            if self.stop.load(Ordering::Relaxed) {
                let _ = request.reply.send(UpgradeOutcome::job_stopping());
                return;
            }
            match validated {
                Ok((runtime, instance)) => {
                    tracing::info!("upgrade to {} validated; switching at the next batch", runtime.identity());
                    self.observer.status().probation = Some(runtime.identity().clone());
                    let candidate = Candidate { runtime, instance, reply: request.reply };
                    if let Err(refused) = self.candidates.send(candidate) {
                        let _ = refused.0.reply.send(UpgradeOutcome::job_stopping());
                        return;
                    }
                }
                Err(error) => {
                    let reason = format!("{error:#}");
                    tracing::warn!("upgrade refused: {reason}");
                    let outcome = UpgradeOutcome::Refused { reason };
                    self.observer.upgrade(&outcome);
                    let _ = request.reply.send(outcome);
                }
            }
        }
        // Requests that came in while the job was stopping.
        while let Ok(request) = self.requests.try_recv() {
            let _ = request.reply.send(UpgradeOutcome::job_stopping());
        }
    }

    /// Compiles the component, checks its world, runs `init` with the job's configuration,
    /// reads `describe`, checks it may take over the state, and migrates a sample of the state
    /// with it (a dry run: nothing is written). A new version already waiting or on probation
    /// is the one a request would replace, so none is accepted until its outcome is known.
    fn validate(&self, request: &UpgradeRequest) -> Result<(PluginRuntime, PluginInstance)> {
        if let Some(upgrading) = &self.observer.status().probation {
            bail!("the upgrade to {upgrading} is not finished yet (waiting or on probation); ask again when it is");
        }
        let bytes = std::fs::read(&request.plugin)
            .with_context(|| format!("cannot read plugin {}", request.plugin.display()))?;
        let (runtime, mut instance) =
            PluginRuntime::from_bytes(&bytes, self.job.plugin_config.clone(), self.job.sandbox.clone())
                .with_context(|| format!("plugin {}", request.plugin.display()))?;
        let (current, kind) = {
            let status = self.observer.status();
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
        self.dry_run(new, &mut instance)?;
        // Kept before it runs a batch, so a plan that names it can always be replayed.
        self.builds.keep(&new.digest, &bytes)?;
        Ok((runtime, instance))
    }

    /// Migrates a sample of the stored state with the new version, writing nothing.
    fn dry_run(&self, new: &PluginIdentity, instance: &mut PluginInstance) -> Result<()> {
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
        Ok(())
    }
}

impl Engine {
    /// Whether a new version is running its probation batches.
    pub(super) fn on_probation(&self) -> bool {
        self.probation().is_some()
    }

    pub(super) fn probation(&self) -> Option<&Probation> {
        self.upgrades.as_ref().and_then(|upgrades| upgrades.probation.as_ref())
    }

    pub(super) fn probation_mut(&mut self) -> Option<&mut Probation> {
        self.upgrades.as_mut().and_then(|upgrades| upgrades.probation.as_mut())
    }

    /// Switches to a validated new version, if one is waiting: the batch boundary is now.
    pub(super) fn switch_to_candidate(&mut self, batch_time: i64) -> Result<()> {
        let Some(upgrades) = &mut self.upgrades else { return Ok(()) };
        if upgrades.probation.is_some() {
            return Ok(());
        }
        let Ok(mut candidate) = upgrades.candidates.try_recv() else { return Ok(()) };
        tracing::info!(
            "batch {batch_time} ms: switching from {} to {}; its first {PROBATION_BATCHES} batches with records are \
             held until they all succeed",
            self.plugin.identity(),
            candidate.runtime.identity()
        );
        if let Some(checkpoint) = &mut self.checkpoint
            && candidate.runtime.kind() == PluginKind::Windowed
        {
            checkpoint.invertible = candidate.instance.inverse_reduce(&[]).is_ok_and(|inverse| inverse.is_some());
        }
        let previous_runtime = std::mem::replace(&mut self.plugin, candidate.runtime);
        let previous_instances = std::mem::replace(&mut self.instances, vec![candidate.instance]);
        upgrades.probation = Some(Probation {
            previous_runtime,
            previous_instances,
            batches_left: PROBATION_BATCHES,
            first_batch: None,
            held_plans: Vec::new(),
            held: Vec::new(),
            reply: candidate.reply,
        });
        self.observer.running(self.plugin.identity(), self.plugin.kind());
        if let Err(error) = self.ensure_workers() {
            self.roll_back(batch_time, &format!("{error:#}"), None);
        }
        Ok(())
    }

    /// The probation batches committed: the upgrade is done, and said so.
    pub(super) fn probation_passed(&mut self, probation: Probation) {
        let (from, to) = (probation.previous_runtime.identity().to_string(), self.plugin.identity().to_string());
        let first_batch = probation.first_batch.unwrap_or_default();
        tracing::info!(
            "upgrade from {from} to {to} done: its first {PROBATION_BATCHES} batches with records succeeded and are \
             committed"
        );
        self.observer.status().probation = None;
        let outcome = UpgradeOutcome::Upgraded { from, to, first_batch };
        self.observer.upgrade(&outcome);
        let _ = probation.reply.send(outcome);
    }

    /// Returns to the version the new one replaced: the new one's held batches (and `failed`,
    /// the batch it failed) are dropped uncommitted and queued for the old version to run
    /// again, in order, delivering their outputs again (at-least-once: the new version's
    /// outputs of them were delivered already). The old version never sees the new one's
    /// state.
    pub(super) fn roll_back(&mut self, batch_time: i64, reason: &str, failed: Option<PendingBatch>) {
        let Some(probation) = self.upgrades.as_mut().and_then(|upgrades| upgrades.probation.take()) else { return };
        let new = std::mem::replace(&mut self.plugin, probation.previous_runtime);
        self.instances = probation.previous_instances;
        let again: Vec<Replay> = probation
            .held_plans
            .into_iter()
            .chain(failed)
            .map(|plan| Replay { batch_time: plan.batch_time, ranges: plan.ranges, deliver: true, build: None })
            .collect();
        let (from, to) = (self.plugin.identity().to_string(), new.identity().to_string());
        // With exactly-once delivery the held batches' outputs are one open transaction:
        // aborted, no reader ever sees them.
        if let Err(error) = self.sinks.kafka.abort() {
            tracing::warn!("cannot abort the transaction of the batches on probation: {error}");
        }
        tracing::warn!(
            "batch {batch_time} ms: rolling back from {to} to {from}, which runs {} batches of it again: {reason}",
            again.len()
        );
        for replay in again.into_iter().rev() {
            self.replays.push_front(replay);
        }
        self.forget_uncommitted_state();
        let outcome = UpgradeOutcome::RolledBack { from, to, batch: batch_time, reason: reason.into() };
        if let Some(checkpoint) = &mut self.checkpoint
            && self.plugin.kind() == PluginKind::Windowed
        {
            checkpoint.invertible = self.instances[0].inverse_reduce(&[]).is_ok_and(|inverse| inverse.is_some());
        }
        self.observer.running(self.plugin.identity(), self.plugin.kind());
        self.observer.status().probation = None;
        self.observer.upgrade(&outcome);
        let _ = probation.reply.send(outcome);
    }
}
