//! The batch loop: at each batch time, plan offset ranges, fetch them, run one plugin call per
//! partition task on a bounded pool of plugin instances, update keyed state or windows, deliver
//! the outputs, then commit: checkpoint first, consumer group second.

mod commit;
mod failure;
mod parallel;
mod rate;
mod schedule;
mod shuffle;
mod shutdown;
mod state;
mod upgrade;
mod window;

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

pub use rate::RateController;
pub use shutdown::Shutdown;
pub use upgrade::{PROBATION_BATCHES, UpgradeOutcome, UpgradeRequest};

use crate::admin::AdminServer;
use crate::checkpoint::{BatchChanges, Checkpoint, PendingBatch, PluginRun, Resume};
use crate::config::{FailurePolicy, JobConfig, PostgresMode};
use crate::failpoint;
use crate::runtime::{
    BatchContext, InputRecord, OutputRecord, PluginIdentity, PluginInstance, PluginKind, PluginRuntime,
};
use crate::sinks::{KafkaSink, PostgresSink, PrintSink, Sinks};
use crate::source::{KafkaSource, OffsetRange, TopicPartition, describe_ranges};
use failure::FailureHandling;
use parallel::run_each;

/// A job being run: its plugin, its source and its sinks.
pub struct Engine {
    job: JobConfig,
    plugin: PluginRuntime,
    /// One instance per worker; a partition task runs on whichever worker takes it.
    instances: Vec<PluginInstance>,
    source: KafkaSource,
    sinks: Sinks,
    rate: RateController,
    /// Where offsets, state and windows are committed, with `--checkpoint`.
    checkpoint: Option<JobCheckpoint>,
    /// Hot upgrades through the admin endpoint (jobs with a checkpoint).
    upgrades: Option<Upgrades>,
}

/// What a running job reports on its admin endpoint.
#[derive(Debug, Clone)]
pub struct Status {
    pub plugin: PluginIdentity,
    pub kind: PluginKind,
    pub last_batch: Option<i64>,
    /// Records between the last batch's ends and the high watermarks it saw.
    pub lag: Option<i64>,
}

impl Status {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "plugin": {
                "name": self.plugin.info.name,
                "version": self.plugin.info.version,
                "state_schema_version": self.plugin.info.state_schema_version,
                "digest": self.plugin.digest,
                "kind": self.kind.to_string(),
            },
            "last_batch": self.last_batch,
            "lag": self.lag,
        })
    }
}

/// The engine's side of hot upgrades.
struct Upgrades {
    /// Validated new versions, switched in at the next batch boundary.
    candidates: Receiver<upgrade::Candidate>,
    /// The version being replaced while the new one runs its first batches.
    probation: Option<upgrade::Probation>,
    status: Arc<Mutex<Status>>,
    admin: Option<AdminServer>,
    /// The validator thread; it holds the checkpoint, so the engine waits for it on drop.
    validator: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Upgrades {
    fn drop(&mut self) {
        // Stopping the endpoint closes the request channel, which ends the validator, which
        // releases the checkpoint: a job started right after this one can open it.
        drop(self.admin.take());
        if let Some(validator) = self.validator.take() {
            let _ = validator.join();
        }
    }
}

/// The checkpoint and what the engine learned from it at start.
struct JobCheckpoint {
    store: Arc<Checkpoint>,
    state_partitions: u32,
    /// A batch that was planned but not committed before the last run stopped: run first,
    /// with its original time and ranges.
    replay: Option<PendingBatch>,
    /// The last committed batch's time; later batches get later times.
    last_batch: Option<i64>,
    /// Whether the windowed plugin has an inverse reduce.
    invertible: bool,
}

/// One partition's slice of one batch: the unit of one plugin call.
struct PartitionTask {
    context: BatchContext,
    records: Vec<InputRecord>,
}

/// What processing a batch produced, ready to deliver and commit.
struct Processed {
    outputs: Vec<OutputRecord>,
    dead_letters: Vec<OutputRecord>,
    rejected: usize,
    skipped: usize,
    changes: BatchChanges,
}

impl PartitionTask {
    /// The record at `offset`, if the task has it (records are in offset order).
    fn record(&self, offset: i64) -> Option<&InputRecord> {
        self.records.binary_search_by_key(&offset, |record| record.offset).ok().map(|index| &self.records[index])
    }
}

/// What one batch did, as logged.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    pub records_in: usize,
    pub outputs: usize,
    pub rejected: usize,
    /// Records sent to the dead-letter topic (rejections and isolated poison records).
    pub dead_letters: usize,
    /// Records of failed tasks skipped under `--on-failure skip`.
    pub skipped: usize,
    /// How late the batch started relative to its batch time.
    pub scheduling_delay: Duration,
    /// Where the processing time went.
    pub phases: BatchPhases,
    /// Whether the batch left every partition at the high watermark seen when planning.
    pub caught_up: bool,
    /// The rate limit the batch was planned with, in records per second for the whole job
    /// (`None`: unlimited, or only `--max-rate-per-partition`).
    pub rate: Option<f64>,
}

