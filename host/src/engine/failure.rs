//! What happens when a partition task fails (trap, deadline, memory, plugin error): retries on
//! fresh instances with backoff, then the job's policy — halt, skip, or dead-letter with the
//! poison records isolated by bisection so the rest of the task still goes through.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::PartitionTask;
use crate::config::FailurePolicy;
use crate::runtime::{
    BatchContext, Header, InputRecord, OutputRecord, PluginIdentity, PluginRuntime, TaskError, TaskOutput,
};

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

/// The job's failure settings.
pub struct FailureHandling<'a> {
    pub runtime: &'a PluginRuntime,
    pub policy: FailurePolicy,
    pub retries: u32,
    pub dead_letter_topic: Option<&'a str>,
}

/// What a failed task still produced.
#[derive(Default)]
pub struct Recovered {
    pub output: TaskOutput,
    pub dead_letters: Vec<OutputRecord>,
    /// Records dropped under `skip`.
    pub skipped: usize,
}

impl FailureHandling<'_> {
    /// Retries `task`, then applies the policy. An error means the job must halt.
    pub fn recover(&self, task: &PartitionTask, error: TaskError) -> Result<Recovered> {
        tracing::warn!("{error}");
        let mut error = error;
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=self.retries {
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
            FailurePolicy::Halt => Err(anyhow::Error::new(error)).context(format!(
                "{retried}; halting (--on-failure halt): nothing past the last good batch is committed"
            )),
            FailurePolicy::Skip => {
                tracing::warn!(
                    "skipping {} records of {} {retried} (--on-failure skip): {}",
                    task.records.len(),
                    task_name(&task.context),
                    error.message
                );
                Ok(Recovered { skipped: task.records.len(), ..Recovered::default() })
            }
            FailurePolicy::DeadLetter => {
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
        if let [record] = records {
            into.dead_letters.push(self.dead_letter(ctx, record, error.kind.as_str(), &error.message)?);
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
        instance.process(ctx, records)
    }

    /// `record` as a dead letter: its key, value and headers, plus headers naming the failure,
    /// the plugin and where the record came from.
    pub fn dead_letter(
        &self,
        ctx: &BatchContext,
        record: &InputRecord,
        kind: &str,
        message: &str,
    ) -> Result<OutputRecord> {
        let topic = self.dead_letter_topic.context("no --dead-letter-topic to send the failing records to")?;
        Ok(dead_letter(topic, self.runtime.identity(), ctx, record, kind, message))
    }
}

/// `record` as a dead letter for `topic`.
pub fn dead_letter(
    topic: &str,
    plugin: &PluginIdentity,
    ctx: &BatchContext,
    record: &InputRecord,
    kind: &str,
    message: &str,
) -> OutputRecord {
    let mut headers = record.headers.clone();
    let mut add = |key: &str, value: String| headers.push(Header { key: key.into(), value: Some(value.into_bytes()) });
    add(ERROR_KIND_HEADER, kind.to_string());
    add(ERROR_HEADER, message.to_string());
    add(PLUGIN_HEADER, format!("{} {}", plugin.info.name, plugin.info.version));
    add(DIGEST_HEADER, plugin.digest.clone());
    add(TOPIC_HEADER, ctx.topic.clone());
    add(PARTITION_HEADER, ctx.partition.to_string());
    add(OFFSET_HEADER, record.offset.to_string());
    OutputRecord { topic: Some(topic.to_string()), key: record.key.clone(), value: record.value.clone(), headers }
}

fn task_name(ctx: &BatchContext) -> String {
    format!("{}:{} [{}, {})", ctx.topic, ctx.partition, ctx.from_offset, ctx.until_offset)
}
