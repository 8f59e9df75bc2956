//! What happens when something in a batch fails: a partition task (trap, deadline, memory,
//! plugin error) is retried on fresh instances with backoff, then the job's policy applies —
//! halt, skip, or dead-letter with the poison records isolated by bisection so the rest of the
//! task still goes through. Records the host cannot hand to the plugin and outputs the sinks
//! refuse follow the same policy, one record at a time.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::PartitionTask;
use crate::config::FailurePolicy;
use crate::observe::Metrics;
use crate::runtime::{BatchContext, InputRecord, OutputRecord, PluginIdentity, PluginRuntime, TaskError, TaskOutput};
use crate::sinks::DeadLetter;
use crate::source::{RawHeader, SourceRecord};

/// The first retry waits this long; each further one twice as long as the last.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Header names of a dead letter.
pub const ERROR_KIND_HEADER: &str = "sluice-error-kind";
pub const ERROR_HEADER: &str = "sluice-error";
pub const PLUGIN_HEADER: &str = "sluice-plugin";
pub const DIGEST_HEADER: &str = "sluice-plugin-digest";
pub const TOPIC_HEADER: &str = "sluice-source-topic";
pub const PARTITION_HEADER: &str = "sluice-source-partition";
pub const OFFSET_HEADER: &str = "sluice-source-offset";
/// Of an undeliverable output: the offsets of the partition task that produced it, and where it
/// was meant to go.
pub const OFFSETS_HEADER: &str = "sluice-source-offsets";
pub const TARGET_HEADER: &str = "sluice-target";
/// Of a dead letter sent without its value because the value itself could not be delivered.
pub const VALUE_DROPPED_HEADER: &str = "sluice-value-dropped";

/// The kind of failure of an output that could not be delivered.
pub const UNDELIVERABLE: &str = "undeliverable";
/// The kind of failure of a record the host could not hand to the plugin (a rejection by the
/// host rather than by the plugin).
pub const UNREADABLE: &str = "unreadable";

/// How a failure is handled: by the job's `--on-failure` policy or, while a new build is on
/// probation, by rolling the build back (no retries, no dead letters: the old build runs the
/// batch again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Policy(FailurePolicy),
    RollBack,
}

/// Why the batch stops, for the error that stops it.
fn stopping(on_failure: OnFailure) -> &'static str {
    match on_failure {
        OnFailure::RollBack => "the new build on probation fails the batch and is rolled back",
        _ => "halting (--on-failure halt): nothing past the last good batch is committed",
    }
}

/// The job's failure settings.
pub struct FailureHandling<'a> {
    pub runtime: &'a PluginRuntime,
    pub policy: OnFailure,
    pub retries: u32,
    pub dead_letter_topic: Option<&'a str>,
    /// Poison records isolated one by one in a task, at most; past that, a failing part of
    /// the task is dead-lettered whole (each isolation is a fresh instance and a call that may
    /// run to its deadline).
    pub max_poison: usize,
    /// Where failures and retries are counted.
    pub metrics: &'a Metrics,
}

/// What a failed task still produced.
#[derive(Default)]
pub struct Recovered {
    pub output: TaskOutput,
    pub dead_letters: Vec<DeadLetter>,
    /// Records dropped under `skip`.
    pub skipped: usize,
}

/// Where an output came from, for messages and dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// A partition task's `process`: the task's offset range (outputs do not name the record
    /// they came from).
    Task { topic: String, partition: i32, from: i64, until: i64 },
    /// A state partition's `update`, or a window slide's `present`.
    State { partition: i32 },
}

impl std::fmt::Display for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provenance::Task { topic, partition, from, until } => write!(f, "{topic}:{partition} [{from}, {until})"),
            Provenance::State { partition } => write!(f, "state partition {partition}"),
        }
    }
}