/// The steps of one batch and how long each took; together they make up its processing time.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchPhases {
    /// Topic discovery, upgrade switch, offset-range planning and the checkpoint's plan write.
    pub plan: Duration,
    /// Reading the ranges' records.
    pub fetch: Duration,
    /// Plugin calls, state and windows.
    pub plugin: Duration,
    /// Waiting for the sinks to acknowledge every output.
    pub deliver: Duration,
    /// The checkpoint transaction and the consumer-group commit.
    pub commit: Duration,
}

impl BatchReport {
    /// From the batch's start to its commit: the sum of its phases.
    pub fn processing(&self) -> Duration {
        let BatchPhases { plan, fetch, plugin, deliver, commit } = self.phases;
        plan + fetch + plugin + deliver + commit
    }

    /// Scheduling delay plus processing time: how far behind its batch time the batch finished.
    pub fn total_delay(&self) -> Duration {
        self.scheduling_delay + self.processing()
    }
}

/// Totals over a run, reported when the job stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub records_in: u64,
    pub outputs: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    pub skipped: u64,
}

impl Engine {
    /// Loads and initialises the plugin, then connects to Kafka and picks starting offsets.
    /// The plugin comes first so that a bad plugin or plugin configuration is refused before
    /// the job touches Kafka.
    pub fn start(job: JobConfig) -> Result<Engine> {
        let (plugin, mut first_instance) =
            PluginRuntime::load(&job.plugin, job.plugin_config.clone(), job.sandbox.clone())?;
        tracing::info!("loaded {} plugin {}", plugin.kind(), plugin.identity());
        check_job_fits_plugin(&job, &plugin)?;
        // The checkpoint and the database are opened (and bad ones refused) before Kafka is touched.
        let (checkpoint, mut checkpointed) = match &job.checkpoint {
            Some(dir) => {
                let (checkpoint, offsets) = open_checkpoint(dir, &job, &plugin, &mut first_instance)?;
                (Some(checkpoint), offsets)
            }
            None => (None, BTreeMap::new()),
        };
        let postgres = match &job.postgres {
            Some(settings) => {
                if settings.mode == PostgresMode::Transactional && checkpoint.is_some() {
                    bail!(
                        "--postgres-mode transactional keeps the job's offsets in the database; it cannot be \
                         combined with --checkpoint (use --postgres-mode upsert for a job with state)"
                    );
                }
                let mut sink = PostgresSink::connect(settings.clone(), &job.group, job.broker_timeout)?;
                checkpointed.extend(sink.offsets()?);
                Some(sink)
            }
            None => None,
        };

        let client = job.kafka_client_config();
        if job.output_topic.is_none() && job.print.is_none() && postgres.is_none() {
            tracing::warn!("no --output-topic or --print: only outputs that name their own topic go anywhere");
        }
        let sinks = Sinks {
            kafka: KafkaSink::new(&client, job.output_topic.clone(), job.broker_timeout)?,
            print: job.print.map(PrintSink::new),
            postgres,
        };
        let source = KafkaSource::connect(&job, checkpointed)?;

        let rate = RateController::new(job.rate, job.batch_interval)?;
        tracing::info!(
            "processing with up to {} workers, batch interval {}",
            job.parallelism,
            humantime::format_duration(job.batch_interval)
        );
        let upgrades = match &checkpoint {
            Some(store) => Some(start_upgrades(&job, &plugin, store)?),
            None => None,
        };
        let mut engine =
            Engine { job, plugin, instances: vec![first_instance], source, sinks, rate, checkpoint, upgrades };
        engine.ensure_workers()?;
        Ok(engine)
    }

