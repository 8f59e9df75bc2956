//! The batch loop: at each batch time, plan offset ranges, fetch them, run one plugin call per
//! partition task on a bounded pool of plugin instances, deliver the outputs, then commit.

mod commit;
mod rate;
mod schedule;
mod shutdown;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

pub use rate::RateController;
pub use shutdown::Shutdown;

use crate::config::JobConfig;
use crate::runtime::{BatchContext, BatchOutput, InputRecord, OutputRecord, PluginInstance, PluginRuntime, TaskError};
use crate::sinks::{KafkaSink, PrintSink, Sinks};
use crate::source::{KafkaSource, OffsetRange};

/// A job being run: its plugin, its source and its sinks.
pub struct Engine {
    job: JobConfig,
    plugin: PluginRuntime,
    /// One instance per worker; a partition task runs on whichever worker takes it.
    instances: Vec<PluginInstance>,
    source: KafkaSource,
    sinks: Sinks,
    rate: RateController,
}

/// One partition's slice of one batch: the unit of one plugin call.
struct PartitionTask {
    context: BatchContext,
    records: Vec<InputRecord>,
}

/// What one batch did, as logged.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    pub records_in: usize,
    pub outputs: usize,
    pub rejected: usize,
    /// From the batch's start to its commit.
    pub processing: Duration,
    /// How late the batch started relative to its batch time.
    pub scheduling_delay: Duration,
    /// Whether the batch left every partition at the high watermark seen when planning.
    pub caught_up: bool,
    /// The rate limit the batch was planned with, in records per second for the whole job
    /// (`None`: unlimited, or only `--max-rate-per-partition`).
    pub rate: Option<f64>,
}

impl BatchReport {
    /// Scheduling delay plus processing time: how far behind its batch time the batch finished.
    pub fn total_delay(&self) -> Duration {
        self.scheduling_delay + self.processing
    }
}

/// Totals over a run, reported when the job stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub records_in: u64,
    pub outputs: u64,
    pub rejected: u64,
}

impl Engine {
    /// Loads and initialises the plugin, then connects to Kafka and picks starting offsets.
    /// The plugin comes first so that a bad plugin or plugin configuration is refused before
    /// the job touches Kafka.
    pub fn start(job: JobConfig) -> Result<Engine> {
        let (plugin, first_instance) = PluginRuntime::load(&job.plugin, job.plugin_config.clone())?;
        tracing::info!("loaded plugin {}", plugin.identity());

        let client = job.kafka_client_config();
        if job.output_topic.is_none() && job.print.is_none() {
            tracing::warn!("no --output-topic or --print: only outputs that name their own topic go anywhere");
        }
        let sinks = Sinks {
            kafka: KafkaSink::new(&client, job.output_topic.clone(), job.broker_timeout)?,
            print: job.print.map(PrintSink::new),
        };
        let source = KafkaSource::connect(&job)?;

        let rate = RateController::new(job.rate, job.batch_interval)?;
        tracing::info!(
            "processing with up to {} workers, batch interval {}",
            job.parallelism,
            humantime::format_duration(job.batch_interval)
        );
        let mut engine = Engine { job, plugin, instances: vec![first_instance], source, sinks, rate };
        engine.ensure_workers()?;
        Ok(engine)
    }

    /// Makes an instance for every worker the current partitions can keep busy.
    fn ensure_workers(&mut self) -> Result<()> {
        let workers = self.job.parallelism.min(self.source.partitions().count()).max(1);
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
        let mut batch_time = schedule::first_batch_time(now_ms(), interval);
        // The last batch whose group commit failed; the next commit covers it (commits are
        // cumulative), and the job does not stop without one succeeding.
        let mut uncommitted: Option<Vec<OffsetRange>> = None;
        loop {
            let wait = batch_time - now_ms();
            if wait > 0 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    () = shutdown.requested() => {}
                }
            }
            if shutdown.is_requested() {
                break;
            }
            let scheduling_delay = Duration::from_millis((now_ms() - batch_time).max(0) as u64);
            // The batch itself is blocking work (Kafka client calls, Wasm): keep it off the
            // async worker threads' queues without moving the engine between threads.
            let report = tokio::task::block_in_place(|| {
                let (report, committed) = self.run_batch(batch_time, scheduling_delay, summary.batches == 0)?;
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

            if self.job.max_batches.is_some_and(|max| summary.batches >= max) {
                tracing::info!("stopping after {} batches (--max-batches)", summary.batches);
                break;
            }
            if self.job.stop_when_caught_up && report.caught_up {
                tracing::info!("stopping: every partition is at its high watermark (--stop-when-caught-up)");
                break;
            }
            batch_time = schedule::next_batch_time(batch_time, now_ms(), interval);
        }
        if let Some(ranges) = uncommitted {
            tokio::task::block_in_place(|| self.source.commit(&ranges))
                .context("stopping with the last batch's offsets uncommitted; the next run replays it")?;
        }
        tracing::info!(
            "stopped after {} batches: {} records in, {} out, {} rejected",
            summary.batches,
            summary.records_in,
            summary.outputs,
            summary.rejected
        );
        Ok(summary)
    }

