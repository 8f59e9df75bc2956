//! Which partitions this host works on and where each continues (Kafka Streams' `TaskManager`
//! role): applies the group's assignment changes at batch boundaries, picks each newly
//! assigned partition's start (a one-time `--start`, the database, the group's committed
//! offset or the checkpoint's, the reset policy), and reconciles a batch the last run planned
//! but did not finish with what the group has committed since. docs/adr/0007 has the rules.

use std::collections::{BTreeMap, VecDeque};

use anyhow::{Result, bail};

use crate::checkpoint::PendingBatch;
use crate::config::JobConfig;
use crate::offsets::{OffsetRange, StartCandidates, StartPosition, TopicPartition, check_in_log, start_position};
use crate::source::{Assigned, Committed};

/// A batch to run again: (the rest of) a plan an earlier run did not commit, with the batch
/// time it was planned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    /// `false` when Kafka already holds the batch's outputs and offsets and only its state
    /// changes were lost: the replay rebuilds state and delivers nothing.
    pub deliver: bool,
    /// The plugin build the batch ran with the first time: a replay that only rebuilds state
    /// runs it too (its outputs in Kafka came from it); one that delivers runs the job's.
    pub build: Option<String>,
}

impl Replay {
    /// The replay as a plan still to run, as the checkpoint records it.
    pub fn plan(&self) -> PendingBatch {
        PendingBatch {
            batch_time: self.batch_time,
            ranges: self.ranges.clone(),
            build: self.build.clone(),
            shared: false,
        }
    }
}

/// Where partitions continue, as far as this host knows.
#[derive(Debug, Default)]
pub struct Positions {
    /// `--start` offsets the job has applied, per partition: a `--start` is a one-time seek.
    pub applied_starts: BTreeMap<TopicPartition, i64>,
    /// Starts applied since the last checkpoint commit, to be recorded there.
    pub newly_applied: Vec<(TopicPartition, i64)>,
    /// The checkpoint's offsets: where this host's last committed batches ended.
    pub checkpoint: BTreeMap<TopicPartition, i64>,
    /// The offsets the group is known to hold for the owned partitions (as assigned, and as
    /// this host committed since): a batch that moved nothing does not commit again.
    pub group: BTreeMap<TopicPartition, i64>,
    /// Whether the job keeps keyed state or panes in its checkpoint: then records another
    /// member processed are state this host does not have.
    pub stateful: bool,
    /// Whether the job shares its state through Kafka (`--shared-state`): then records another
    /// member processed alone must have been published to the changelog.
    pub shared: bool,
}

impl Positions {
    /// Chooses where each newly assigned partition starts. `database` holds the offsets of
    /// `--postgres-mode transactional`, the authority in that mode.
    pub fn choose(
        &mut self,
        job: &JobConfig,
        assigned: &[Assigned],
        database: Option<&BTreeMap<TopicPartition, i64>>,
    ) -> Result<Vec<i64>> {
        let mut chosen = Vec::with_capacity(assigned.len());
        for partition in assigned {
            let tp = &partition.partition;
            // What the group's metadata says was applied counts too: a job without a
            // checkpoint remembers its `--start` there.
            let remembered = partition.committed.as_ref().and_then(|c| c.metadata.as_ref()).and_then(|m| m.start);
            if let Some(start) = remembered {
                self.applied_starts.entry(tp.clone()).or_insert(start);
            }
            let explicit = match job.start.get(tp) {
                Some(&start) if self.applied_starts.get(tp) == Some(&start) => {
                    tracing::info!(
                        "{tp}: --start {start} was applied before; ignored (give another offset to seek again)"
                    );
                    None
                }
                other => other.copied(),
            };
            let candidates = StartCandidates {
                explicit,
                database: database.and_then(|offsets| offsets.get(tp).copied()),
                committed: partition.committed.as_ref().map(|c| c.offset),
                checkpoint: self.checkpoint.get(tp).copied(),
                created_since_start: partition.created_since_start,
            };
            let start = start_position(candidates, job.auto_offset_reset, partition.bounds);
            if let (StartPosition::Committed(offset), true) = (start, self.stateful) {
                check_state_is_here(tp, offset, partition.committed.as_ref(), candidates.checkpoint, &job.instance_id)
                    .map_err(|error| error.context(format!("consumer group {}", job.group)))?;
            }
            if self.shared {
                check_state_was_published(tp, partition.committed.as_ref(), &job.instance_id)
                    .map_err(|error| error.context(format!("consumer group {}", job.group)))?;
            }
            if let StartPosition::Explicit(offset) = start {
                self.applied_starts.insert(tp.clone(), offset);
                self.newly_applied.push((tp.clone(), offset));
            }
            if let (StartPosition::Checkpoint(checkpoint), Some(committed)) = (start, &partition.committed) {
                tracing::warn!(
                    "{tp}: the group's committed offset {} is behind the checkpoint's {checkpoint}; continuing from the \
                     checkpoint (the group was rewound by hand? use --start to re-read)",
                    committed.offset
                );
            }
            match &partition.committed {
                Some(committed) => self.group.insert(tp.clone(), committed.offset),
                None => self.group.remove(tp),
            };
            let mut offset = start.offset();
            match check_in_log(tp, offset, partition.bounds, job.on_offset_out_of_range)? {
                None => tracing::info!("{tp} starts at offset {start}"),
                Some(moved) => {
                    tracing::warn!("{tp}: start offset {start}: {moved} (--on-offset-out-of-range)");
                    offset = moved.to;
                }
            }
            chosen.push(offset);
        }
        Ok(chosen)
    }
}