    /// Makes an instance for every worker the current partitions can keep busy.
    fn ensure_workers(&mut self) -> Result<()> {
        let state_partitions = self.checkpoint.as_ref().map_or(0, |checkpoint| checkpoint.state_partitions as usize);
        let workers = self.job.parallelism.min(self.source.partitions().count().max(state_partitions)).max(1);
        while self.instances.len() < workers {
            let instance = self.plugin.instantiate().context("cannot instantiate the plugin for another worker")?;
            self.instances.push(instance);
        }
        Ok(())
    }

    /// The loaded plugin.
    pub fn plugin(&self) -> &PluginRuntime {
        &self.plugin
    }

    /// Runs batches until `--max-batches`, `--stop-when-caught-up` or a stop request ends the
    /// job. The batch in flight when a stop is requested still completes and commits.
    pub async fn run(self, shutdown: Shutdown) -> Result<RunSummary> {
        self.run_observed(shutdown, |_| Ok(())).await
    }

    /// As [`Engine::run`], calling `observe` after each committed batch, before the next one
    /// is planned. An error from `observe` stops the job with that error.
    pub async fn run_observed(
        mut self,
        mut shutdown: Shutdown,
        mut observe: impl FnMut(&BatchReport) -> Result<()>,
    ) -> Result<RunSummary> {
        let interval = i64::try_from(self.job.batch_interval.as_millis()).context("batch interval too long")?;
        let mut summary = RunSummary::default();
        let mut batch_time = self.first_batch_time(interval);
        // The last batch whose group commit failed; the next commit covers it (commits are
        // cumulative), and the job does not stop without one succeeding.
        let mut uncommitted: Option<Vec<OffsetRange>> = None;
        loop {
            // A batch interrupted by the last run's end comes first, with its original time.
            let replay = self.checkpoint.as_mut().and_then(|checkpoint| checkpoint.replay.take());
            if let Some(replay) = &replay {
                tracing::info!(
                    "replaying batch {} ms, interrupted before its commit: {}",
                    replay.batch_time,
                    describe_ranges(&replay.ranges)
                );
            }
            let wait = if replay.is_some() { 0 } else { batch_time - now_ms() };
            if wait > 0 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    () = shutdown.requested() => {}
                }
            }
            if shutdown.is_requested() {
                break;
            }
            let this_batch = replay.as_ref().map_or(batch_time, |replay| replay.batch_time);
            let scheduling_delay = Duration::from_millis((now_ms() - this_batch).max(0) as u64);
            // The batch itself is blocking work (Kafka client calls, Wasm): keep it off the
            // async worker threads' queues without moving the engine between threads.
            let report = tokio::task::block_in_place(|| {
                let (report, committed) = self.run_batch(this_batch, scheduling_delay, summary.batches == 0, replay)?;
                uncommitted = match committed {
                    Ok(()) => None,
                    Err(error) => {
                        tracing::warn!("{error:#}; moving on, the next commit covers it");
                        Some(report.ranges.clone())
                    }
                };
                log_batch(&report);
                self.rate.batch_completed(now_ms(), &report);
                observe(&report)?;
                anyhow::Ok(report)
            })?;
            summary.batches += 1;
            summary.records_in += report.records_in as u64;
            summary.outputs += report.outputs as u64;
            summary.rejected += report.rejected as u64;
            summary.dead_letters += report.dead_letters as u64;
            summary.skipped += report.skipped as u64;

