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
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

pub use rate::RateController;
pub use shutdown::Shutdown;
pub use upgrade::{PROBATION_BATCHES, UpgradeOutcome, UpgradeRequest};

use crate::admin::AdminServer;
use crate::checkpoint::{BatchChanges, BatchCommit, Checkpoint, PendingBatch, PluginRun, Resume};
use crate::config::{FailurePolicy, JobConfig, PostgresMode};
use crate::offsets::{OffsetRange, TopicPartition, describe_ranges};
use crate::runtime::{
    BatchContext, InputRecord, OutputRecord, PluginIdentity, PluginInstance, PluginKind, PluginRuntime,
};
use crate::sinks::{DeadLetter, KafkaSink, PostgresSink, PrintSink, Sinks};
use crate::source::{Committed, KafkaSource, Lost, Unreadable, join};
use crate::{failpoint, panics};
use assignment::{Positions, Replay, reconcile};
use commit::GroupCommit;
use delivery::{Delivered, Delivery, Provenances};
use failure::{FailureHandling, Provenance, UNREADABLE, record_dead_letter};
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
    /// The plan the last run left, until the first assignment says which of it is still ours.
    interrupted: Option<PendingBatch>,
    /// A batch was abandoned (fenced): the next boundary moves every partition back to where
    /// the group (or the database) says it continues.
    reposition: bool,
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
    rejected: usize,
    skipped: usize,
    changes: BatchChanges,
}

impl PartitionTask {
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

/// What one batch did, as logged.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    pub records_in: usize,
    pub outputs: usize,
    pub rejected: usize,
    /// Records sent to the dead-letter topic (rejections, isolated poison records, records the
    /// plugin could not be given and outputs that could not be delivered).
    pub dead_letters: usize,
    /// Records of failed tasks skipped under `--on-failure skip` (and outputs that could not be
    /// delivered).
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
    /// Whether this ran a plan an earlier run did not commit (or the rest of one).
    pub replayed: bool,
    /// Whether the batch was abandoned uncommitted because the group gave its partitions to
    /// another member (they are replayed by their new owner).
    pub fenced: bool,
}

/// The steps of one batch and how long each took; together they make up its processing time.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchPhases {
    /// Assignment changes, topic discovery, upgrade switch, offset-range planning.
    pub plan: Duration,
    /// Reading the ranges' records, and recording the batch's plan in the checkpoint.
    pub fetch: Duration,
    /// Plugin calls, state and windows.
    pub plugin: Duration,
    /// Waiting for the sinks to acknowledge every output.
    pub deliver: Duration,
    /// The consumer-group commit and the checkpoint transaction.
    pub commit: Duration,
}

impl BatchReport {
    /// A batch given up before processing because the group took its partitions away.
    fn abandoned(batch_time: i64, ranges: Vec<OffsetRange>, scheduling_delay: Duration, took: Duration) -> BatchReport {
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
            fenced: true,
        }
    }

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

/// A batch about to run: planned just now, or replayed.
struct Work {
    batch_time: i64,
    ranges: Vec<OffsetRange>,
    /// `false`: a replay whose outputs Kafka already holds (state is rebuilt, nothing sent).
    deliver: bool,
    replayed: bool,
    caught_up: bool,
    rate: Option<f64>,
}

