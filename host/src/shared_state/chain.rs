//! Stage 2's exactly-once rule: which stage-1 batches a shuffle partition applies.
//!
//! The shuffle is written at least once: a stage-1 batch that crashed (or was fenced, or
//! rolled back) before its input offsets committed left values that its partition's next
//! owner writes again, possibly over a different range. Stage 2 therefore applies, per input
//! partition, only the chain of ranges the consumer group committed: backwards from the
//! group's committed offset (the newest complete range ending there), each predecessor being
//! the newest complete range written before it that ends where it starts, down to where this
//! state partition's applied offset for that input partition stands. Everything else is a
//! leftover of an uncommitted attempt (dead once the applied offset passes its start) or a
//! batch whose commit has not happened yet (kept, and read again next batch). Values of one
//! range are counted only once its end marker says all of them are there. docs/adr/0009.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};

use super::records::{EntryKind, ShuffleEntry, SourceRange};
use crate::checkpoint::PartitionMeta;
use crate::offsets::TopicPartition;
use crate::source::Committed;

/// What one shuffle partition's records resolve to this batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Keyed values to apply, each committed range's values in the order written, ranges in
    /// chain order, input partitions in order.
    pub values: Vec<Shuffled>,
    /// The partition's meta with the applied offsets moved and the shuffle's new resume point.
    pub meta: PartitionMeta,
    /// Input partitions whose committed range is not in the shuffle yet (or no longer).
    pub waiting: Vec<TopicPartition>,
    /// Windowed jobs: every record read by a batch before this time is in the partition now
    /// (see [`watermark`]); `None` while an input partition is behind or was never committed.
    pub watermark: Option<i64>,
}

/// A keyed value that came through the shuffle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shuffled {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The time of the stage-1 batch that read its record (0 if its writer did not say).
    pub batch_time: i64,
}