            if self.job.max_batches.is_some_and(|max| summary.batches >= max) {
                tracing::info!("stopping after {} batches (--max-batches)", summary.batches);
                break;
            }
            if self.job.stop_when_caught_up && report.caught_up {
                tracing::info!("stopping: every partition is at its high watermark (--stop-when-caught-up)");
                break;
            }
            batch_time = schedule::next_batch_time(this_batch.max(batch_time - interval), now_ms(), interval);
        }
        if let Some(ranges) = uncommitted {
            tokio::task::block_in_place(|| self.source.commit(&ranges))
                .context("stopping with the last batch's offsets uncommitted; the next run replays it")?;
        }
        tracing::info!(
            "stopped after {} batches: {} records in, {} out, {} rejected, {} dead letters, {} skipped",
            summary.batches,
            summary.records_in,
            summary.outputs,
            summary.rejected,
            summary.dead_letters,
            summary.skipped
        );
        Ok(summary)
    }

    /// The first batch time of this run: the next tick, but always after every batch the
    /// checkpoint has seen, so batch times (and with them panes and timeouts) never repeat.
    fn first_batch_time(&self, interval: i64) -> i64 {
        let mut first = schedule::first_batch_time(now_ms(), interval);
        if let Some(checkpoint) = &self.checkpoint {
            let seen =
                checkpoint.last_batch.into_iter().chain(checkpoint.replay.as_ref().map(|replay| replay.batch_time));
            for time in seen {
                first = first.max(time + interval);
            }
        }
        first
    }

    /// One batch, start to commit. An error before the commit step fails the batch (nothing
    /// committed, the job stops and a restart replays it); the group commit's own outcome is
    /// returned beside the report, because a failed group commit is covered by the next one.
    fn run_batch(
        &mut self,
        batch_time: i64,
        scheduling_delay: Duration,
        first: bool,
        replay: Option<PendingBatch>,
    ) -> Result<(BatchReport, Result<()>)> {
        let started = Instant::now();
        tracing::debug!("started batch {batch_time} ms");
        if !first {
            // Topics and partitions created (or deleted) since the last batch join (or leave)
            // at this boundary.
            self.source.refresh_partitions().with_context(|| format!("batch {batch_time} ms"))?;
            self.ensure_workers()?;
        }
        self.switch_to_candidate(batch_time)?;
        let (ranges, caught_up, rate) = match replay {
            Some(replay) => (replay.ranges, false, None),
            None => {
                let rate = self.rate.current_rate();
                let planned =
                    self.source.plan(|lags| self.rate.caps(lags)).with_context(|| format!("batch {batch_time} ms"))?;
                let caught_up = planned.iter().all(|p| p.range.until >= p.high_watermark);
                let lag = planned.iter().map(|p| (p.high_watermark - p.range.until).max(0)).sum();
                if let Some(upgrades) = &self.upgrades {
                    upgrades.status.lock().expect("not poisoned").lag = Some(lag);
                }
                (planned.into_iter().map(|p| p.range).collect::<Vec<_>>(), caught_up, rate)
            }
        };
        if let Some(checkpoint) = &self.checkpoint {
            checkpoint.store.begin_batch(&PendingBatch { batch_time, ranges: ranges.clone() })?;
        }
        let planned_at = started.elapsed();
        let inputs = self.source.fetch(&ranges).with_context(|| format!("batch {batch_time} ms"))?;
        failpoint::reached("fetch");
        let fetched_at = started.elapsed();

        let tasks: Vec<PartitionTask> = ranges
            .iter()
            .zip(inputs)
            .map(|(range, records)| PartitionTask {
                context: BatchContext {
                    topic: range.partition.topic.clone(),
                    partition: range.partition.partition,
                    from_offset: range.from,
                    until_offset: range.until,
                    batch_time,
                },
                records,
            })
            .collect();
        let records_in = tasks.iter().map(|task| task.records.len()).sum();
        let processed = match self.process(batch_time, &tasks) {
            Ok(processed) => {
                if records_in > 0 {
                    self.probation_passed(batch_time);
                }
                processed
            }
            Err(error) if self.on_probation() => {
                self.roll_back(batch_time, &error)?;
                self.process(batch_time, &tasks)?
            }
            Err(error) => return Err(error),
        };
        let Processed { outputs, dead_letters, rejected, skipped, changes } = processed;
        failpoint::reached("plugin");
        let processed_at = started.elapsed();

        self.sinks
            .deliver(batch_time, &outputs, &dead_letters)
            .with_context(|| format!("batch {batch_time} ms: cannot deliver outputs"))?;
        failpoint::reached("deliver");
        self.sinks.write_rows(&outputs, &ranges).with_context(|| format!("batch {batch_time} ms"))?;
        failpoint::reached("database");
        let delivered_at = started.elapsed();
        let checkpoint = self.checkpoint.as_ref().map(|checkpoint| &*checkpoint.store);
        let committed = commit::commit_batch(checkpoint, &self.source, &self.plugin, batch_time, &ranges, &changes)?;
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.last_batch = Some(batch_time);
        }
        if let Some(upgrades) = &self.upgrades {
            upgrades.status.lock().expect("not poisoned").last_batch = Some(batch_time);
        }
        let phases = BatchPhases {
            plan: planned_at,
            fetch: fetched_at - planned_at,
            plugin: processed_at - fetched_at,
            deliver: delivered_at - processed_at,
            commit: started.elapsed() - delivered_at,
        };
        tracing::debug!("batch {batch_time} ms phases: {phases:?}");
        let report = BatchReport {
            batch_time,
            ranges,
            records_in,
            outputs: outputs.len(),
            rejected,
            dead_letters: dead_letters.len(),
            skipped,
            scheduling_delay,
            phases,
            caught_up,
            rate,
        };
        Ok((report, committed))
    }

    /// Whether a new version is running its first batches.
    fn on_probation(&self) -> bool {
        self.upgrades.as_ref().is_some_and(|upgrades| upgrades.probation.is_some())
    }

    /// Switches to a validated new version, if one is waiting: the batch boundary is now.
    fn switch_to_candidate(&mut self, batch_time: i64) -> Result<()> {
        let Some(upgrades) = &mut self.upgrades else { return Ok(()) };
        if upgrades.probation.is_some() {
            return Ok(());
        }
        let Ok(mut candidate) = upgrades.candidates.try_recv() else { return Ok(()) };
        tracing::info!(
            "batch {batch_time} ms: switching from {} to {}",
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
        upgrades.probation = Some(upgrade::Probation {
            previous_runtime,
            previous_instances,
            batches_left: PROBATION_BATCHES,
            first_batch: None,
            reply: candidate.reply,
        });
        self.set_status_plugin();
        if let Err(error) = self.ensure_workers() {
            self.roll_back(batch_time, &error)?;
        }
        Ok(())
    }

    /// Counts a batch with records the new version processed (an empty batch proves nothing);
    /// after enough, the upgrade is done.
    fn probation_passed(&mut self, batch_time: i64) {
        let Some(upgrades) = &mut self.upgrades else { return };
        let Some(probation) = &mut upgrades.probation else { return };
        let first_batch = *probation.first_batch.get_or_insert(batch_time);
        probation.batches_left -= 1;
        if probation.batches_left == 0 {
            let probation = upgrades.probation.take().expect("on probation");
            let (from, to) = (probation.previous_runtime.identity().to_string(), self.plugin.identity().to_string());
            tracing::info!("upgrade from {from} to {to} done: its first {PROBATION_BATCHES} batches succeeded");
            let _ = probation.reply.send(UpgradeOutcome::Upgraded { from, to, first_batch });
        }
    }

    /// Returns to the version the failed new one replaced; the caller re-runs the batch.
    fn roll_back(&mut self, batch_time: i64, error: &anyhow::Error) -> Result<()> {
        let upgrades = self.upgrades.as_mut().context("no upgrade to roll back")?;
        let probation = upgrades.probation.take().context("no upgrade to roll back")?;
        let failed = std::mem::replace(&mut self.plugin, probation.previous_runtime);
        self.instances = probation.previous_instances;
        let (from, to, reason) =
            (self.plugin.identity().to_string(), failed.identity().to_string(), format!("{error:#}"));
        tracing::warn!("batch {batch_time} ms: rolling back from {to} to {from}: {reason}");
        let _ = probation.reply.send(UpgradeOutcome::RolledBack { from, to, batch: batch_time, reason });
        if let Some(checkpoint) = &mut self.checkpoint
            && self.plugin.kind() == PluginKind::Windowed
        {
            checkpoint.invertible = self.instances[0].inverse_reduce(&[]).is_ok_and(|inverse| inverse.is_some());
        }
        self.set_status_plugin();
        Ok(())
    }

    fn set_status_plugin(&self) {
        if let Some(upgrades) = &self.upgrades {
            let mut status = upgrades.status.lock().expect("not poisoned");
            status.plugin = self.plugin.identity().clone();
            status.kind = self.plugin.kind();
        }
    }

    /// Runs the plugin over a batch's partition tasks (and, for stateful and windowed plugins,
    /// the state or window step), applying the failure policy to failed tasks. Nothing leaves
    /// the engine here: the result is delivered and committed by the caller.
    fn process(&mut self, batch_time: i64, tasks: &[PartitionTask]) -> Result<Processed> {
        let results = run_each(&self.plugin, &mut self.instances, tasks, |instance, task| {
            instance.process(&task.context, &task.records)
        });
        // A new version on probation gets no retries and no policy: any failure rolls it back.
        let probation = self.on_probation();
        let failures = FailureHandling {
            runtime: &self.plugin,
            policy: if probation { FailurePolicy::Halt } else { self.job.failure.policy },
            retries: if probation { 0 } else { self.job.failure.retries },
            dead_letter_topic: self.job.failure.dead_letter_topic.as_deref(),
        };

        let mut outputs: Vec<OutputRecord> = Vec::new();
        let mut dead_letters: Vec<OutputRecord> = Vec::new();
        let mut values = Vec::with_capacity(results.len());
        let (mut rejected, mut skipped) = (0, 0);
        for (task, result) in tasks.iter().zip(results) {
            let result = match result {
                Ok(output) => output,
                Err(error) => {
                    let recovered = failures.recover(task, error).with_context(|| format!("batch {batch_time} ms"))?;
                    dead_letters.extend(recovered.dead_letters);
                    skipped += recovered.skipped;
                    recovered.output
                }
            };
            for rejection in &result.rejections {
                tracing::warn!(
                    "rejected {}:{} offset {}: {}",
                    task.context.topic,
                    task.context.partition,
                    rejection.offset,
                    rejection.reason
                );
                if failures.dead_letter_topic.is_some()
                    && let Some(record) = task.record(rejection.offset)
                {
                    dead_letters.push(failures.dead_letter(&task.context, record, "rejected", &rejection.reason)?);
                }
            }
            rejected += result.rejections.len();
            outputs.extend(result.outputs);
            values.push(result.values);
        }
        let mut changes = BatchChanges::default();
        if let Some(checkpoint) = &self.checkpoint {
            let keyed = match self.plugin.kind() {
                PluginKind::Transform => Vec::new(),
                PluginKind::Stateful => state::StateStep {
                    runtime: &self.plugin,
                    checkpoint: &checkpoint.store,
                    partitions: checkpoint.state_partitions,
                    timeout_ms: self.job.state_timeout.map(|timeout| timeout.as_millis() as i64),
                    batch_time,
                }
                .run(&mut self.instances, values, &mut changes)?,
                PluginKind::Windowed => {
                    let window = self.job.window.context("a windowed plugin needs --window")?;
                    window::WindowStep {
                        runtime: &self.plugin,
                        checkpoint: &checkpoint.store,
                        partitions: checkpoint.state_partitions,
                        length_ms: window.length.as_millis() as i64,
                        slide_ms: window.slide.as_millis() as i64,
                        invertible: checkpoint.invertible,
                        batch_time,
                    }
                    .run(&mut self.instances, values, &mut changes)?
                }
            };
            outputs.extend(keyed);
        }
        Ok(Processed { outputs, dead_letters, rejected, skipped, changes })
    }
}

