//! The commit step: the one place a batch becomes done.
//!
//! It runs only after every sink has acknowledged the batch's outputs. Today it commits the
//! batch's offset ranges to the consumer group; the checkpoint (offsets, state changes and
//! plugin version in one transaction) and transactional outputs join here, in this order:
//! checkpoint first, then the group commit, so a crash between them replays nothing twice.

use anyhow::{Context as _, Result};

use crate::source::{KafkaSource, OffsetRange};

/// Marks the batch at `batch_time` covering `ranges` as done.
pub fn commit_batch(source: &KafkaSource, batch_time: i64, ranges: &[OffsetRange]) -> Result<()> {
    source.commit(ranges).with_context(|| format!("batch {batch_time} ms"))
}
