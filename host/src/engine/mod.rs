//! The batch loop: at each batch time, apply the group's assignment changes, plan offset
//! ranges, fetch them, run one plugin call per partition task on a bounded pool of plugin
//! instances, update keyed state or windows, deliver the outputs, then commit: consumer group
//! first, checkpoint second.

mod assignment;
mod commit;
mod delivery;
mod failure;
mod parallel;
mod rate;
mod schedule;
mod shuffle;
mod shutdown;
mod state;
mod upgrade;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

pub use rate::RateController;
pub use shutdown::Shutdown;
pub use upgrade::PROBATION_BATCHES;

pub use crate::report::{BatchPhases, BatchReport, Ending, RunSummary, TopicCounts};

use crate::admin::AdminServer;
use crate::checkpoint::{
    BatchChanges, BatchCommit, Builds, Checkpoint, HeldChanges, PendingBatch, PluginRun, Resume, StateView,
};
use crate::config::{DeliveryGuarantee, JobConfig, PostgresMode};
use crate::control::{Status, UpgradeOutcome};
use crate::http::Listener;
use crate::observe::progress::Progress;
use crate::observe::{self, JobFacts, Observer};
use crate::offsets::{OffsetRange, TopicPartition, describe_ranges};
use crate::runtime::{BatchContext, InputRecord, KeyedValue, OutputRecord, PluginInstance, PluginKind, PluginRuntime};
use crate::shared_state::{self, Resolved, SharedState, Shuffled, StageRecord};
use crate::sinks::{DeadLetter, KafkaSink, PostgresSink, PrintSink, Sinks, TransactionError};
use crate::source::{Committed, KafkaSource, Lost, Unreadable, join};
use crate::{failpoint, panics};
use assignment::{Positions, Replay, reconcile};
use commit::GroupCommit;
use delivery::{Delivered, Delivery, Provenances};
use failure::{FailureHandling, OnFailure, Provenance, UNREADABLE, record_dead_letter};
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
    /// Where newly assigned partitions start.
    positions: Positions,
    /// Batches to finish before planning new ones: (the rest of) a plan an earlier run did not
    /// commit, or a replayed batch that runs in pieces because it is larger than the bounds.
    replays: VecDeque<Replay>,
    /// The plans the last run left, until the first assignment says which of them is still ours.
    interrupted: Vec<PendingBatch>,
    /// A batch was abandoned (fenced): the next boundary moves every partition back to where
    /// the group (or the database) says it continues.
    reposition: bool,
    /// With `--shared-state`: the state partitions this host owns, and its side of the
    /// shuffle and changelog topics.
    shared: Option<SharedState>,
    /// Metrics and the Streaming page's data, kept whether or not `--metrics-address` serves
    /// them.
    observer: Arc<Observer>,
    /// The listener of `--metrics-address`.
    metrics_listener: Option<Listener>,
    /// Progress of a backfill or catch-up while batches leave input behind.
    catching_up: Option<Progress>,
}

/// Where a stateful batch's keyed values go.
enum Keyed {
    /// Grouped in process and applied here (a job without `--shared-state`).
    InProcess,
    /// Grouped in process and applied here by a `--shared-state` host that runs the job
    /// alone: every state partition records the ranges as applied, its shuffle partition read
    /// to `read_to`, its local copy ahead of the changelog.
    Alone { read_to: BTreeMap<u32, i64> },
    /// Written to the shuffle topic (stage 1); the state step applies what each owned shuffle
    /// partition resolved to (stage 2).
    Shared(BTreeMap<u32, Resolved>),
}

/// The engine's side of hot upgrades.
struct Upgrades {
    /// Validated new versions, switched in at the next batch boundary.
    candidates: Receiver<upgrade::Candidate>,
    /// The version being replaced while the new one runs its first batches.
    probation: Option<upgrade::Probation>,
    admin: Option<AdminServer>,
    /// The validator thread; it holds the checkpoint, so the engine waits for it on drop.
    validator: Option<std::thread::JoinHandle<()>>,
    /// Tells the validator the job is stopping.
    stop: Arc<AtomicBool>,
}

/// How long a stopping job waits for a validation in progress (compiling a large component).
const VALIDATOR_GRACE: Duration = Duration::from_secs(3);

impl Drop for Upgrades {
    /// Answers every upgrade still waiting — handed over, on probation, being validated or
    /// just asked for — with "job stopping", so a stop never waits on an outcome that cannot
    /// come. A build on probation committed nothing: the next start replays its batches with
    /// the build the checkpoint names as active.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while let Ok(candidate) = self.candidates.try_recv() {
            let _ = candidate.reply.send(UpgradeOutcome::job_stopping());
        }
        if let Some(probation) = self.probation.take() {
            let _ = probation.reply.send(UpgradeOutcome::job_stopping());
        }
        drop(self.admin.take());
        if let Some(validator) = self.validator.take() {
            // The validator releases the checkpoint when it ends, so a job started right after
            // this one (in the same process) can open it; a compile is not interrupted, though.
            let deadline = Instant::now() + VALIDATOR_GRACE;
            while !validator.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if validator.is_finished() {
                let _ = validator.join();
            } else {
                tracing::warn!("not waiting for the upgrade validator: it is still validating a candidate");
            }
        }
    }
}

/// The checkpoint and what the engine learned from it at start.
struct JobCheckpoint {
    store: Arc<Checkpoint>,
    /// Every build that processed batches, by digest.
    builds: Builds,
    state_partitions: u32,
    /// The last committed batch's time; later batches get later times.
    last_batch: Option<i64>,
    /// Whether the windowed plugin has an inverse reduce.
    invertible: bool,
}

/// One partition's slice of one batch: the unit of one plugin call.
struct PartitionTask {
    context: BatchContext,
    records: Vec<InputRecord>,
    /// Records of the range the plugin cannot be given (see [`crate::source::record`]).
    unreadable: Vec<Unreadable>,
}

/// What processing a batch produced, ready to deliver and commit.
struct Processed {
    outputs: Vec<OutputRecord>,
    /// Which task (or state partition) each run of outputs came from.
    provenance: Provenances,
    dead_letters: Vec<DeadLetter>,
    /// Rejected records per input topic.
    rejected: BTreeMap<String, u64>,
    skipped: usize,
    changes: BatchChanges,
    /// With `--shared-state` through the shuffle topic: the batch's keyed values (stage 1).
    shuffled: Vec<StageRecord>,
}

impl PartitionTask {
    fn range(&self) -> OffsetRange {
        let ctx = &self.context;
        OffsetRange {
            partition: TopicPartition::new(&ctx.topic, ctx.partition),
            from: ctx.from_offset,
            until: ctx.until_offset,
        }
    }

    /// The record at `offset`, if the task has it (records are in offset order).
    fn record(&self, offset: i64) -> Option<&InputRecord> {
        self.records.binary_search_by_key(&offset, |record| record.offset).ok().map(|index| &self.records[index])
    }

    fn provenance(&self) -> Provenance {
        let ctx = &self.context;
        Provenance::Task {
            topic: ctx.topic.clone(),
            partition: ctx.partition,
            from: ctx.from_offset,
            until: ctx.until_offset,
        }
    }
}

impl BatchReport {
    /// A batch given up uncommitted (`ending`), with nothing delivered that counts.
    fn abandoned(
        batch_time: i64,
        ranges: Vec<OffsetRange>,
        scheduling_delay: Duration,
        took: Duration,
        ending: Ending,
        build: String,
    ) -> BatchReport {
        BatchReport {
            batch_time,
            ranges,
            records_in: 0,
            outputs: 0,
            rejected: 0,
            dead_letters: 0,
            skipped: 0,
            scheduling_delay,
            phases: BatchPhases { fetch: took, ..BatchPhases::default() },
            caught_up: false,
            rate: None,
            replayed: false,
            ending,
            build,
            by_topic: BTreeMap::new(),
            outputs_by_topic: BTreeMap::new(),
        }
    }
}