/// Starts the admin endpoint and the upgrade validator of a job with a checkpoint.
fn start_upgrades(job: &JobConfig, plugin: &PluginRuntime, checkpoint: &JobCheckpoint) -> Result<Upgrades> {
    let status = Arc::new(Mutex::new(Status {
        plugin: plugin.identity().clone(),
        kind: plugin.kind(),
        last_batch: checkpoint.last_batch,
        lag: None,
    }));
    let (requests, incoming) = mpsc::channel();
    let (candidates, ready) = mpsc::channel();
    let validator = upgrade::Validator {
        job: job.clone(),
        checkpoint: checkpoint.store.clone(),
        requests: incoming,
        candidates,
        current: status.clone(),
    };
    let validator = std::thread::Builder::new()
        .name("sluice-upgrades".into())
        .spawn(move || validator.run())
        .context("cannot start the upgrade validator")?;
    let dir = checkpoint.store.path().parent().context("checkpoint file without a directory")?;
    let admin = AdminServer::start(job.admin_address, dir, status.clone(), requests)?;
    Ok(Upgrades { candidates: ready, probation: None, status, admin: Some(admin), validator: Some(validator) })
}

/// Refuses option combinations the plugin's kind cannot honour, before anything is opened.
fn check_job_fits_plugin(job: &JobConfig, plugin: &PluginRuntime) -> Result<()> {
    let (kind, name) = (plugin.kind(), &plugin.identity().info.name);
    if kind != PluginKind::Transform && job.checkpoint.is_none() {
        bail!("plugin {name} is a {kind} plugin: its state lives in the checkpoint, so pass --checkpoint DIR");
    }
    match (kind, job.window, job.state_timeout) {
        (PluginKind::Windowed, None, _) => {
            bail!("plugin {name} is a windowed plugin: pass --window DURATION (and --slide DURATION)")
        }
        (PluginKind::Stateful | PluginKind::Transform, Some(_), _) => {
            bail!("--window is for windowed plugins; plugin {name} is a {kind} plugin")
        }
        (PluginKind::Windowed | PluginKind::Transform, _, Some(_)) => {
            bail!("--state-timeout is for stateful plugins; plugin {name} is a {kind} plugin")
        }
        _ => Ok(()),
    }
}