/// Turns the batches the last run planned but did not commit (oldest first) into the replays
/// that finish them, given where each of their partitions starts now and what the group
/// committed:
///
/// - a partition that starts at (or before) a range's beginning replays the range in full;
/// - one whose range the group holds already (the group committed the batch, the checkpoint
///   did not get to) replays it without delivering — for state only (`stateful`); a transform
///   has nothing to rebuild and skips it;
/// - one the group committed part of (the batch ran in pieces) does both, in order;
/// - any other (another member moved it on) leaves the plan.
///
/// "The group holds it" means the group's offset reaches the range and its metadata names this
/// batch or a later one of the plans (a build on probation commits its batches together, as
/// the last one) — or carries no metadata at all (brokers that do not keep it, such as Tansu;
/// the offset alone then decides).
/// A stateful job may continue a partition from the group's offset only if the records before
/// it were counted in this host's checkpoint. Another member committing past the checkpoint
/// means their state changes live in that member's checkpoint: continuing would silently
/// count from part of the history (keyed state across hosts is issue 18's changelog).
fn check_state_is_here(
    tp: &TopicPartition,
    offset: i64,
    committed: Option<&Committed>,
    checkpoint: Option<i64>,
    instance_id: &str,
) -> Result<()> {
    let Some(member) = committed.and_then(|c| c.metadata.as_ref()).map(|m| m.member.as_str()) else {
        return Ok(()); // not committed by a Sluice member
    };
    if member.is_empty() || member == instance_id {
        return Ok(());
    }
    let here = checkpoint.map_or_else(|| "none".to_string(), |offset| offset.to_string());
    bail!(
        "{tp}: member {member} processed it up to offset {offset}, and this host's checkpoint holds its state \
         only up to {here}. A stateful job's keyed state lives in one host's checkpoint, so it runs on one host \
         at a time: run it where that checkpoint is, or use another --group"
    );
}

/// With `--shared-state`, a partition another member processed while it ran the job alone
/// carries that mark until the member publishes its state (it does before any group change
/// and when it stops): taking it over earlier would continue without that state.
fn check_state_was_published(tp: &TopicPartition, committed: Option<&Committed>, instance_id: &str) -> Result<()> {
    let Some(metadata) = committed.and_then(|c| c.metadata.as_ref()) else { return Ok(()) };
    if !metadata.local_state || metadata.member == instance_id {
        return Ok(());
    }
    bail!(
        "{tp}: member {} processed it alone up to offset {} and has not published that state to the changelog (it \
         was killed?). Start {} again with its checkpoint: it publishes its state when another host joins or when \
         it stops",
        metadata.member,
        committed.map_or(0, |c| c.offset),
        metadata.member
    );
}