/// A batch about to run: planned just now, or replayed.
struct Work {
    batch_time: i64,
    ranges: Vec<OffsetRange>,
    /// `false`: a replay whose outputs Kafka already holds (state is rebuilt, nothing sent).
    deliver: bool,
    replayed: bool,
    /// The build a replay was planned with.
    build: Option<String>,
    caught_up: bool,
    rate: Option<f64>,
}

impl Engine {
    /// Opens the checkpoint, loads and initialises the plugin, opens the database, then joins
    /// the consumer group and starts the partitions it assigns. A bad checkpoint, plugin,
    /// plugin configuration or database is refused before the job touches Kafka.
    pub fn start(job: JobConfig) -> Result<Engine> {
        panics::install();
        // The checkpoint comes first: it names the build to run when `--plugin` is left out,
        // and the builds older than the one it runs.
        // A new checkpoint of a shared-state job takes the state partitions its topics have.
        let state_partitions = match job.shared_state && job.checkpoint.is_some() {
            true => shared_state::existing_state_partitions(&job)?,
            false => None,
        };
        let opened = match &job.checkpoint {
            Some(dir) => Some(OpenedCheckpoint::open(dir, &job, state_partitions)?),
            None => None,
        };
        let (plugin, mut first_instance, bytes) = load_plugin(&job, opened.as_ref())?;
        tracing::info!("loaded {} plugin {}", plugin.kind(), plugin.identity());
        check_job_fits_plugin(&job, &plugin)?;
        let (checkpoint, resume) = match opened {
            Some(opened) => {
                let (checkpoint, resume) = opened.continue_with(&job, &plugin, &mut first_instance, &bytes)?;
                (Some(checkpoint), resume)
            }
            None => (None, Resume::default()),
        };
        let postgres = match &job.postgres {
            Some(settings) => {
                if settings.mode == PostgresMode::Transactional && checkpoint.is_some() {
                    bail!(
                        "--postgres-mode transactional keeps the job's offsets in the database; it cannot be \
                         combined with --checkpoint (use --postgres-mode upsert for a job with state)"
                    );
                }
                Some(PostgresSink::connect(settings.clone(), &job.group)?)
            }
            None => None,
        };

        let shared = match &checkpoint {
            Some(checkpoint) if job.shared_state => {
                shared_state::prepare_topics(&job, checkpoint.state_partitions)?;
                let windowed = plugin.kind() == PluginKind::Windowed;
                Some(SharedState::connect(&job, checkpoint.state_partitions, &checkpoint.store, windowed)?)
            }
            _ => None,
        };
        let client = job.kafka_client_config();
        if job.output_topic.is_none() && job.print.is_none() && postgres.is_none() {
            tracing::warn!("no --output-topic or --print: only outputs that name their own topic go anywhere");
        }
        let sinks = Sinks {
            kafka: KafkaSink::new(&client, job.output_topic.clone(), job.broker_timeout, transactional_id(&job))?,
            print: job.print.map(PrintSink::new),
            postgres,
        };
        let own_topics = [shared_state::shuffle_topic(&job.group), shared_state::changelog_topic(&job.group)];
        let state_topic = shared.as_ref().map(|shared| shared.shuffle_topic().to_string());
        let source = KafkaSource::connect(&job, state_topic, own_topics.to_vec())?;

        let rate = RateController::new(job.rate, job.batch_interval)?;
        tracing::info!(
            "member {} of group {}: up to {} workers, batch interval {}",
            job.instance_id,
            job.group,
            job.parallelism,
            humantime::format_duration(job.batch_interval)
        );
        let status = Status {
            plugin: plugin.identity().clone(),
            kind: plugin.kind(),
            member: job.instance_id.clone(),
            partitions: Vec::new(),
            last_batch: checkpoint.as_ref().and_then(|checkpoint| checkpoint.last_batch),
            lag: None,
            probation: None,
            input_rate: None,
        };
        let facts = JobFacts {
            group: job.group.clone(),
            member: job.instance_id.clone(),
            batch_interval_ms: job.batch_interval.as_millis(),
            started_at_ms: now_ms(),
        };
        let observer = Arc::new(Observer::new(facts, status, job.page_batches));
        if let Some(checkpoint) = &checkpoint {
            observer.lineage(&checkpoint.store.plugin_runs()?);
        }
        let metrics_listener = match job.metrics_address {
            Some(address) => Some(observe::serve(address, observer.clone())?),
            None => None,
        };
        let upgrades = match &checkpoint {
            Some(store) => Some(start_upgrades(&job, store, &observer)?),
            None => None,
        };
        let positions = Positions {
            applied_starts: resume.applied_starts,
            newly_applied: Vec::new(),
            checkpoint: resume.offsets,
            group: BTreeMap::new(),
            // With shared state the input's batches keep no state here (stage 1).
            stateful: plugin.kind() != PluginKind::Transform && shared.is_none(),
            shared: shared.is_some(),
        };
        let mut engine = Engine {
            job,
            plugin,
            instances: vec![first_instance],
            source,
            sinks,
            rate,
            checkpoint,
            upgrades,
            positions,
            replays: VecDeque::new(),
            interrupted: resume.pending,
            reposition: false,
            shared,
            observer,
            metrics_listener,
            catching_up: None,
        };
        engine.rebalance()?;
        engine.check_alone()?;
        engine.ensure_workers()?;
        Ok(engine)
    }

