//! The commit step: the one place a batch becomes done.
//!
//! It runs only after every sink has acknowledged the batch's outputs, in this order: the
//! checkpoint transaction (offsets, state changes, window panes, plugin identity), then the
//! consumer group's offsets. Once the checkpoint commits, the batch is done; the group commit
//! is for lag tooling and a failed one is covered by the next batch's.

use anyhow::{Context as _, Result};

use crate::checkpoint::{BatchChanges, Checkpoint};
use crate::failpoint;
use crate::runtime::PluginRuntime;
use crate::source::{KafkaSource, OffsetRange};

/// Marks the batch at `batch_time` covering `ranges` as done. A checkpoint failure is the
/// outer error (the batch is not done; the job stops and replays it); the group commit's
/// outcome is the inner result.
pub fn commit_batch(
    checkpoint: Option<&Checkpoint>,
    source: &KafkaSource,
    plugin: &PluginRuntime,
    batch_time: i64,
    ranges: &[OffsetRange],
    changes: &BatchChanges,
) -> Result<Result<()>> {
    if let Some(checkpoint) = checkpoint {
        checkpoint.commit(batch_time, ranges, changes, plugin.identity(), plugin.config())?;
        failpoint::reached("commit");
    }
    Ok(source.commit(ranges).with_context(|| format!("batch {batch_time} ms")))
}