impl Engine {
    /// Loads and initialises the plugin, opens the checkpoint and the database, then joins the
    /// consumer group and starts the partitions it assigns. The plugin comes first so that a
    /// bad plugin or plugin configuration is refused before the job touches Kafka.
    pub fn start(job: JobConfig) -> Result<Engine> {
        panics::install();
        let (plugin, mut first_instance) =
            PluginRuntime::load(&job.plugin, job.plugin_config.clone(), job.sandbox.clone())?;
        tracing::info!("loaded {} plugin {}", plugin.kind(), plugin.identity());
        check_job_fits_plugin(&job, &plugin)?;
        // The checkpoint and the database are opened (and bad ones refused) before Kafka is touched.
        let (checkpoint, resume) = match &job.checkpoint {
            Some(dir) => {
                let (checkpoint, resume) = open_checkpoint(dir, &job, &plugin, &mut first_instance)?;
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

        let client = job.kafka_client_config();
        if job.output_topic.is_none() && job.print.is_none() && postgres.is_none() {
            tracing::warn!("no --output-topic or --print: only outputs that name their own topic go anywhere");
        }
        let sinks = Sinks {
            kafka: KafkaSink::new(&client, job.output_topic.clone(), job.broker_timeout)?,
            print: job.print.map(PrintSink::new),
            postgres,
        };
        let source = KafkaSource::connect(&job)?;

        let rate = RateController::new(job.rate, job.batch_interval)?;
        tracing::info!(
            "member {} of group {}: up to {} workers, batch interval {}",
            job.instance_id,
            job.group,
            job.parallelism,
            humantime::format_duration(job.batch_interval)
        );
        let upgrades = match &checkpoint {
            Some(store) => Some(start_upgrades(&job, &plugin, store)?),
            None => None,
        };
        let positions =
            Positions { applied_starts: resume.applied_starts, newly_applied: Vec::new(), checkpoint: resume.offsets };
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
        };
        engine.rebalance()?;
        engine.check_alone()?;
        engine.ensure_workers()?;
        Ok(engine)
    }

    /// A stateful or windowed job keeps its state in one local checkpoint, so it cannot share
    /// its input with another host: a second host is refused, before it processes anything.
    fn check_alone(&self) -> Result<()> {
        if self.plugin.kind() == PluginKind::Transform {
            return Ok(());
        }
        let owned = self.source.partitions().count();
        let all = self.source.all_partitions()?;
        if owned < all {
            bail!(
                "plugin {} is a {} plugin, and consumer group {} has another member: this host was assigned {owned} of \
                 the {all} input partitions. A stateful job's keyed state lives in one host's checkpoint, so it runs on \
                 one host at a time; stop the other host, or use another --group",
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
        let mut summary = RunSummary::default();
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
            let first = summary.batches == 0;
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
                if !report.replayed {
                    self.rate.batch_completed(now_ms(), &report);
                }
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
            if self.job.stop_when_caught_up && report.caught_up && self.replays.is_empty() {
                tracing::info!("stopping: every partition is at its high watermark (--stop-when-caught-up)");
                break;
            }
            if !report.replayed {
                batch_time =
                    schedule::next_batch_time(report.batch_time.max(batch_time - interval), now_ms(), interval);
            }
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
        if !rebalanced.assigned.is_empty() {
            tracing::info!("member {member}: assigned {}", join(&rebalanced.assigned));
        }
        self.reconcile_interrupted(&started);
        // A partition that moved to another member is replayed there, from the group's offset.
        let owned: Vec<TopicPartition> = self.source.partitions().cloned().collect();
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
        let Some(plan) = self.interrupted.take() else { return };
        let stateful = self.plugin.kind() != PluginKind::Transform;
        self.replays = reconcile(plan, started, stateful);
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
            let offset = database.get(&partition).copied().or(group.as_ref().map(|c| c.offset));
            if let Some(offset) = offset {
                tracing::info!("{partition} continues at {offset}, where its last committed batch ended");
                self.source.seek(&partition, offset)?;
                started.insert(partition, (offset, group));
            }
        }
        self.interrupted = match &self.checkpoint {
            Some(checkpoint) => checkpoint.store.resume()?.pending,
            None => None,
        };
        self.reconcile_interrupted(&started);
        Ok(())
    }

    /// Gives up the batch in flight without committing it: the group moved its partitions
    /// (or some of them) elsewhere. The next boundary moves every partition to where its
    /// owner of record says it continues.
    fn abandon(&mut self, batch_time: i64, reason: &str) {
        tracing::warn!("batch {batch_time} ms abandoned uncommitted: {reason}");
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
                self.rebalance().with_context(|| format!("batch {batch_time} ms"))?;
                self.ensure_workers()?;
            }
            if std::mem::take(&mut self.reposition) {
                self.reposition().with_context(|| format!("batch {batch_time} ms"))?;
            }
        }
        self.switch_to_candidate(batch_time)?;
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
                    caught_up: false,
                    rate: None,
                }
            }
            None => self.plan(batch_time)?,
        };
        let scheduling_delay = Duration::from_millis((now_ms() - work.batch_time).max(0) as u64);
        let batch_time = work.batch_time;
        let planned_at = started.elapsed();

        let fetched = match self.source.fetch(&work.ranges, self.job.bounds) {
            Ok(fetched) => fetched,
            Err(error) if error.is::<Lost>() => {
                self.abandon(batch_time, &error.to_string());
                return Ok(BatchReport::abandoned(batch_time, work.ranges, scheduling_delay, started.elapsed()));
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
        let remainder = (work.replayed && !rest.is_empty()).then(|| PendingBatch { batch_time, ranges: rest.clone() });
        if let Some(remainder) = &remainder {
            tracing::info!(
                "batch {batch_time} ms is larger than the batch bounds; the rest runs next: {}",
                describe_ranges(&remainder.ranges)
            );
            self.replays.push_front(Replay { batch_time, ranges: rest, deliver: work.deliver });
        }
        if let Some(checkpoint) = &self.checkpoint
            && !work.replayed
        {
            // The plan is what the batch took, so a replay after a crash takes exactly that.
            checkpoint.store.begin_batch(&PendingBatch { batch_time, ranges: ranges.clone() })?;
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
        let final_piece = remainder.is_none();
        let processed = match self.process(batch_time, &tasks, final_piece) {
            Ok(processed) => {
                if records_in > 0 {
                    self.probation_passed(batch_time);
                }
                processed
            }
            Err(error) if self.on_probation() => {
                self.roll_back(batch_time, &error)?;
                self.process(batch_time, &tasks, final_piece)?
            }
            Err(error) => return Err(error),
        };
        let Processed { outputs, provenance, dead_letters, rejected, skipped, changes } = processed;
        failpoint::reached("plugin");
        let processed_at = started.elapsed();

        let policy = if self.on_probation() { FailurePolicy::Halt } else { self.job.failure.policy };
        let mut delivered = Delivered::default();
        let mut fenced = false;
        if work.deliver {
            let mut delivery = Delivery {
                kafka: &mut self.sinks.kafka,
                print: self.sinks.print.as_mut(),
                job: &self.job,
                plugin: self.plugin.identity(),
                batch_time,
                policy,
            };
            delivered = delivery
                .deliver(&outputs, &provenance, dead_letters)
                .with_context(|| format!("batch {batch_time} ms: cannot deliver outputs"))?;
            failpoint::reached("deliver");
            match self.write_rows(batch_time, &outputs, &provenance, &ranges, policy)? {
                Ok(rows) => {
                    delivered.dead_letters += rows.dead_letters;
                    delivered.skipped += rows.skipped;
                }
                Err(conflict) => {
                    self.abandon(batch_time, &conflict);
                    fenced = true;
                }
            }
            failpoint::reached("database");
        }
        let delivered_at = started.elapsed();

        if work.deliver && !fenced {
            let group = commit::commit_group(
                &mut self.source,
                &ranges,
                batch_time,
                &self.job.instance_id,
                self.plugin.identity(),
                &self.positions.applied_starts,
            )?;
            if let GroupCommit::Fenced(reason) = group {
                self.abandon(batch_time, &reason);
                fenced = true;
            }
        }
        if !fenced {
            if let Some(checkpoint) = &mut self.checkpoint {
                let commit = BatchCommit {
                    batch_time,
                    ranges: &ranges,
                    changes: &changes,
                    plugin: self.plugin.identity(),
                    config: self.plugin.config(),
                    member: &self.job.instance_id,
                    applied_starts: &self.positions.newly_applied,
                    remainder: remainder.as_ref(),
                };
                commit::commit_checkpoint(&checkpoint.store, &commit)?;
                checkpoint.last_batch = Some(batch_time);
            }
            self.positions.newly_applied.clear();
            for range in &ranges {
                self.positions.checkpoint.insert(range.partition.clone(), range.until);
            }
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
        Ok(BatchReport {
            batch_time,
            ranges,
            records_in,
            outputs: if work.deliver { outputs.len() } else { 0 },
            rejected,
            dead_letters: delivered.dead_letters,
            skipped: skipped + delivered.skipped,
            scheduling_delay,
            phases,
            caught_up: work.caught_up && remainder.is_none() && !fenced,
            rate: work.rate,
            replayed: work.replayed,
            fenced,
        })
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
        let lag = planned.iter().map(|p| (p.high_watermark - p.range.until).max(0)).sum();
        if let Some(upgrades) = &self.upgrades {
            upgrades.status.lock().expect("not poisoned").lag = Some(lag);
        }
        Ok(Work {
            batch_time,
            ranges: planned.into_iter().map(|p| p.range).collect(),
            deliver: true,
            replayed: false,
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
        policy: FailurePolicy,
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
    /// the state or window step), applying the failure policy to failed tasks and to records
    /// the plugin could not be given. Nothing leaves the engine here: the result is delivered
    /// and committed by the caller. `final_piece`: the batch does not continue in another piece
    /// (a window slide is emitted only then).
    fn process(&mut self, batch_time: i64, tasks: &[PartitionTask], final_piece: bool) -> Result<Processed> {
        self.plugin.begin_batch();
        let results = run_each(&self.plugin, &mut self.instances, tasks, |instance, task| {
            let _work = panics::working_on(|| format!("running the plugin on {}", task.provenance()));
            instance.process(&task.context, &task.records)
        });
        // A new version on probation gets no retries and no policy: any failure rolls it back.
        let probation = self.on_probation();
        let failures = FailureHandling {
            runtime: &self.plugin,
            policy: if probation { FailurePolicy::Halt } else { self.job.failure.policy },
            retries: if probation { 0 } else { self.job.failure.retries },
            dead_letter_topic: self.job.failure.dead_letter_topic.as_deref(),
            max_poison: self.job.failure.max_poison,
        };

        let mut outputs: Vec<OutputRecord> = Vec::new();
        let mut provenance = Provenances::default();
        let mut dead_letters: Vec<DeadLetter> = Vec::new();
        let mut values = Vec::with_capacity(results.len());
        let (mut rejected, mut skipped) = (0, 0);
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
            rejected += task.unreadable.len();
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
            rejected += result.rejections.len();
            outputs.extend(result.outputs);
            provenance.push(outputs.len(), task.provenance());
            values.push(result.values);
        }
        let mut changes = BatchChanges::default();
        if let Some(checkpoint) = &self.checkpoint {
            // A later piece of a batch folds into what the earlier pieces of its time left.
            let continuing = checkpoint.last_batch == Some(batch_time);
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
                        continuing,
                        final_piece,
                    }
                    .run(&mut self.instances, values, &mut changes)?
                }
            };
            outputs.extend(keyed);
            provenance.push(outputs.len(), Provenance::State { partition: -1 });
        }
        Ok(Processed { outputs, provenance, dead_letters, rejected, skipped, changes })
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
/// with what the checkpoint says about where the job resumes.
fn open_checkpoint(
    dir: &std::path::Path,
    job: &JobConfig,
    plugin: &PluginRuntime,
    instance: &mut PluginInstance,
) -> Result<(JobCheckpoint, Resume)> {
    let mut store = Checkpoint::open(dir, job.parallelism as u32)?;
    store.keep_touched_index(job.state_timeout.is_some())?;
    let store = Arc::new(store);
    let resume = store.resume()?;
    let info = &plugin.identity().info;
    if let Some(last) = resume.last_plugin.as_ref().filter(|_| resume.has_state) {
        check_can_continue(last, plugin, store.path())?;
    }
    let invertible = plugin.kind() == PluginKind::Windowed
        && instance.inverse_reduce(&[]).map_err(|e| anyhow::anyhow!("plugin {}: {e}", info.name))?.is_some();
    let state_partitions = store.state_partitions()?;
    match resume.last_batch {
        Some(last) => tracing::info!("resuming from checkpoint {}, last batch {last} ms", store.path().display()),
        None => tracing::info!("starting a new checkpoint in {}", store.path().display()),
    }
    let last_batch = resume.last_batch;
    Ok((JobCheckpoint { store, state_partitions, last_batch, invertible }, resume))
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
    let outcome = match (report.replayed, report.fenced) {
        (_, true) => " (abandoned: fenced)",
        (true, false) => " (replayed)",
        (false, false) => "",
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
