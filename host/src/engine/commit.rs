//! The commit step: the one place a batch becomes done.
//!
//! It runs only after every sink has acknowledged the batch's outputs, in this order: the
//! consumer group's offsets (each with the batch's identity in its metadata), then the
//! checkpoint transaction (offsets, state changes, window panes, plugin identity, applied
//! starts). The group is the authority on where a partition continues — in a group of several
//! hosts the local checkpoint cannot know what another host committed — so it commits first.
//! A crash between the two leaves a plan whose offsets the group already holds; the next run
//! replays it without delivering, to rebuild only its state changes (docs/adr/0007). With
//! `--delivery exactly-once` the group's offsets go into the batch's Kafka transaction, whose
//! commit takes the group commit's place (docs/adr/0008).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use crate::failpoint;
use crate::offsets::{OffsetRange, TopicPartition};
use crate::runtime::PluginIdentity;
use crate::sinks::{KafkaSink, TransactionError};
use crate::source::{CommitError, CommitMetadata, KafkaSource, offset_list};

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
    local_state: bool,
) -> Result<GroupCommit> {
    let ends = ends_of(ranges);
    let metadata = identity(batch_time, member, plugin, applied_starts, local_state);
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

/// With `--delivery exactly-once`: sends the ranges' ends (with the same metadata as a group
/// commit) to the open Kafka transaction and commits it, so the batch's outputs and its input
/// offsets become visible together. A batch that read nothing and sent nothing has nothing to
/// commit.
#[allow(clippy::too_many_arguments)]
pub fn commit_transaction(
    sink: &mut KafkaSink,
    source: &KafkaSource,
    ranges: &[OffsetRange],
    advanced: bool,
    batch_time: i64,
    member: &str,
    plugin: &PluginIdentity,
    applied_starts: &BTreeMap<TopicPartition, i64>,
) -> Result<(), TransactionError> {
    if !advanced && !sink.transaction_open() {
        return Ok(());
    }
    let group =
        source.group_metadata().context("the consumer has no group metadata to send offsets in a transaction")?;
    let offsets = offset_list(&ends_of(ranges), identity(batch_time, member, plugin, applied_starts, false))?;
    sink.commit(&offsets, &group)?;
    failpoint::reached("commit");
    Ok(())
}

fn ends_of(ranges: &[OffsetRange]) -> Vec<(TopicPartition, i64)> {
    ranges.iter().map(|range| (range.partition.clone(), range.until)).collect()
}

/// The metadata a batch commits beside each partition's offset: its time, the member, the
/// plugin build, the partition's applied `--start`, and whether its state changes stayed in
/// this host's checkpoint (`--shared-state` running alone).
fn identity<'a>(
    batch_time: i64,
    member: &'a str,
    plugin: &PluginIdentity,
    applied_starts: &'a BTreeMap<TopicPartition, i64>,
    local_state: bool,
) -> impl Fn(&TopicPartition) -> CommitMetadata + 'a {
    let build = plugin.digest[..plugin.digest.len().min(12)].to_string();
    move |partition| CommitMetadata {
        batch: batch_time,
        start: applied_starts.get(partition).copied(),
        member: member.to_string(),
        build: build.clone(),
        local_state,
    }
}