/// Refuses a plugin that cannot continue the state `last` left: another plugin (by name), a
/// windowed plugin with another pane encoding, or an older state schema than the state's.
/// A stateful plugin with a newer schema migrates keys as batches touch them.
fn check_can_continue(last: &PluginRun, plugin: &PluginRuntime, path: &std::path::Path) -> Result<()> {
    let info = &plugin.identity().info;
    let holds = format!(
        "checkpoint {} holds state of plugin {} {} (state schema {})",
        path.display(),
        last.name,
        last.version,
        last.state_schema_version
    );
    if last.name != info.name {
        bail!("{holds}; plugin {} {} is another plugin and cannot take it over", info.name, info.version);
    }
    if info.state_schema_version < last.state_schema_version {
        bail!(
            "{holds}; plugin {} {} has the older state schema {} and cannot read it",
            info.name,
            info.version,
            info.state_schema_version
        );
    }
    if info.state_schema_version != last.state_schema_version && plugin.kind() == PluginKind::Windowed {
        bail!("{holds}; windowed plugins cannot migrate their panes to state schema {}", info.state_schema_version);
    }
    Ok(())
}

/// Opens the job's checkpoint and checks that this plugin can continue its state. Returns it
/// with the offsets each partition continues from.
fn open_checkpoint(
    dir: &std::path::Path,
    job: &JobConfig,
    plugin: &PluginRuntime,
    instance: &mut PluginInstance,
) -> Result<(JobCheckpoint, BTreeMap<TopicPartition, i64>)> {
    let mut store = Checkpoint::open(dir, job.parallelism as u32)?;
    store.keep_touched_index(job.state_timeout.is_some())?;
    let store = Arc::new(store);
    let Resume { offsets, last_batch, pending, last_plugin, has_state } = store.resume()?;
    let info = &plugin.identity().info;
    if let Some(last) = last_plugin.filter(|_| has_state) {
        check_can_continue(&last, plugin, store.path())?;
    }
    // An explicit --start is a decision to re-read: the interrupted batch's plan no longer applies.
    let overridden =
        |pending: &PendingBatch| pending.ranges.iter().any(|range| job.start.contains_key(&range.partition));
    let replay = match pending {
        Some(pending) if overridden(&pending) => {
            store.discard_pending()?;
            None
        }
        pending => pending,
    };
    let invertible = plugin.kind() == PluginKind::Windowed
        && instance.inverse_reduce(&[]).map_err(|e| anyhow::anyhow!("plugin {}: {e}", info.name))?.is_some();
    let state_partitions = store.state_partitions()?;
    match last_batch {
        Some(last) => tracing::info!("resuming from checkpoint {}, last batch {last} ms", store.path().display()),
        None => tracing::info!("starting a new checkpoint in {}", store.path().display()),
    }
    Ok((JobCheckpoint { store, state_partitions, replay, last_batch, invertible }, offsets))
}

fn log_batch(report: &BatchReport) {
    let ranges = describe_ranges(&report.ranges);
    let failed = match (report.dead_letters, report.skipped) {
        (0, 0) => String::new(),
        (dead_letters, skipped) => format!(", {dead_letters} dead letters, {skipped} skipped"),
    };
    let rate = match report.rate {
        Some(rate) => format!("; rate limit {rate:.0} records/s"),
        None => String::new(),
    };
    tracing::info!(
        "batch {} ms: {} in, {} out, {} rejected{failed}; processing {} ms, scheduling delay {} ms, total delay {} ms{rate}; {}",
        report.batch_time,
        report.records_in,
        report.outputs,
        report.rejected,
        report.processing().as_millis(),
        report.scheduling_delay.as_millis(),
        report.total_delay().as_millis(),
        ranges
    );
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