    /// A stateful or windowed job keeps its state in one local checkpoint, so it cannot share
    /// its input with another host: a second host is refused, before it processes anything.
    fn check_alone(&self) -> Result<()> {
        if self.plugin.kind() == PluginKind::Transform || self.shared.is_some() {
            return Ok(());
        }
        let owned = self.source.partitions().count();
        let all = self.source.all_partitions()?;
        if owned < all {
            bail!(
                "plugin {} is a {} plugin, and consumer group {} has another member: this host was assigned {owned} of \
                 the {all} input partitions. Without --shared-state a stateful job's keyed state lives in one host's \
                 checkpoint, so it runs on one host at a time; start every host with --shared-state, stop the other \
                 host, or use another --group",
                self.plugin.identity().info.name,
                self.plugin.kind(),
                self.job.group
            );
        }
        Ok(())
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

    /// The partitions this host owns now.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        self.source.partitions().cloned().collect()
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
        let mut batch_time = self.first_batch_time(interval);
        loop {
            // A batch left by the last run (or the rest of one) comes first, with its own time.
            let replaying = !self.replays.is_empty();
            let mut wait = if replaying { 0 } else { batch_time - now_ms() };
            while wait > 0 && !shutdown.is_requested() {
                // The consumer is served while waiting, so a long interval never looks like a
                // dead group member.
                let step = Duration::from_millis(wait.min(1000) as u64);
                tokio::select! {
                    () = tokio::time::sleep(step) => {}
                    () = shutdown.requested() => {}
                }
                tokio::task::block_in_place(|| self.source.keep_alive())?;
                wait = batch_time - now_ms();
            }
            if shutdown.is_requested() {
                break;
            }
            let first = self.observer.totals().batches == 0;
            // The batch itself is blocking work (Kafka client calls, Wasm): keep it off the
            // async worker threads' queues without moving the engine between threads.
            let report = tokio::task::block_in_place(|| {
                // A panic anywhere in the batch ends the job with an error naming where, never
                // silently (the batch is not committed; the next run replays it).
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch(batch_time, first)));
                let report = match run {
                    Ok(report) => report?,
                    Err(_) => bail!("batch {batch_time} ms: internal error {}", panics::describe()),
                };
                log_batch(&report, &self.job.instance_id);
                self.observe(&report);
                if !report.replayed {
                    self.rate.batch_completed(now_ms(), &report);
                }
                observe(&report)?;
                anyhow::Ok(report)
            })?;
            let batches = self.observer.totals().batches;
            if self.job.max_batches.is_some_and(|max| batches >= max) {
                tracing::info!("stopping after {batches} batches (--max-batches)");
                break;
            }
            if self.job.stop_when_caught_up && report.caught_up && self.replays.is_empty() {
                tracing::info!("stopping: every partition is at its high watermark (--stop-when-caught-up)");
                break;
            }
            if !report.replayed {
                batch_time =
                    schedule::next_batch_time(report.batch_time.max(batch_time - interval), now_ms(), interval);
            }
        }
        tokio::task::block_in_place(|| self.publish_state_kept_alone())?;
        if let Some(progress) = self.catching_up.take() {
            progress.finish();
        }
        let summary = self.observer.totals();
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

    /// Reports a finished batch to the metrics and the page, and the progress of catching up
    /// while batches leave input behind.
    fn observe(&mut self, report: &BatchReport) {
        self.observer.batch(report);
        let metrics = &self.observer.metrics;
        for (index, instance) in self.instances.iter().enumerate() {
            metrics.instance_memory(index, instance.memory_bytes());
        }
        if self.metrics_listener.is_some()
            && let Some(checkpoint) = &self.checkpoint
        {
            // Counted once, then kept current by the commits: no scan per batch.
            match checkpoint.store.state_sizes() {
                Ok(sizes) => {
                    for (partition, size) in sizes.iter().enumerate() {
                        metrics.state_size(partition as u32, size.keys, size.bytes);
                    }
                }
                Err(error) => tracing::warn!("cannot count the state for the metrics: {error:#}"),
            }
        }
        // A build's first committed batch (a new checkpoint's, an upgrade's) starts a new
        // entry of the lineage: read it again then, not every batch.
        if report.ending == Ending::Committed
            && !self.observer.lineage_ends_with(&report.build)
            && let Some(checkpoint) = &self.checkpoint
        {
            match checkpoint.store.plugin_runs() {
                Ok(runs) => self.observer.lineage(&runs),
                Err(error) => tracing::warn!("cannot read the plugin lineage for the page: {error:#}"),
            }
        }
        // A batch that left input behind (rate limits, batch bounds) is catching up.
        if report.ending == Ending::Committed && !report.replayed {
            if report.caught_up {
                if let Some(mut progress) = self.catching_up.take() {
                    progress.advance(report.records_in as u64, 0);
                    progress.finish();
                }
            } else {
                let progress = self.catching_up.get_or_insert_with(|| Progress::start("catching up", "records"));
                progress.advance(report.records_in as u64, self.observer.lag_total());
            }
        }
    }

    /// The first batch time of this run: the next tick, but always after every batch the
    /// checkpoint has seen, so batch times (and with them panes and timeouts) never repeat.
    fn first_batch_time(&self, interval: i64) -> i64 {
        let mut first = schedule::first_batch_time(now_ms(), interval);
        let seen = self.checkpoint.as_ref().and_then(|checkpoint| checkpoint.last_batch);
        for time in seen.into_iter().chain(self.replays.iter().map(|replay| replay.batch_time)) {
            first = first.max(time + interval);
        }
        first
    }

    /// Applies the group's assignment changes: revoked partitions leave (their batches have
    /// committed), new ones start where [`Positions`] says. The first time, the plan the last
    /// run left is reconciled with where the partitions start.
    fn rebalance(&mut self) -> Result<()> {
        // State this host kept alone is published before any of it can move to another host.
        self.publish_state_kept_alone()?;
        let database = match &mut self.sinks.postgres {
            Some(postgres) if self.job.postgres.as_ref().is_some_and(|pg| pg.mode == PostgresMode::Transactional) => {
                Some(postgres.offsets()?)
            }
            _ => None,
        };
        let (job, positions) = (&self.job, &mut self.positions);
        let mut started: BTreeMap<TopicPartition, (i64, Option<Committed>)> = BTreeMap::new();
        let rebalanced = self.source.rebalance(|assigned| {
            let chosen = positions.choose(job, assigned, database.as_ref())?;
            for (partition, offset) in assigned.iter().zip(&chosen) {
                started.insert(partition.partition.clone(), (*offset, partition.committed.clone()));
            }
            Ok(chosen)
        })?;
        let member = &self.job.instance_id;
        if !rebalanced.lost.is_empty() {
            tracing::warn!(
                "member {member}: lost {} (its group session expired); their uncommitted batch is replayed by their new owner",
                join(&rebalanced.lost)
            );
        }
        let revoked: Vec<TopicPartition> =
            rebalanced.revoked.iter().filter(|p| !rebalanced.lost.contains(p)).cloned().collect();
        if !revoked.is_empty() {
            tracing::info!("member {member}: revoked {}", join(&revoked));
        }
        for partition in &rebalanced.revoked {
            self.observer.revoked(partition);
        }
        if !rebalanced.revoked.is_empty() || !rebalanced.assigned.is_empty() {
            self.observer.metrics.rebalance();
        }
        if !rebalanced.assigned.is_empty() {
            tracing::info!("member {member}: assigned {}", join(&rebalanced.assigned));
        }
        if let (Some(shared), Some(checkpoint)) = (&mut self.shared, &self.checkpoint) {
            let topic = shared.shuffle_topic().to_string();
            for partition in rebalanced.revoked.iter().filter(|p| p.topic == topic) {
                shared.release(partition.partition as u32);
            }
            for partition in rebalanced.assigned.iter().filter(|p| p.topic == topic) {
                shared.take(partition.partition as u32, &checkpoint.store)?;
            }
        }
        self.reconcile_interrupted(&started);
        // A partition that moved to another member is replayed there, from the group's offset.
        let owned: Vec<TopicPartition> = self.source.partitions().cloned().collect();
        // With shared state, the state partitions held show as their shuffle partitions.
        let state = self.shared.as_ref().map(|shared| {
            shared.owned().iter().map(|p| TopicPartition::new(shared.shuffle_topic(), *p as i32)).collect()
        });
        let held = owned.iter().chain(state.as_ref().map_or(&[][..], Vec::as_slice));
        self.observer.status().partitions = held.map(ToString::to_string).collect();
        for replay in &mut self.replays {
            replay.ranges.retain(|range| owned.contains(&range.partition));
        }
        self.replays.retain(|replay| !replay.ranges.is_empty());
        Ok(())
    }

    /// Turns the plan the checkpoint holds (an earlier batch that did not commit) into replays,
    /// now that `started` says where its partitions continue.
    fn reconcile_interrupted(&mut self, started: &BTreeMap<TopicPartition, (i64, Option<Committed>)>) {
        if started.is_empty() {
            return; // kept until partitions are assigned
        }
        let plans = std::mem::take(&mut self.interrupted);
        if plans.is_empty() {
            return;
        }
        let stateful = self.plugin.kind() != PluginKind::Transform;
        self.replays = reconcile(plans, started, stateful);
        for replay in &self.replays {
            let how = if replay.deliver { "" } else { " to rebuild its state (its outputs are in Kafka already)" };
            tracing::info!(
                "replaying batch {} ms, interrupted before its commit{how}: {}",
                replay.batch_time,
                describe_ranges(&replay.ranges)
            );
        }
    }

    /// After an abandoned batch (fenced, or partitions lost mid-batch) this member's cursors
    /// are past what was committed: moves every owned partition back to where its owner of
    /// record (the group, or the database) says it continues, and replays what the checkpoint
    /// still holds of the abandoned batch.
    fn reposition(&mut self) -> Result<()> {
        let owned = self.partitions();
        let database = match &mut self.sinks.postgres {
            Some(postgres) => postgres.offsets()?,
            None => BTreeMap::new(),
        };
        let committed = self.source.committed(&owned)?;
        let mut started = BTreeMap::new();
        for partition in owned {
            let group = committed.get(&partition).cloned();
            match &group {
                Some(committed) => self.positions.group.insert(partition.clone(), committed.offset),
                None => self.positions.group.remove(&partition),
            };
            let offset = database.get(&partition).copied().or(group.as_ref().map(|c| c.offset));
            if let Some(offset) = offset {
                tracing::info!("{partition} continues at {offset}, where its last committed batch ended");
                self.source.seek(&partition, offset)?;
                started.insert(partition, (offset, group));
            }
        }
        self.interrupted = match &self.checkpoint {
            Some(checkpoint) => checkpoint.store.resume()?.pending,
            None => Vec::new(),
        };
        self.reconcile_interrupted(&started);
        Ok(())
    }

    /// Gives up the batch in flight without committing it: the group moved its partitions
    /// (or some of them) elsewhere. The next boundary moves every partition to where its
    /// owner of record says it continues. A build on probation is rolled back: its held
    /// batches cannot commit any more.
    fn abandon(&mut self, batch_time: i64, reason: &str) {
        tracing::warn!("batch {batch_time} ms abandoned uncommitted: {reason}");
        if self.on_probation() {
            self.roll_back(batch_time, reason, None);
        }
        // With exactly-once delivery nothing of the batch becomes visible.
        if let Err(error) = self.sinks.kafka.abort() {
            tracing::warn!("cannot abort the transaction of batch {batch_time} ms: {error}");
        }
        self.forget_uncommitted_state();
        self.replays.clear();
        self.reposition = true;
    }

    /// One batch, start to commit. An error before the commit step fails the batch (nothing
    /// committed, the job stops and a restart replays it).
    fn run_batch(&mut self, batch_time: i64, first: bool) -> Result<BatchReport> {
        let started = Instant::now();
        tracing::debug!("started batch {batch_time} ms");
        if !first {
            // Topics, partitions and members that came or went since the last batch join (or
            // leave) at this boundary.
            self.source.refresh_topics().with_context(|| format!("batch {batch_time} ms"))?;
            if self.source.rebalance_pending()? {
                if self.on_probation() {
                    // Held batches of partitions that may move cannot wait for probation.
                    self.roll_back(batch_time, "the consumer group rebalanced during probation", None);
                }
                self.rebalance().with_context(|| format!("batch {batch_time} ms"))?;
                self.ensure_workers()?;
            }
            if std::mem::take(&mut self.reposition) {
                self.reposition().with_context(|| format!("batch {batch_time} ms"))?;
            }
        }
        if self.replays.is_empty() {
            self.switch_to_candidate(batch_time)?;
        }
        let work = match self.replays.pop_front() {
            Some(replay) => {
                for range in &replay.ranges {
                    self.source.seek(&range.partition, range.from)?;
                }
                Work {
                    batch_time: replay.batch_time,
                    ranges: replay.ranges,
                    deliver: replay.deliver,
                    replayed: true,
                    build: replay.build,
                    caught_up: false,
                    rate: None,
                }
            }
            None => self.plan(batch_time)?,
        };
        // A replay that only rebuilds state runs the build whose outputs Kafka holds.
        let borrowed = match &work.build {
            Some(build) if !work.deliver && *build != self.plugin.identity().digest => Some(self.borrow_build(build)?),
            _ => None,
        };
        let report = self.run_work(work, started);
        if let Some(own) = borrowed {
            (self.plugin, self.instances) = own;
        }
        report
    }

    /// Runs a replay with `build` (from the checkpoint's build store) in place of the job's
    /// own; returns the job's own, to put back.
    fn borrow_build(&mut self, build: &str) -> Result<(PluginRuntime, Vec<PluginInstance>)> {
        let builds = &self.checkpoint.as_ref().context("a replay without a checkpoint")?.builds;
        let path = builds.path(build);
        let (runtime, instance) = PluginRuntime::load(&path, self.job.plugin_config.clone(), self.job.sandbox.clone())
            .with_context(|| format!("cannot load build {build}, which the replayed batch was planned with"))?;
        tracing::info!("replaying with {}, the build the batch ran with", runtime.identity());
        let plugin = std::mem::replace(&mut self.plugin, runtime);
        let instances = std::mem::replace(&mut self.instances, vec![instance]);
        self.ensure_workers()?;
        Ok((plugin, instances))
    }

    /// The batch `work`, from fetching its records to its commit.
    fn run_work(&mut self, work: Work, started: Instant) -> Result<BatchReport> {
        let scheduling_delay = Duration::from_millis((now_ms() - work.batch_time).max(0) as u64);
        let batch_time = work.batch_time;
        let planned_at = started.elapsed();

        let fetched = match self.source.fetch(&work.ranges, self.job.bounds) {
            Ok(fetched) => fetched,
            Err(error) if error.is::<Lost>() => {
                self.abandon(batch_time, &error.to_string());
                let took = started.elapsed();
                let build = self.plugin.identity().to_string();
                return Ok(BatchReport::abandoned(
                    batch_time,
                    work.ranges,
                    scheduling_delay,
                    took,
                    Ending::Fenced,
                    build,
                ));
            }
            Err(error) => return Err(error.context(format!("batch {batch_time} ms"))),
        };
        // What the batch actually took: a range ends early when its task reached its bounds.
        let ranges: Vec<OffsetRange> = work
            .ranges
            .iter()
            .zip(&fetched.ends)
            .map(|(range, &end)| OffsetRange { partition: range.partition.clone(), from: range.from, until: end })
            .collect();
        // A replay that did not fit its bounds leaves the rest for a next piece, with its time.
        let rest: Vec<OffsetRange> = work
            .ranges
            .iter()
            .zip(&fetched.ends)
            .filter(|(range, end)| **end < range.until)
            .map(|(range, &end)| OffsetRange { partition: range.partition.clone(), from: end, until: range.until })
            .collect();
        let final_piece = !work.replayed || rest.is_empty();
        if !final_piece {
            tracing::info!(
                "batch {batch_time} ms is larger than the batch bounds; the rest runs next: {}",
                describe_ranges(&rest)
            );
            self.replays.push_front(Replay {
                batch_time,
                ranges: rest,
                deliver: work.deliver,
                build: work.build.clone(),
            });
        }
        let keyed = self.keyed(&work).with_context(|| format!("batch {batch_time} ms"))?;
        let plan = PendingBatch {
            batch_time,
            ranges: ranges.clone(),
            build: Some(self.plugin.identity().digest.clone()),
            shared: matches!(keyed, Keyed::Shared(_)),
        };
        if let Some(checkpoint) = &self.checkpoint
            && (!work.replayed || self.shared.is_some())
        {
            // The plan is what the batch took, so a replay after a crash takes exactly that;
            // it follows the batches a build on probation holds. A replay of a shared-state
            // job is recorded again: how it runs (alone, or through the shuffle) decides how
            // a crash after it is recovered.
            let mut pending: Vec<PendingBatch> = match work.replayed {
                true => Vec::new(),
                false => self.probation().map(|probation| probation.held_plans.clone()).unwrap_or_default(),
            };
            pending.push(plan.clone());
            if work.replayed {
                pending.extend(self.replays.iter().map(Replay::plan));
            }
            checkpoint.store.begin_batch(&pending)?;
        }
        failpoint::reached("fetch");
        let fetched_at = started.elapsed();

        let tasks: Vec<PartitionTask> = ranges
            .iter()
            .zip(fetched.records)
            .map(|(range, records)| {
                let mut task = PartitionTask {
                    context: BatchContext {
                        topic: range.partition.topic.clone(),
                        partition: range.partition.partition,
                        from_offset: range.from,
                        until_offset: range.until,
                        batch_time,
                    },
                    records: Vec::with_capacity(records.len()),
                    unreadable: Vec::new(),
                };
                let _work = panics::working_on(|| format!("reading the records of {range}"));
                failpoint::reached("record");
                for record in records {
                    match record.into_input() {
                        Ok(input) => task.records.push(input),
                        Err(unreadable) => task.unreadable.push(unreadable),
                    }
                }
                task
            })
            .collect();
        let records_in = tasks.iter().map(|task| task.records.len() + task.unreadable.len()).sum();
        let rolled_back = |engine: &mut Engine, error: anyhow::Error| {
            let build = engine.plugin.identity().to_string();
            engine.roll_back(batch_time, &format!("{error:#}"), Some(plan.clone()));
            let took = started.elapsed();
            BatchReport::abandoned(batch_time, ranges.clone(), scheduling_delay, took, Ending::RolledBack, build)
        };
        // A new version on probation gets no failure policy: any failure rolls it back.
        let processed = match self.process(batch_time, &tasks, final_piece, keyed) {
            Ok(processed) => processed,
            Err(error) if self.on_probation() => return Ok(rolled_back(self, error)),
            Err(error) => return Err(error),
        };
        let Processed { outputs, provenance, dead_letters, rejected, skipped, changes, shuffled } = processed;
        failpoint::reached("plugin");
        let processed_at = started.elapsed();

        let mut delivered = Delivered::default();
        let mut fenced = false;
        if work.deliver {
            let shuffle = match shuffled.is_empty() {
                true => Ok(()),
                false => shared_state::send(&mut self.sinks.kafka, &shuffled, "write the shuffle topic"),
            };
            let sent = shuffle.and_then(|()| self.deliver(batch_time, &outputs, &provenance, dead_letters, &ranges));
            match sent {
                Ok(Ok(done)) => delivered = done,
                Ok(Err(conflict)) => {
                    self.abandon(batch_time, &conflict);
                    fenced = true;
                }
                Err(error) if self.on_probation() => return Ok(rolled_back(self, error)),
                Err(error) => return Err(error),
            }
        }
        let delivered_at = started.elapsed();

        let ending = if fenced { Ending::Fenced } else { self.commit(&work, plan, changes, records_in > 0)? };
        let phases = BatchPhases {
            plan: planned_at,
            fetch: fetched_at - planned_at,
            plugin: processed_at - fetched_at,
            deliver: delivered_at - processed_at,
            commit: started.elapsed() - delivered_at,
        };
        tracing::debug!("batch {batch_time} ms phases: {phases:?}");
        let mut by_topic: BTreeMap<String, TopicCounts> = BTreeMap::new();
        for task in &tasks {
            by_topic.entry(task.context.topic.clone()).or_default().records_in +=
                (task.records.len() + task.unreadable.len()) as u64;
        }
        for (topic, count) in &rejected {
            by_topic.entry(topic.clone()).or_default().rejected += count;
        }
        let outputs_by_topic = match work.deliver {
            true => self.outputs_by_destination(&outputs),
            false => BTreeMap::new(),
        };
        Ok(BatchReport {
            batch_time,
            ranges,
            records_in,
            outputs: if work.deliver { outputs.len() } else { 0 },
            rejected: rejected.values().sum::<u64>() as usize,
            dead_letters: delivered.dead_letters,
            skipped: skipped + delivered.skipped,
            scheduling_delay,
            phases,
            caught_up: work.caught_up && final_piece && ending == Ending::Committed,
            rate: work.rate,
            replayed: work.replayed,
            ending,
            build: self.plugin.identity().to_string(),
            by_topic,
            outputs_by_topic,
        })
    }

    /// Where outputs go: their own topic, the job's output topic, else the table sink or the
    /// screen.
    fn outputs_by_destination(&self, outputs: &[OutputRecord]) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for output in outputs {
            let destination = match (&output.topic, &self.job.output_topic) {
                (Some(topic), _) | (None, Some(topic)) => topic.as_str(),
                (None, None) if self.sinks.postgres.is_some() => "table",
                (None, None) => "print",
            };
            match counts.get_mut(destination) {
                Some(count) => *count += 1,
                None => {
                    counts.insert(destination.to_string(), 1);
                }
            }
        }
        counts
    }

    /// Delivers the batch's outputs and dead letters to Kafka (and the screen), then its table
    /// rows. `Ok(Err(why))`: another writer moved the database's offsets (the batch is
    /// abandoned, like a fenced one).
    fn deliver(
        &mut self,
        batch_time: i64,
        outputs: &[OutputRecord],
        provenance: &Provenances,
        dead_letters: Vec<DeadLetter>,
        ranges: &[OffsetRange],
    ) -> Result<Result<Delivered, String>> {
        let policy = self.on_failure();
        if !outputs.is_empty() || !dead_letters.is_empty() {
            self.sinks.kafka.begin()?;
        }
        let mut delivery = Delivery {
            kafka: &mut self.sinks.kafka,
            print: self.sinks.print.as_mut(),
            job: &self.job,
            plugin: self.plugin.identity(),
            batch_time,
            policy,
        };
        let mut delivered = delivery
            .deliver(outputs, provenance, dead_letters)
            .with_context(|| format!("batch {batch_time} ms: cannot deliver outputs"))?;
        failpoint::reached("deliver");
        let rows = self.write_rows(batch_time, outputs, provenance, ranges, policy)?;
        failpoint::reached("database");
        Ok(rows.map(|rows| {
            delivered.dead_letters += rows.dead_letters;
            delivered.skipped += rows.skipped;
            delivered
        }))
    }

    /// The commit step of a delivered batch: the consumer group first, the checkpoint second
    /// (see [`commit`]). A batch of a build on probation is held instead, until the build's
    /// last probation batch commits them all.
    fn commit(&mut self, work: &Work, plan: PendingBatch, changes: BatchChanges, had_records: bool) -> Result<Ending> {
        let batch_time = plan.batch_time;
        if let Some(probation) = self.probation_mut() {
            if had_records {
                probation.first_batch.get_or_insert(batch_time);
                probation.batches_left -= 1;
            }
            if probation.batches_left > 0 {
                // A batch that read nothing and changed nothing has nothing to hold.
                if plan.ranges.iter().any(|range| range.until > range.from) || !changes.is_empty() {
                    let schema = self.plugin.identity().info.state_schema_version;
                    let probation = self.probation_mut().expect("on probation");
                    probation.held_plans.push(plan);
                    probation.held.push(HeldChanges { batch_time, schema, changes });
                }
                return Ok(Ending::Held);
            }
        }
        let mut changes = changes;
        if let Some(shared) = &mut self.shared {
            // Stage 2's changes go to the changelog before the group commit: they depend only
            // on stage-1 batches committed earlier, so a batch that fails from here on leaves a
            // changelog its state partition's next owner (or its own restore) continues from
            // (docs/adr/0009). Each batch's changes end with its marker.
            let schema = self.plugin.identity().info.state_schema_version;
            let kafka = &mut self.sinks.kafka;
            if let Some(probation) = self.upgrades.as_mut().and_then(|upgrades| upgrades.probation.as_mut()) {
                for (plan, held) in probation.held_plans.iter().zip(&mut probation.held).filter(|(plan, _)| plan.shared)
                {
                    let metas = std::mem::take(&mut held.changes.partitions);
                    held.changes.partitions =
                        shared.write_changelog(kafka, &held.changes, metas, plan.batch_time, held.schema)?;
                }
            }
            if plan.shared {
                let metas = std::mem::take(&mut changes.partitions);
                changes.partitions = shared.write_changelog(kafka, &changes, metas, batch_time, schema)?;
            }
        }
        // The group's offsets move to the ends of every batch committing now.
        let mut group_ranges = match self.probation() {
            Some(probation) => probation.ends(&plan.ranges),
            None => plan.ranges.clone(),
        };
        // Where stage 2 stands in each shuffle partition goes to the group too: not the
        // authority (the state partition's meta is), but what `host status` and any Kafka
        // tool show as the shuffle's lag.
        if let Some(shared) = &self.shared {
            group_ranges.extend(changes.partitions.iter().map(|(partition, meta)| OffsetRange {
                partition: TopicPartition::new(shared.shuffle_topic(), *partition as i32),
                from: meta.resume,
                until: meta.resume,
            }));
        }
        // Offsets the group holds already are not committed again: an idle member's commits
        // would only add to the coordinator's load, and a commit is what a member joining the
        // group has to wait for (a commit refused during a rebalance is retried until the
        // member has rejoined).
        // Except with windows across hosts: there each commit's batch time moves the
        // watermark, so an idle partition must not hold every window back — unless the group
        // is about to change (a commit then waits for the rebalance; the watermark can wait a
        // batch instead).
        let newly_applied = &self.positions.newly_applied;
        let group = &self.positions.group;
        let windows_shared =
            self.shared.is_some() && self.plugin.kind() == PluginKind::Windowed && !self.source.rebalance_pending()?;
        group_ranges.retain(|range| {
            windows_shared
                || group.get(&range.partition) != Some(&range.until)
                || newly_applied.iter().any(|(partition, _)| *partition == range.partition)
        });
        if work.deliver && self.sinks.kafka.transactional() {
            let advanced = group_ranges.iter().any(|range| range.until > range.from);
            match commit::commit_transaction(
                &mut self.sinks.kafka,
                &self.source,
                &group_ranges,
                advanced,
                batch_time,
                &self.job.instance_id,
                self.plugin.identity(),
                &self.positions.applied_starts,
            ) {
                Ok(()) => {}
                Err(TransactionError::Aborted(cause)) => {
                    self.abandon(batch_time, &format!("its Kafka transaction was aborted ({cause}); it runs again"));
                    return Ok(Ending::Fenced);
                }
                Err(error) => return Err(anyhow::Error::from(error).context(format!("batch {batch_time} ms"))),
            }
        } else if work.deliver {
            let group = commit::commit_group(
                &mut self.source,
                &group_ranges,
                batch_time,
                &self.job.instance_id,
                self.plugin.identity(),
                &self.positions.applied_starts,
                self.shared.is_some() && !plan.shared,
            )?;
            if let GroupCommit::Fenced(reason) = group {
                self.abandon(batch_time, &reason);
                return Ok(Ending::Fenced);
            }
        }
        let probation = self.upgrades.as_mut().and_then(|upgrades| upgrades.probation.take());
        if let Some(checkpoint) = &mut self.checkpoint {
            let (plugin, config, member) =
                (self.plugin.identity(), self.plugin.config(), self.job.instance_id.as_str());
            let mut batches: Vec<BatchCommit<'_>> = Vec::new();
            if let Some(probation) = &probation {
                for (plan, held) in probation.held_plans.iter().zip(&probation.held) {
                    let (batch_time, ranges, changes) = (plan.batch_time, plan.ranges.as_slice(), &held.changes);
                    batches.push(BatchCommit {
                        batch_time,
                        ranges,
                        changes,
                        plugin,
                        config,
                        member,
                        applied_starts: &[],
                    });
                }
            }
            batches.push(BatchCommit {
                batch_time,
                ranges: &plan.ranges,
                changes: &changes,
                plugin,
                config,
                member,
                applied_starts: &self.positions.newly_applied,
            });
            // What is left to run stays planned: the rest of a batch that runs in pieces.
            let pending: Vec<PendingBatch> = self.replays.iter().map(Replay::plan).collect();
            let committing = Instant::now();
            checkpoint.store.commit(&batches, &pending)?;
            self.observer.metrics.checkpoint_commit(committing.elapsed());
            checkpoint.last_batch = Some(batch_time);
            if let Some(shared) = &mut self.shared {
                for batch in &batches {
                    shared.committed(&batch.changes.partitions);
                }
            }
        }
        self.positions.newly_applied.clear();
        for range in &group_ranges {
            self.positions.checkpoint.insert(range.partition.clone(), range.until);
            self.positions.group.insert(range.partition.clone(), range.until);
        }
        if let Some(probation) = probation {
            self.probation_passed(probation);
        }
        Ok(Ending::Committed)
    }

    /// Plans a new batch: ranges up to the high watermarks, within the rate limits and the
    /// batch bounds.
    fn plan(&mut self, batch_time: i64) -> Result<Work> {
        let rate = self.rate.current_rate();
        let max_records = self.job.bounds.max_records as i64;
        let rates = &self.rate;
        let planned = self
            .source
            .plan(|lags| {
                let caps = rates.caps(lags);
                Some(match caps {
                    Some(caps) => caps.into_iter().map(|cap| cap.min(max_records)).collect(),
                    None => vec![max_records; lags.len()],
                })
            })
            .with_context(|| format!("batch {batch_time} ms"))?;
        let caught_up = planned.iter().all(|p| p.range.until >= p.high_watermark);
        self.observer.planned(planned.iter().map(|p| (&p.range.partition, (p.high_watermark - p.range.until).max(0))));
        Ok(Work {
            batch_time,
            ranges: planned.into_iter().map(|p| p.range).collect(),
            deliver: true,
            replayed: false,
            build: None,
            caught_up,
            rate,
        })
    }

    /// Writes the batch's table rows (outputs without a topic) and, in transactional mode, its
    /// offsets, in one database transaction; rows the database refuses follow the policy.
    /// `Ok(Err(why))`: another writer moved the offsets (the batch is abandoned, like a fenced
    /// one).
    fn write_rows(
        &mut self,
        batch_time: i64,
        outputs: &[OutputRecord],
        provenance: &Provenances,
        ranges: &[OffsetRange],
        policy: OnFailure,
    ) -> Result<Result<Delivered, String>> {
        let Some(postgres) = &mut self.sinks.postgres else { return Ok(Ok(Delivered::default())) };
        let indices: Vec<usize> = (0..outputs.len()).filter(|&index| outputs[index].topic.is_none()).collect();
        let rows: Vec<&OutputRecord> = indices.iter().map(|&index| &outputs[index]).collect();
        let mut delivery = Delivery {
            kafka: &mut self.sinks.kafka,
            print: None,
            job: &self.job,
            plugin: self.plugin.identity(),
            batch_time,
            policy,
        };
        let mut outcome = Delivered::default();
        let mut refused = |refused: &[crate::sinks::RejectedRow]| -> Result<()> {
            let from = |row: usize| provenance.of(indices[row]).cloned().unwrap_or(Provenance::State { partition: -1 });
            outcome = delivery.refused_rows(&rows, refused, &from)?;
            Ok(())
        };
        match postgres.write_batch(&rows, ranges, &mut refused) {
            Ok(_) => Ok(Ok(outcome)),
            Err(crate::sinks::WriteError::Conflict(message)) => Ok(Err(message)),
            Err(crate::sinks::WriteError::Failed(error)) => Err(error.context(format!("batch {batch_time} ms"))),
        }
    }

    /// How failures are handled now: by the job's policy, or by rolling back a build on
    /// probation.
    fn on_failure(&self) -> OnFailure {
        if self.on_probation() { OnFailure::RollBack } else { OnFailure::Policy(self.job.failure.policy) }
    }

    /// Runs the plugin over a batch's partition tasks (and, for stateful and windowed plugins,
    /// the state or window step), applying the failure policy to failed tasks and to records
    /// the plugin could not be given. Nothing leaves the engine here: the result is delivered
    /// and committed by the caller. `final_piece`: the batch does not continue in another piece
    /// (a window slide is emitted only then).
    fn process(
        &mut self,
        batch_time: i64,
        tasks: &[PartitionTask],
        final_piece: bool,
        keyed: Keyed,
    ) -> Result<Processed> {
        self.plugin.begin_batch();
        let metrics = &self.observer.metrics;
        let results = run_each(&self.plugin, &mut self.instances, tasks, |instance, task| {
            let _work = panics::working_on(|| format!("running the plugin on {}", task.provenance()));
            let started = Instant::now();
            let result = instance.process(&task.context, &task.records);
            metrics.plugin_task(started.elapsed());
            result
        });
        // A new version on probation gets no retries and no policy: any failure rolls it back.
        let probation = self.on_probation();
        let failures = FailureHandling {
            runtime: &self.plugin,
            policy: self.on_failure(),
            retries: if probation { 0 } else { self.job.failure.retries },
            dead_letter_topic: self.job.failure.dead_letter_topic.as_deref(),
            max_poison: self.job.failure.max_poison,
            metrics,
        };

        let mut outputs: Vec<OutputRecord> = Vec::new();
        let mut provenance = Provenances::default();
        let mut dead_letters: Vec<DeadLetter> = Vec::new();
        let mut values = Vec::with_capacity(results.len());
        let (mut rejected, mut skipped) = (BTreeMap::<String, u64>::new(), 0);
        for (task, result) in tasks.iter().zip(results) {
            let ctx = &task.context;
            // A record the plugin cannot be given is rejected, as a plugin rejects one: logged
            // with its offset and reason, and dead-lettered when the job has a topic for it.
            for unreadable in &task.unreadable {
                let offset = unreadable.record.offset;
                tracing::warn!("rejected {}:{} offset {offset}: {}", ctx.topic, ctx.partition, unreadable.reason);
                if let Some(topic) = failures.dead_letter_topic {
                    let (record, reason) = (unreadable.record.clone(), &unreadable.reason);
                    dead_letters.push(record_dead_letter(
                        topic,
                        self.plugin.identity(),
                        ctx,
                        record,
                        UNREADABLE,
                        reason,
                    ));
                }
            }
            *rejected.entry(ctx.topic.clone()).or_default() += task.unreadable.len() as u64;
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
                    ctx.topic,
                    ctx.partition,
                    rejection.offset,
                    rejection.reason
                );
                if failures.dead_letter_topic.is_some()
                    && let Some(record) = task.record(rejection.offset)
                {
                    let record = crate::source::SourceRecord::from(record);
                    dead_letters.push(failures.dead_letter(ctx, record, "rejected", &rejection.reason)?);
                }
            }
            *rejected.entry(ctx.topic.clone()).or_default() += result.rejections.len() as u64;
            outputs.extend(result.outputs);
            provenance.push(outputs.len(), task.provenance());
            values.push(result.values);
        }
        let mut changes = BatchChanges::default();
        let mut shuffled = Vec::new();
        if let Some(checkpoint) = &self.checkpoint {
            // A later piece of a batch folds into what the earlier pieces of its time left.
            let continuing = checkpoint.last_batch == Some(batch_time);
            // The state as the held batches of a build on probation left it.
            let held = self.upgrades.as_ref().and_then(|upgrades| upgrades.probation.as_ref());
            let view = StateView { checkpoint: &checkpoint.store, held: held.map_or(&[], |probation| &probation.held) };
            let keyed = match self.plugin.kind() {
                PluginKind::Transform => Vec::new(),
                PluginKind::Stateful => {
                    let ranges: Vec<OffsetRange> = tasks.iter().map(PartitionTask::range).collect();
                    let (values, owned) = match (keyed, &mut self.shared) {
                        (Keyed::InProcess, _) => (values, None),
                        (Keyed::Alone { read_to }, Some(shared)) => {
                            changes.partitions = shared.applied_alone(&ranges, &read_to);
                            shared.advance(&changes.partitions);
                            (values, None)
                        }
                        (Keyed::Shared(resolved), Some(shared)) => {
                            shuffled = shared.stage_one(&ranges, values, batch_time);
                            let mut applied = Vec::with_capacity(resolved.len());
                            for (partition, resolved) in resolved {
                                if resolved.meta != shared.meta(partition) {
                                    changes.partitions.push((partition, resolved.meta));
                                }
                                let values = resolved
                                    .values
                                    .into_iter()
                                    .map(|Shuffled { key, value, .. }| KeyedValue { key, value });
                                applied.push(values.collect());
                            }
                            shared.advance(&changes.partitions);
                            (applied, Some(shared.owned().clone()))
                        }
                        (_, None) => bail!("keyed values for the shuffle topic in a job without --shared-state"),
                    };
                    state::StateStep {
                        runtime: &self.plugin,
                        state: &view,
                        partitions: checkpoint.state_partitions,
                        owned: owned.as_ref(),
                        timeout_ms: self.job.state_timeout.map(|timeout| timeout.as_millis() as i64),
                        batch_time,
                    }
                    .run(&mut self.instances, values, &mut changes)?
                }
                PluginKind::Windowed if self.shared.is_some() => {
                    let window = self.job.window.context("a windowed plugin needs --window")?;
                    let (Keyed::Shared(mut resolved), Some(shared)) = (keyed, &mut self.shared) else {
                        bail!("a windowed batch with --shared-state that did not go through the shuffle topic")
                    };
                    let ranges: Vec<OffsetRange> = tasks.iter().map(PartitionTask::range).collect();
                    shuffled = shared.stage_one(&ranges, values, batch_time);
                    let outputs = window::SharedWindowStep {
                        state: &view,
                        partitions: checkpoint.state_partitions,
                        length_ms: window.length.as_millis() as i64,
                        slide_ms: window.slide.as_millis() as i64,
                        invertible: checkpoint.invertible,
                    }
                    .run(&mut self.instances[0], &mut resolved, &mut changes)?;
                    for (partition, resolved) in resolved {
                        if resolved.meta != shared.meta(partition) {
                            changes.partitions.push((partition, resolved.meta));
                        }
                    }
                    shared.advance(&changes.partitions);
                    outputs
                }
                PluginKind::Windowed => {
                    let window = self.job.window.context("a windowed plugin needs --window")?;
                    window::WindowStep {
                        runtime: &self.plugin,
                        state: &view,
                        partitions: checkpoint.state_partitions,
                        length_ms: window.length.as_millis() as i64,
                        slide_ms: window.slide.as_millis() as i64,
                        invertible: checkpoint.invertible,
                        batch_time,
                        continuing,
                        final_piece,
                    }
                    .run(&mut self.instances, values, &mut changes)?
                }
            };
            outputs.extend(keyed);
            provenance.push(outputs.len(), Provenance::State { partition: -1 });
        }
        Ok(Processed { outputs, provenance, dead_letters, rejected, skipped, changes, shuffled })
    }

    /// Where this batch's keyed values go: with `--shared-state`, through the shuffle topic
    /// unless this host runs the job alone — every input and state partition its own and
    /// nothing left in its shuffle partitions — when the in-process shuffle is enough.
    fn keyed(&mut self, work: &Work) -> Result<Keyed> {
        let Some(shared) = &mut self.shared else { return Ok(Keyed::InProcess) };
        if !work.deliver {
            // Rebuilding the state of a batch that ran alone (its values never reached the
            // shuffle topic): in process again, as it ran.
            if !shared.owns_all() {
                bail!(
                    "batch {} ms ran on this host alone and committed its offsets but not its state before the job \
                     stopped; its state partitions have moved to other hosts since, so its state changes cannot be \
                     rebuilt here. Stop the other hosts and start this one alone until it has run a batch",
                    work.batch_time
                );
            }
            return Ok(Keyed::Alone { read_to: BTreeMap::new() });
        }
        let source = &self.source;
        let mut stage_two = shared.read_stage_two(|| {
            let inputs = source.all_input_partitions()?;
            let commits = source.committed(&inputs)?;
            Ok((inputs, commits))
        })?;
        // A windowed job always goes through the shuffle: its panes carry the time of the batch
        // that read their records, and a slide waits for every input partition (the
        // watermark), which one host alone would have to fake.
        let windowed = self.plugin.kind() == PluginKind::Windowed;
        if !windowed
            && stage_two.drained
            && shared.owns_all()
            && source.partitions().count() == source.all_partitions()?
        {
            let read_to = stage_two.resolved.iter().map(|(partition, r)| (*partition, r.meta.resume)).collect();
            return Ok(Keyed::Alone { read_to });
        }
        self.publish_state_kept_alone()?;
        let shared = self.shared.as_mut().expect("checked above");
        shared.published(&mut stage_two.resolved);
        Ok(Keyed::Shared(stage_two.resolved))
    }

    /// With `--shared-state`: publishes the state partitions this host changed while running
    /// alone to the changelog, then commits its input partitions' offsets again without the
    /// "state kept alone" mark, so that another host may take them over. Runs before a group
    /// change is applied, before the first batch that goes through the shuffle, and when the
    /// job stops.
    fn publish_state_kept_alone(&mut self) -> Result<()> {
        let (Some(shared), Some(checkpoint)) = (&mut self.shared, &self.checkpoint) else { return Ok(()) };
        if !shared.publish_dirty(&checkpoint.store, &mut self.sinks.kafka)? {
            return Ok(());
        }
        let owned = self.partitions();
        let committed = self.source.committed(&owned)?;
        let ranges: Vec<OffsetRange> = committed
            .iter()
            .filter(|(_, committed)| committed.metadata.as_ref().is_some_and(|m| m.local_state))
            .map(|(partition, committed)| OffsetRange {
                partition: partition.clone(),
                from: committed.offset,
                until: committed.offset,
            })
            .collect();
        let batch = checkpoint.last_batch.unwrap_or_default();
        let (member, plugin) = (&self.job.instance_id, self.plugin.identity());
        let commit = commit::commit_group(
            &mut self.source,
            &ranges,
            batch,
            member,
            plugin,
            &self.positions.applied_starts,
            false,
        )?;
        if let GroupCommit::Fenced(reason) = commit {
            tracing::warn!("published state kept alone, but could not mark its input offsets as published: {reason}");
        }
        Ok(())
    }

    /// Drops what batches not committed advanced in memory: they run again.
    fn forget_uncommitted_state(&mut self) {
        if let Some(shared) = &mut self.shared {
            shared.forget_uncommitted();
        }
    }
}