impl FailureHandling<'_> {
    /// Retries `task`, then applies the policy. An error means the job must halt.
    pub fn recover(&self, task: &PartitionTask, error: TaskError) -> Result<Recovered> {
        tracing::warn!("{error}");
        self.metrics.task_failure(error.kind);
        let mut error = error;
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=self.retries {
            self.metrics.task_retry(error.kind);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match self.run(&task.context, &task.records) {
                Ok(output) => {
                    tracing::info!("retry {attempt} of {} succeeded", task_name(&task.context));
                    return Ok(Recovered { output, ..Recovered::default() });
                }
                Err(again) => {
                    tracing::warn!("retry {attempt} of {}: {again}", task_name(&task.context));
                    error = again;
                }
            }
        }
        let retried = format!("after {} retries", self.retries);
        match self.policy {
            OnFailure::Policy(FailurePolicy::Halt) | OnFailure::RollBack => {
                Err(anyhow::Error::new(error)).context(format!("{retried}; {}", stopping(self.policy)))
            }
            OnFailure::Policy(FailurePolicy::Skip) => {
                tracing::warn!(
                    "skipping {} records of {} {retried} (--on-failure skip): {}",
                    task.records.len(),
                    task_name(&task.context),
                    error.message
                );
                Ok(Recovered { skipped: task.records.len(), ..Recovered::default() })
            }
            OnFailure::Policy(FailurePolicy::DeadLetter) => {
                let mut recovered = Recovered::default();
                self.isolate(&task.context, &task.records, error, &mut recovered)?;
                tracing::warn!(
                    "{}: {} poison records sent to the dead-letter topic {retried}, {} good records kept",
                    task_name(&task.context),
                    recovered.dead_letters.len(),
                    task.records.len() - recovered.dead_letters.len()
                );
                Ok(recovered)
            }
        }
    }

    /// Splits `records`, which failed with `error`, in halves and re-runs each, until every
    /// failing record stands alone: those become dead letters, the rest produce their output.
    fn isolate(
        &self,
        ctx: &BatchContext,
        records: &[InputRecord],
        error: TaskError,
        into: &mut Recovered,
    ) -> Result<()> {
        if records.len() <= 1 || into.dead_letters.len() >= self.max_poison {
            if records.len() > 1 {
                tracing::warn!(
                    "{}: {} poison records isolated (--max-poison-per-task); the {} records of a part that still fails \
                     are dead-lettered whole",
                    task_name(ctx),
                    into.dead_letters.len(),
                    records.len()
                );
            }
            // An empty task that fails has no record to blame, and nothing is lost by going on.
            for record in records {
                let letter = self.dead_letter(ctx, SourceRecord::from(record), error.kind.as_str(), &error.message)?;
                into.dead_letters.push(letter);
            }
            return Ok(());
        }
        let (first, second) = records.split_at(records.len() / 2);
        for half in [first, second] {
            match self.run(ctx, half) {
                Ok(output) => {
                    into.output.outputs.extend(output.outputs);
                    into.output.rejections.extend(output.rejections);
                    into.output.values.extend(output.values);
                }
                Err(error) => self.isolate(ctx, half, error, into)?,
            }
        }
        Ok(())
    }

    /// One attempt on a fresh instance: the one that failed may be unusable, and a fresh one
    /// also rules out state the plugin left behind.
    fn run(&self, ctx: &BatchContext, records: &[InputRecord]) -> Result<TaskOutput, TaskError> {
        let mut instance = self.runtime.instantiate().map_err(|error| TaskError {
            kind: crate::runtime::FailureKind::Trap,
            plugin: self.runtime.identity().info.name.clone(),
            task: task_name(ctx),
            message: format!("cannot make a fresh instance: {error:#}"),
        })?;
        let result = instance.process(ctx, records);
        if let Err(error) = &result {
            self.metrics.task_failure(error.kind);
        }
        result
    }

    /// `record` as a dead letter: its key, value and headers, plus headers naming the failure,
    /// the plugin and where the record came from.
    pub fn dead_letter(
        &self,
        ctx: &BatchContext,
        record: SourceRecord,
        kind: &str,
        message: &str,
    ) -> Result<DeadLetter> {
        let topic = self.dead_letter_topic.context("no --dead-letter-topic to send the failing records to")?;
        Ok(record_dead_letter(topic, self.runtime.identity(), ctx, record, kind, message))
    }
}