    /// One batch, start to commit. An error before the commit step fails the batch (nothing
    /// committed, the job stops and a restart replays it); the commit's own outcome is returned
    /// beside the report, because a failed group commit is covered by the next one.
    fn run_batch(
        &mut self,
        batch_time: i64,
        scheduling_delay: Duration,
        first: bool,
    ) -> Result<(BatchReport, Result<()>)> {
        let started = Instant::now();
        tracing::debug!("started batch {batch_time} ms");
        if !first {
            // Topics and partitions created (or deleted) since the last batch join (or leave)
            // at this boundary.
            self.source.refresh_partitions().with_context(|| format!("batch {batch_time} ms"))?;
            self.ensure_workers()?;
        }
        let rate = self.rate.current_rate();
        let planned = self.source.plan(|lags| self.rate.caps(lags)).with_context(|| format!("batch {batch_time} ms"))?;
        let caught_up = planned.iter().all(|p| p.range.until >= p.high_watermark);
        let ranges: Vec<OffsetRange> = planned.into_iter().map(|p| p.range).collect();
        let planned_at = started.elapsed();
        let inputs = self.source.fetch(&ranges).with_context(|| format!("batch {batch_time} ms"))?;
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
        let results = process_in_parallel(&mut self.instances, &tasks)?;
        let processed_at = started.elapsed();

        let mut outputs: Vec<OutputRecord> = Vec::with_capacity(results.iter().map(|r| r.outputs.len()).sum());
        let mut rejected = 0;
        for (task, result) in tasks.iter().zip(results) {
            for rejection in &result.rejections {
                tracing::warn!(
                    "rejected {}:{} offset {}: {}",
                    task.context.topic,
                    task.context.partition,
                    rejection.offset,
                    rejection.reason
                );
            }
            rejected += result.rejections.len();
            outputs.extend(result.outputs);
        }

        self.sinks.deliver(batch_time, &outputs).with_context(|| format!("batch {batch_time} ms: cannot deliver outputs"))?;
        let delivered_at = started.elapsed();
        let committed = commit::commit_batch(&self.source, batch_time, &ranges);
        tracing::debug!(
            "batch {batch_time} ms phases: plan {:?}, fetch {:?}, plugin {:?}, deliver {:?}, commit {:?}",
            planned_at,
            fetched_at - planned_at,
            processed_at - fetched_at,
            delivered_at - processed_at,
            started.elapsed() - delivered_at
        );
        let report = BatchReport {
            batch_time,
            ranges,
            records_in,
            outputs: outputs.len(),
            rejected,
            processing: started.elapsed(),
            scheduling_delay,
            caught_up,
            rate,
        };
        Ok((report, committed))
    }
}

/// Runs every task on the instances, at most one thread per instance, each instance used by
/// one thread only. Results come back in task order.
fn process_in_parallel(instances: &mut [PluginInstance], tasks: &[PartitionTask]) -> Result<Vec<BatchOutput>, TaskError> {
    let next_task = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<BatchOutput, TaskError>>>> = tasks.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for instance in instances.iter_mut().take(tasks.len()) {
            let (next_task, results) = (&next_task, &results);
            scope.spawn(move || {
                loop {
                    let index = next_task.fetch_add(1, Ordering::Relaxed);
                    let Some(task) = tasks.get(index) else { break };
                    let result = instance.process(&task.context, &task.records);
                    let failed = result.is_err();
                    *results[index].lock().expect("not poisoned") = Some(result);
                    if failed {
                        // A trapped instance is unusable; leave the remaining tasks to others.
                        break;
                    }
                }
            });
        }
    });
    // Tasks are taken in order, so every task without a result comes after a failed one and
    // the first error is returned before one is reached.
    results
        .into_iter()
        .map_while(|result| result.into_inner().expect("not poisoned"))
        .collect::<Result<Vec<_>, _>>()
}

fn log_batch(report: &BatchReport) {
    let mut ranges = String::new();
    for range in report.ranges.iter().filter(|range| !range.is_empty()) {
        let _ = write!(ranges, "{}{range}", if ranges.is_empty() { "" } else { ", " });
    }
    if ranges.is_empty() {
        ranges.push_str("no new records");
    }
    let rate = match report.rate {
        Some(rate) => format!("; rate limit {rate:.0} records/s"),
        None => String::new(),
    };
    tracing::info!(
        "batch {} ms: {} in, {} out, {} rejected; processing {} ms, scheduling delay {} ms, total delay {} ms{rate}; {}",
        report.batch_time,
        report.records_in,
        report.outputs,
        report.rejected,
        report.processing.as_millis(),
        report.scheduling_delay.as_millis(),
        report.total_delay().as_millis(),
        ranges
    );
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
