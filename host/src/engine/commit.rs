//! The commit step: the one place a batch becomes done.
//!
//! It runs only after every sink has acknowledged the batch's outputs, in this order: the
//! consumer group's offsets (each with the batch's identity in its metadata), then the
//! checkpoint transaction (offsets, state changes, window panes, plugin identity, applied
//! starts). The group is the authority on where a partition continues — in a group of several
//! hosts the local checkpoint cannot know what another host committed — so it commits first.
//! A crash between the two leaves a plan whose offsets the group already holds; the next run
//! replays it without delivering, to rebuild only its state changes (docs/adr/0007).

use std::collections::BTreeMap;

use anyhow::Result;

use crate::failpoint;
use crate::offsets::{OffsetRange, TopicPartition};
use crate::runtime::PluginIdentity;
use crate::source::{CommitError, CommitMetadata, KafkaSource};

/// How the group commit ended.
pub enum GroupCommit {
    Committed,
    /// The group gave (some of) the batch's partitions to another member: nothing of the batch
    /// may be committed; its new owner replays it from the group's offsets.
    Fenced(String),
}

/// Commits the ranges' ends to the consumer group, with the batch's identity and each
/// partition's applied `--start` as metadata.
pub fn commit_group(
    source: &mut KafkaSource,
    ranges: &[OffsetRange],
    batch_time: i64,
    member: &str,
    plugin: &PluginIdentity,
    applied_starts: &BTreeMap<TopicPartition, i64>,
) -> Result<GroupCommit> {
    let ends: Vec<(TopicPartition, i64)> = ranges.iter().map(|range| (range.partition.clone(), range.until)).collect();
    let build = plugin.digest[..plugin.digest.len().min(12)].to_string();
    let metadata = |partition: &TopicPartition| CommitMetadata {
        batch: batch_time,
        start: applied_starts.get(partition).copied(),
        member: member.to_string(),
        build: build.clone(),
    };
    match source.commit(&ends, metadata) {
        Ok(()) => {
            failpoint::reached("commit");
            Ok(GroupCommit::Committed)
        }
        Err(CommitError::Fenced { partitions, cause }) => {
            Ok(GroupCommit::Fenced(format!("fenced: the consumer group gave {partitions} to another member ({cause})")))
        }
        Err(CommitError::Failed(error)) => Err(error.context(format!("batch {batch_time} ms"))),
    }
}