/// `record` (from the partition task `ctx`) as a dead letter for `topic`.
pub fn record_dead_letter(
    topic: &str,
    plugin: &PluginIdentity,
    ctx: &BatchContext,
    record: SourceRecord,
    kind: &str,
    message: &str,
) -> DeadLetter {
    let mut letter =
        DeadLetter { topic: topic.to_string(), key: record.key, value: record.value, headers: record.headers };
    letter.header(ERROR_KIND_HEADER, kind);
    letter.header(ERROR_HEADER, message);
    add_plugin(&mut letter, plugin);
    letter.header(TOPIC_HEADER, ctx.topic.clone());
    letter.header(PARTITION_HEADER, ctx.partition.to_string());
    letter.header(OFFSET_HEADER, record.offset.to_string());
    letter
}

/// An output that could not be delivered to `target`, as a dead letter for `topic`.
pub fn output_dead_letter(
    topic: &str,
    plugin: &PluginIdentity,
    output: &OutputRecord,
    provenance: &Provenance,
    target: &str,
    reason: &str,
) -> DeadLetter {
    let headers =
        output.headers.iter().map(|h| RawHeader { name: h.key.clone().into_bytes(), value: h.value.clone() }).collect();
    let mut letter =
        DeadLetter { topic: topic.to_string(), key: output.key.clone(), value: output.value.clone(), headers };
    letter.header(ERROR_KIND_HEADER, UNDELIVERABLE);
    letter.header(ERROR_HEADER, reason);
    add_plugin(&mut letter, plugin);
    letter.header(TARGET_HEADER, target);
    match provenance {
        Provenance::Task { topic, partition, from, until } => {
            letter.header(TOPIC_HEADER, topic.clone());
            letter.header(PARTITION_HEADER, partition.to_string());
            letter.header(OFFSETS_HEADER, format!("[{from}, {until})"));
        }
        Provenance::State { partition } => letter.header("sluice-state-partition", partition.to_string()),
    }
    letter
}

/// A dead letter that could not be delivered itself, without its value (its size or contents
/// are what the brokers refused); the error headers still say what it was.
pub fn without_value(mut letter: DeadLetter, reason: &str) -> DeadLetter {
    let size = letter.value.take().map_or(0, |value| value.len());
    letter.header(VALUE_DROPPED_HEADER, format!("{size} bytes: {reason}"));
    letter
}

/// How a record that failed is handled under `policy`; `Ok(None)` means skipped and counted.
pub fn by_policy(
    policy: OnFailure,
    what: impl FnOnce() -> String,
    dead_letter: impl FnOnce() -> Option<DeadLetter>,
) -> Result<Option<DeadLetter>> {
    match policy {
        OnFailure::Policy(FailurePolicy::Halt) | OnFailure::RollBack => bail!("{}; {}", what(), stopping(policy)),
        OnFailure::Policy(FailurePolicy::Skip) => {
            tracing::warn!("{} (--on-failure skip)", what());
            Ok(None)
        }
        OnFailure::Policy(FailurePolicy::DeadLetter) => match dead_letter() {
            Some(letter) => Ok(Some(letter)),
            None => bail!("{}; no --dead-letter-topic to send it to", what()),
        },
    }
}

fn add_plugin(letter: &mut DeadLetter, plugin: &PluginIdentity) {
    letter.header(PLUGIN_HEADER, format!("{} {}", plugin.info.name, plugin.info.version));
    letter.header(DIGEST_HEADER, plugin.digest.clone());
}

fn task_name(ctx: &BatchContext) -> String {
    format!("{}:{} [{}, {})", ctx.topic, ctx.partition, ctx.from_offset, ctx.until_offset)
}