/// One attempt's values of a range in this shuffle partition.
#[derive(Debug)]
struct Attempt {
    range: SourceRange,
    /// Offset of its first record here.
    first: i64,
    /// Offset of its end marker: `None` while (or if forever) incomplete.
    end: Option<i64>,
    /// The stage-1 batch's time, from the end marker.
    batch_time: Option<i64>,
    values: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Resolves `entries` (shuffle partition `partition`'s records from `meta.resume` to
/// `read_to`, in offset order) against the group's `commits` of their input partitions.
pub fn resolve(
    partition: u32,
    entries: Vec<ShuffleEntry>,
    meta: &PartitionMeta,
    commits: &BTreeMap<TopicPartition, Committed>,
    read_to: i64,
) -> Result<Resolved> {
    let mut resolved = Resolved { meta: meta.clone(), ..Resolved::default() };
    let mut by_source: BTreeMap<TopicPartition, Vec<Attempt>> = BTreeMap::new();
    for attempts in attempts(entries) {
        by_source.entry(attempts.range.source.clone()).or_default().push(attempts);
    }
    let mut resume = read_to;
    for (source, attempts) in by_source {
        let applied = meta.applied(&source);
        let mut chain: Vec<usize> = Vec::new();
        if let Some(commit) = commits.get(&source).filter(|c| applied.is_none_or(|a| c.offset > a)) {
            if commit.metadata.as_ref().is_some_and(|m| m.local_state) {
                let member = commit.metadata.as_ref().map_or("", |m| m.member.as_str());
                bail!(
                    "state partition {partition} has applied {source} up to {}, and member {member} processed it up \
                     to {} on its own (one host, state in its checkpoint only): that state was never published to \
                     the changelog. Start {member} again with its checkpoint so it publishes it",
                    applied.map_or("nothing".to_string(), |a| a.to_string()),
                    commit.offset
                );
            }
            chain = committed_chain(partition, &source, &attempts, applied, commit.offset)?;
            if chain.is_empty() {
                resolved.waiting.push(source.clone());
            }
        }
        let mut attempts: Vec<Option<Attempt>> = attempts.into_iter().map(Some).collect();
        for &index in chain.iter().rev() {
            let attempt = attempts[index].take().expect("each attempt once");
            let batch_time = attempt.batch_time.unwrap_or_default();
            let values = attempt.values.into_iter().map(|(key, value)| Shuffled { key, value, batch_time });
            resolved.values.extend(values);
            resolved.meta.set_applied(&source, attempt.range.until);
        }
        // What is left waits for its commit, unless the applied offset has passed its start.
        let applied = resolved.meta.applied(&source);
        for attempt in attempts.into_iter().flatten() {
            if applied.is_none_or(|a| attempt.range.from >= a) {
                resume = resume.min(attempt.first);
            }
        }
    }
    resolved.meta.resume = resume;
    Ok(resolved)
}

/// The time before which every stage-1 batch of every input partition has been applied to a
/// state partition, once `resolved` is: the oldest batch time among the group's commits of
/// `inputs`, provided the partition has applied each of them up to its committed offset.
/// A batch that commits an input partition later has a time at least its last commit's (batch
/// times are ticks of the wall clock, and a new owner plans only after the old one committed),
/// so no value of a pane before the watermark can still come. Every input partition is
/// committed every batch (idle ones too), so the watermark follows the slowest host.
/// `Err` says which input partition holds it back, and why.
pub fn watermark(
    resolved: &Resolved,
    inputs: &[TopicPartition],
    commits: &BTreeMap<TopicPartition, Committed>,
) -> Result<i64, String> {
    let mut oldest: Option<i64> = None;
    for input in inputs {
        let commit = commits.get(input).ok_or_else(|| format!("{input} has no committed offset yet"))?;
        let applied = resolved.meta.applied(input);
        if resolved.waiting.contains(input) || applied.is_some_and(|a| a != commit.offset) {
            return Err(format!("{input} is committed up to {}, applied up to {applied:?}", commit.offset));
        }
        let batch = commit.metadata.as_ref().ok_or_else(|| format!("{input}'s commit has no Sluice metadata"))?.batch;
        oldest = Some(oldest.map_or(batch, |oldest| oldest.min(batch)));
    }
    oldest.ok_or_else(|| "no input partitions".to_string())
}

/// Groups entries into attempts: a range's values up to its end marker (the last `count`
/// of them: an earlier attempt of the same range may have left a torn prefix), and the
/// values of ranges whose end has not been read.
fn attempts(entries: Vec<ShuffleEntry>) -> Vec<Attempt> {
    let mut open: BTreeMap<SourceRange, Attempt> = BTreeMap::new();
    let mut done: Vec<Attempt> = Vec::new();
    for entry in entries {
        let attempt = open.entry(entry.range.clone()).or_insert_with(|| Attempt {
            range: entry.range.clone(),
            first: entry.offset,
            end: None,
            batch_time: None,
            values: Vec::new(),
        });
        match entry.kind {
            EntryKind::Value { key, value } => attempt.values.push((key, value)),
            EntryKind::End { count, batch_time } => {
                let mut attempt = open.remove(&entry.range).expect("just inserted");
                attempt.batch_time = batch_time;
                let count = count as usize;
                if attempt.values.len() >= count {
                    attempt.values.drain(..attempt.values.len() - count);
                    attempt.end = Some(entry.offset);
                }
                done.push(attempt);
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|attempt| attempt.first);
    done
}

/// The attempts (indices, newest first) that make up the committed chain from `applied` to
/// `committed`; empty when the range the group committed is not among them yet.
fn committed_chain(
    partition: u32,
    source: &TopicPartition,
    attempts: &[Attempt],
    applied: Option<i64>,
    committed: i64,
) -> Result<Vec<usize>> {
    // The newest complete attempt ending at `until` that was written before `before`.
    let newest_ending = |until: i64, before: i64| {
        (0..attempts.len())
            .filter(|&i| attempts[i].range.until == until)
            .filter(|&i| attempts[i].end.is_some_and(|end| end < before))
            .max_by_key(|&i| attempts[i].end)
    };
    let Some(mut current) = newest_ending(committed, i64::MAX) else { return Ok(Vec::new()) };
    let mut chain = vec![current];
    let mut seen = BTreeSet::from([current]);
    loop {
        let from = attempts[current].range.from;
        match applied {
            Some(applied) if from == applied => return Ok(chain),
            Some(applied) if from < applied => bail!(
                "state partition {partition}: {source}'s committed range {}..{} overlaps what the partition has \
                 applied (up to {applied}); the shuffle topic holds batches this state partition cannot place",
                from,
                attempts[current].range.until
            ),
            _ => {}
        }
        match newest_ending(from, attempts[current].first).filter(|i| seen.insert(*i)) {
            Some(previous) => {
                chain.push(previous);
                current = previous;
            }
            None if applied.is_none() => return Ok(chain),
            None => bail!(
                "state partition {partition} has applied {source} up to {}, but the next committed batch in the \
                 shuffle topic starts at {from}: the values of offsets {}..{from} are missing (shuffle records \
                 deleted by retention, or a changelog behind its input)",
                applied.expect("some"),
                applied.expect("some")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::CommitMetadata;

    const P: u32 = 0;

    fn source() -> TopicPartition {
        TopicPartition::new("in", 0)
    }

    /// Writes a stage-1 attempt of `from..until` with `values` (each value is its own key).
    fn write(log: &mut Vec<ShuffleEntry>, from: i64, until: i64, values: &[&str], end: bool) {
        let range = SourceRange { source: source(), from, until };
        for value in values {
            let offset = log.len() as i64;
            let kind = EntryKind::Value { key: value.as_bytes().to_vec(), value: value.as_bytes().to_vec() };
            log.push(ShuffleEntry { offset, range: range.clone(), kind });
        }
        if end {
            let offset = log.len() as i64;
            let kind = EntryKind::End { count: values.len() as u32, batch_time: Some(offset) };
            log.push(ShuffleEntry { offset, range, kind });
        }
    }

    fn commits(offset: i64) -> BTreeMap<TopicPartition, Committed> {
        BTreeMap::from([(source(), Committed { offset, metadata: Some(CommitMetadata::default()) })])
    }

    fn meta(applied: Option<i64>) -> PartitionMeta {
        PartitionMeta { applied: applied.map(|a| vec![(source(), a)]).unwrap_or_default(), ..PartitionMeta::default() }
    }

    fn applied_values(resolved: &Resolved) -> Vec<String> {
        resolved.values.iter().map(|v| String::from_utf8(v.key.clone()).unwrap()).collect()
    }

    #[test]
    fn committed_ranges_apply_in_order_and_uncommitted_ones_wait() {
        let mut log = Vec::new();
        write(&mut log, 0, 2, &["a", "b"], true);
        write(&mut log, 2, 3, &["c"], true);
        write(&mut log, 3, 5, &["d"], true); // not committed yet
        let read_to = log.len() as i64;
        let resolved = resolve(P, log, &meta(Some(0)), &commits(3), read_to).unwrap();
        assert_eq!(applied_values(&resolved), ["a", "b", "c"]);
        assert_eq!(resolved.meta.applied(&source()), Some(3));
        assert_eq!(resolved.meta.resume, 5, "the uncommitted range is read again");
    }

    #[test]
    fn a_replay_over_another_range_replaces_the_uncommitted_attempt() {
        let mut log = Vec::new();
        write(&mut log, 10, 20, &["orphan"], true); // its host died before the commit
        write(&mut log, 10, 25, &["x", "y"], true); // the new owner's batch, committed
        let read_to = log.len() as i64;
        let resolved = resolve(P, log, &meta(Some(10)), &commits(25), read_to).unwrap();
        assert_eq!(applied_values(&resolved), ["x", "y"]);
        assert_eq!(resolved.meta.resume, read_to, "the orphan is dead once 25 is applied");
    }

    #[test]
    fn a_torn_attempt_and_its_replay_count_once() {
        let mut log = Vec::new();
        write(&mut log, 0, 4, &["a", "b"], false); // crashed mid-write
        write(&mut log, 0, 4, &["a", "b", "c"], true);
        let read_to = log.len() as i64;
        let resolved = resolve(P, log, &meta(None), &commits(4), read_to).unwrap();
        assert_eq!(applied_values(&resolved), ["a", "b", "c"]);
    }

    #[test]
    fn a_rolled_back_build_loses_to_the_replay_written_after_it() {
        let mut log = Vec::new();
        write(&mut log, 0, 2, &["new1"], true);
        write(&mut log, 2, 4, &["new2"], true);
        write(&mut log, 0, 2, &["old1"], true);
        write(&mut log, 2, 4, &["old2"], true);
        let read_to = log.len() as i64;
        let resolved = resolve(P, log, &meta(Some(0)), &commits(4), read_to).unwrap();
        assert_eq!(applied_values(&resolved), ["old1", "old2"]);
    }

    #[test]
    fn ranges_already_applied_are_skipped() {
        let mut log = Vec::new();
        write(&mut log, 0, 2, &["a"], true);
        write(&mut log, 0, 2, &["a"], true); // written twice (stage 1 crashed after writing)
        write(&mut log, 2, 3, &["b"], true);
        let read_to = log.len() as i64;
        let resolved = resolve(P, log, &meta(Some(2)), &commits(3), read_to).unwrap();
        assert_eq!(applied_values(&resolved), ["b"]);
    }

    #[test]
    fn a_gap_between_applied_and_the_committed_chain_is_an_error() {
        let mut log = Vec::new();
        write(&mut log, 50, 60, &["a"], true);
        let error = resolve(P, log, &meta(Some(10)), &commits(60), 2).unwrap_err();
        assert!(format!("{error:#}").contains("offsets 10..50 are missing"), "{error:#}");
    }

    #[test]
    fn state_kept_by_a_host_running_alone_is_not_silently_skipped() {
        let mut commits = commits(100);
        commits.get_mut(&source()).unwrap().metadata =
            Some(CommitMetadata { member: "a".into(), local_state: true, ..CommitMetadata::default() });
        let mut log = Vec::new();
        write(&mut log, 100, 110, &["x"], true);
        let error = resolve(P, log, &meta(None), &commits, 2).unwrap_err();
        assert!(format!("{error:#}").contains("never published"), "{error:#}");
    }

    #[test]
    fn the_watermark_is_the_oldest_commit_once_every_commit_is_applied() {
        let (a, b) = (TopicPartition::new("in", 0), TopicPartition::new("in", 1));
        let commit =
            |offset, batch| Committed { offset, metadata: Some(CommitMetadata { batch, ..CommitMetadata::default() }) };
        let commits = BTreeMap::from([(a.clone(), commit(10, 5_000)), (b.clone(), commit(0, 4_000))]);
        let inputs = [a.clone(), b.clone()];
        let mut resolved = Resolved {
            meta: PartitionMeta { applied: vec![(a.clone(), 10)], ..PartitionMeta::default() },
            ..Resolved::default()
        };
        // b is idle (committed at its start, nothing applied): its commit's batch time counts.
        assert_eq!(watermark(&resolved, &inputs, &commits), Ok(4_000));
        resolved.meta.set_applied(&a, 8);
        assert!(watermark(&resolved, &inputs, &commits).unwrap_err().contains("applied up to Some(8)"));
        resolved.meta.set_applied(&a, 10);
        resolved.waiting.push(b.clone());
        assert!(watermark(&resolved, &inputs, &commits).is_err(), "a committed range not in the shuffle yet");
        resolved.waiting.clear();
        let unknown = [a, b, TopicPartition::new("in", 2)];
        assert!(watermark(&resolved, &unknown, &commits).unwrap_err().contains("no committed offset"));
    }

    #[test]
    fn a_commit_whose_range_is_not_complete_yet_waits() {
        let mut log = Vec::new();
        write(&mut log, 0, 5, &["a", "b"], false);
        let resolved = resolve(P, log, &meta(Some(0)), &commits(5), 2).unwrap();
        assert_eq!(resolved.waiting, vec![source()]);
        assert!(resolved.values.is_empty());
        assert_eq!(resolved.meta.resume, 0);
    }
}