pub fn reconcile(
    plans: Vec<PendingBatch>,
    starts: &BTreeMap<TopicPartition, (i64, Option<Committed>)>,
    stateful: bool,
) -> VecDeque<Replay> {
    let mut replays = VecDeque::new();
    let last = plans.last().map_or(i64::MIN, |plan| plan.batch_time);
    for plan in plans {
        // A batch that went through the shuffle topic left no state here to rebuild: the
        // state partitions' owners applied (or will apply) its values.
        let stateful = stateful && !plan.shared;
        let (mut silent, mut full) = (Vec::new(), Vec::new());
        for range in plan.ranges {
            let Some((start, committed)) = starts.get(&range.partition) else {
                tracing::info!(
                    "{}: the interrupted batch's range {range} belongs to another member now",
                    range.partition
                );
                continue;
            };
            let metadata = committed.as_ref().and_then(|c| c.metadata.as_ref());
            let held = metadata.is_none_or(|m| (plan.batch_time..=last).contains(&m.batch));
            match *start {
                start if start <= range.from => full.push(range),
                start if held => {
                    let committed_to = start.min(range.until);
                    if stateful {
                        silent.push(OffsetRange {
                            partition: range.partition.clone(),
                            from: range.from,
                            until: committed_to,
                        });
                    }
                    if committed_to < range.until {
                        full.push(OffsetRange { partition: range.partition, from: committed_to, until: range.until });
                    }
                }
                start => tracing::info!(
                    "{}: the interrupted batch's range {range} no longer applies (the partition continues at {start})",
                    range.partition
                ),
            }
        }
        let (batch_time, build) = (plan.batch_time, plan.build);
        if !silent.is_empty() {
            replays.push_back(Replay { batch_time, ranges: silent, deliver: false, build: build.clone() });
        }
        if !full.is_empty() {
            replays.push_back(Replay { batch_time, ranges: full, deliver: true, build });
        }
    }
    replays
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::CommitMetadata;

    fn range(partition: i32, from: i64, until: i64) -> OffsetRange {
        OffsetRange { partition: TopicPartition::new("in", partition), from, until }
    }

    fn committed(offset: i64, batch: i64) -> Option<Committed> {
        Some(Committed { offset, metadata: Some(CommitMetadata { batch, ..CommitMetadata::default() }) })
    }

    #[test]
    fn an_interrupted_batch_is_replayed_from_what_the_group_holds() {
        let plan = PendingBatch {
            batch_time: 1000,
            ranges: vec![range(0, 0, 10), range(1, 5, 9), range(2, 3, 7), range(3, 0, 4)],
            build: Some("b1".into()),
            shared: false,
        };
        let starts = BTreeMap::from([
            // Not committed anywhere: replay in full.
            (TopicPartition::new("in", 0), (0, committed(0, 900))),
            // Committed to the group by this batch, not to the checkpoint: state only.
            (TopicPartition::new("in", 1), (9, committed(9, 1000))),
            // A piece of it committed: the rest is delivered.
            (TopicPartition::new("in", 2), (5, committed(5, 1000))),
            // Moved on by another member: not ours to replay.
            (TopicPartition::new("in", 3), (12, committed(12, 1500))),
        ]);
        let replays = reconcile(vec![plan.clone()], &starts, true);
        assert_eq!(
            replays,
            [
                Replay {
                    batch_time: 1000,
                    ranges: vec![range(1, 5, 9), range(2, 3, 5)],
                    deliver: false,
                    build: Some("b1".into())
                },
                Replay {
                    batch_time: 1000,
                    ranges: vec![range(0, 0, 10), range(2, 5, 7)],
                    deliver: true,
                    build: Some("b1".into())
                },
            ]
        );
        // A transform has no state to rebuild.
        let replays = reconcile(vec![plan], &starts, false);
        assert_eq!(
            replays,
            [Replay {
                batch_time: 1000,
                ranges: vec![range(0, 0, 10), range(2, 5, 7)],
                deliver: true,
                build: Some("b1".into())
            }]
        );
    }

    #[test]
    fn a_group_past_the_plan_by_an_older_batch_is_another_members() {
        let plan = PendingBatch { batch_time: 1000, ranges: vec![range(0, 0, 10)], build: None, shared: false };
        let starts = BTreeMap::from([(TopicPartition::new("in", 0), (12, committed(12, 900)))]);
        assert!(reconcile(vec![plan], &starts, true).is_empty());
    }

    #[test]
    fn held_probation_batches_are_replayed_in_order() {
        let plans = vec![
            PendingBatch { batch_time: 1000, ranges: vec![range(0, 0, 10)], build: Some("new".into()), shared: false },
            PendingBatch { batch_time: 1100, ranges: vec![range(0, 10, 15)], build: Some("new".into()), shared: false },
        ];
        // Neither committed: both again, in full, in order.
        let none = BTreeMap::from([(TopicPartition::new("in", 0), (0, committed(0, 900)))]);
        let replays: Vec<(i64, bool)> =
            reconcile(plans.clone(), &none, true).iter().map(|r| (r.batch_time, r.deliver)).collect();
        assert_eq!(replays, [(1000, true), (1100, true)]);
        // Both committed to the group by the later one: both rebuild state only.
        let both = BTreeMap::from([(TopicPartition::new("in", 0), (15, committed(15, 1100)))]);
        let replays: Vec<(i64, bool)> =
            reconcile(plans.clone(), &both, true).iter().map(|r| (r.batch_time, r.deliver)).collect();
        assert_eq!(replays, [(1000, false), (1100, false)]);
        // A broker that keeps no commit metadata: the offset decides.
        let bare =
            BTreeMap::from([(TopicPartition::new("in", 0), (15, Some(Committed { offset: 15, metadata: None })))]);
        assert_eq!(reconcile(plans, &bare, true).len(), 2);
    }

    #[test]
    fn a_stateful_job_does_not_continue_where_another_member_left_its_state() {
        let tp = TopicPartition::new("in", 0);
        let by = |member: &str| Committed {
            offset: 40,
            metadata: Some(CommitMetadata { batch: 1, member: member.into(), ..CommitMetadata::default() }),
        };
        let error = check_state_is_here(&tp, 40, Some(&by("host-1")), Some(25), "host-2").unwrap_err();
        assert!(error.to_string().contains("member host-1 processed it up to offset 40"), "{error}");
        assert!(error.to_string().contains("only up to 25"), "{error}");
        assert!(check_state_is_here(&tp, 40, Some(&by("host-1")), None, "host-2").is_err());
        // Its own commits, commits by other tools, and no commit at all are fine.
        assert!(check_state_is_here(&tp, 40, Some(&by("host-2")), Some(25), "host-2").is_ok());
        let foreign = Committed { offset: 40, metadata: None };
        assert!(check_state_is_here(&tp, 40, Some(&foreign), None, "host-2").is_ok());
        assert!(check_state_is_here(&tp, 40, None, None, "host-2").is_ok());
    }
}