/// Starts the admin endpoint and the upgrade validator of a job with a checkpoint.
fn start_upgrades(job: &JobConfig, checkpoint: &JobCheckpoint, observer: &Arc<Observer>) -> Result<Upgrades> {
    let (requests, incoming) = mpsc::channel();
    let (candidates, ready) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let validator = upgrade::Validator {
        job: job.clone(),
        checkpoint: checkpoint.store.clone(),
        builds: checkpoint.builds.clone(),
        requests: incoming,
        candidates,
        observer: observer.clone(),
        stop: stop.clone(),
    };
    let validator = std::thread::Builder::new()
        .name("sluice-upgrades".into())
        .spawn(move || validator.run())
        .context("cannot start the upgrade validator")?;
    let dir = checkpoint.store.path().parent().context("checkpoint file without a directory")?;
    let admin = AdminServer::start(job.admin_address, dir, observer.status_handle(), requests)?;
    Ok(Upgrades { candidates: ready, probation: None, admin: Some(admin), validator: Some(validator), stop })
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
        (PluginKind::Transform, _, _) if job.shared_state => bail!(
            "--shared-state is for stateful and windowed plugins; plugin {name} is a transform (it keeps no \
             state: several hosts share it without this option)"
        ),
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

/// A job's checkpoint, opened before its plugin is loaded.
struct OpenedCheckpoint {
    store: Checkpoint,
    resume: Resume,
    builds: Builds,
}

impl OpenedCheckpoint {
    /// `state_partitions`: for a new checkpoint, the job's (from its shared-state topics);
    /// today's default is one per worker.
    fn open(dir: &Path, job: &JobConfig, state_partitions: Option<u32>) -> Result<OpenedCheckpoint> {
        let mut store = Checkpoint::open(dir, state_partitions.unwrap_or(job.parallelism as u32))?;
        store.keep_touched_index(job.state_timeout.is_some())?;
        let resume = store.resume()?;
        Ok(OpenedCheckpoint { store, resume, builds: Builds::new(dir) })
    }

    /// The build the checkpoint ran last, if it keeps it.
    fn active_build(&self) -> Result<(PathBuf, &PluginRun)> {
        let dir = self.builds.dir();
        let last = self.resume.plugin_runs.last().with_context(|| {
            format!(
                "no plugin given, and checkpoint {} has not run one yet: pass --plugin PATH",
                self.store.path().display()
            )
        })?;
        let path = self.builds.path(&last.digest);
        if !path.exists() {
            bail!(
                "no plugin given: checkpoint {} last ran {} {}, whose build is not kept in {} (checkpoints written \
                 before builds were kept): pass --plugin PATH",
                self.store.path().display(),
                last.name,
                last.version,
                dir.display()
            );
        }
        Ok((path, last))
    }

    /// Checks that `plugin` may continue the checkpoint's state and keeps its build. Returns
    /// the checkpoint with where the job resumes.
    fn continue_with(
        self,
        job: &JobConfig,
        plugin: &PluginRuntime,
        instance: &mut PluginInstance,
        bytes: &[u8],
    ) -> Result<(JobCheckpoint, Resume)> {
        let OpenedCheckpoint { store, resume, builds } = self;
        let info = &plugin.identity().info;
        if let Some(last) = resume.plugin_runs.last().filter(|_| resume.has_state) {
            check_can_continue(last, plugin, store.path())?;
        }
        check_not_older(&resume.plugin_runs, plugin, store.path(), job.force)?;
        let invertible = plugin.kind() == PluginKind::Windowed
            && instance.inverse_reduce(&[]).map_err(|e| anyhow::anyhow!("plugin {}: {e}", info.name))?.is_some();
        builds.keep(&plugin.identity().digest, bytes)?;
        let state_partitions = store.state_partitions()?;
        match resume.last_batch {
            Some(last) => tracing::info!("resuming from checkpoint {}, last batch {last} ms", store.path().display()),
            None => tracing::info!("starting a new checkpoint in {}", store.path().display()),
        }
        let last_batch = resume.last_batch;
        let checkpoint = JobCheckpoint { store: Arc::new(store), builds, state_partitions, last_batch, invertible };
        Ok((checkpoint, resume))
    }
}

/// Reads and loads the plugin build to start with: `--plugin`, or else the build the
/// checkpoint ran last. Returns it with its bytes, for the checkpoint's build store.
fn load_plugin(
    job: &JobConfig,
    checkpoint: Option<&OpenedCheckpoint>,
) -> Result<(PluginRuntime, PluginInstance, Vec<u8>)> {
    let path = match (&job.plugin, checkpoint) {
        (Some(path), _) => path.clone(),
        (None, Some(checkpoint)) => {
            let (path, last) = checkpoint.active_build()?;
            tracing::info!(
                "no --plugin: continuing with {} {}, the build checkpoint {} ran last",
                last.name,
                last.version,
                checkpoint.store.path().display()
            );
            path
        }
        (None, None) => bail!("no plugin given: pass --plugin PATH"),
    };
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read plugin {}", path.display()))?;
    let (runtime, instance) = PluginRuntime::from_bytes(&bytes, job.plugin_config.clone(), job.sandbox.clone())
        .with_context(|| format!("plugin {}", path.display()))?;
    Ok((runtime, instance, bytes))
}

/// Refuses a build the checkpoint ran before the one it runs now (an upgrade happened since,
/// and starting the old file again would silently undo it), unless `force`. A build the
/// checkpoint never ran is an upgrade at start, checked by [`check_can_continue`].
fn check_not_older(runs: &[PluginRun], plugin: &PluginRuntime, path: &Path, force: bool) -> Result<()> {
    let Some(active) = runs.last() else { return Ok(()) };
    let given = plugin.identity();
    if active.digest == given.digest {
        return Ok(());
    }
    let Some(earlier) = runs.iter().rev().find(|run| run.digest == given.digest) else { return Ok(()) };
    let short = |digest: &str| digest[..digest.len().min(12)].to_string();
    if force {
        tracing::warn!(
            "--force: going back from {} {} to the older build {} {} (sha256 {})",
            active.name,
            active.version,
            earlier.name,
            earlier.version,
            short(&earlier.digest)
        );
        return Ok(());
    }
    bail!(
        "checkpoint {} runs {} {} (sha256 {}) since batch {} ms, and plugin {} {} (sha256 {}) is a build it ran \
         earlier (until batch {} ms). Leave out --plugin to continue with {} {}, or pass --force to go back to {} {}",
        path.display(),
        active.name,
        active.version,
        short(&active.digest),
        active.first_batch,
        earlier.name,
        earlier.version,
        short(&earlier.digest),
        earlier.last_batch,
        active.name,
        active.version,
        earlier.name,
        earlier.version
    )
}

fn log_batch(report: &BatchReport, member: &str) {
    let ranges = describe_ranges(&report.ranges);
    let failed = match (report.dead_letters, report.skipped) {
        (0, 0) => String::new(),
        (dead_letters, skipped) => format!(", {dead_letters} dead letters, {skipped} skipped"),
    };
    let rate = match report.rate {
        Some(rate) => format!("; rate limit {rate:.0} records/s"),
        None => String::new(),
    };
    let outcome = match (report.ending, report.replayed) {
        (Ending::Fenced, _) => " (abandoned: fenced)",
        (Ending::RolledBack, _) => " (abandoned: rolled back)",
        (Ending::Held, _) => " (held: probation)",
        (Ending::Committed, true) => " (replayed)",
        (Ending::Committed, false) => "",
    };
    tracing::info!(
        "batch {} ms on {member}{outcome}: {} in, {} out, {} rejected{failed}; processing {} ms, scheduling delay {} ms, total delay {} ms{rate}; {}",
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

/// The transactional id of `--delivery exactly-once`: stable per job and member, so a restarted
/// host fences its previous incarnation and aborts the transaction it left open.
fn transactional_id(job: &JobConfig) -> Option<String> {
    (job.delivery == DeliveryGuarantee::ExactlyOnce).then(|| format!("sluice-{}-{}", job.group, job.instance_id))
}
