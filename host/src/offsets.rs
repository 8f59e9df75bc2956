//! Offset ranges, starting positions and the policies around them: the plain types of direct
//! mode, shared by the source, the engine, the checkpoint and the configuration, and kept apart
//! from the Kafka client so their arithmetic can be tested on its own.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.topic, self.partition)
    }
}

impl FromStr for TopicPartition {
    type Err = anyhow::Error;

    /// Parses `TOPIC:PARTITION`. Topic names cannot contain `:`, so the last one splits.
    fn from_str(text: &str) -> anyhow::Result<TopicPartition> {
        let (topic, partition) =
            text.rsplit_once(':').with_context(|| format!("expected TOPIC:PARTITION, got {text:?}"))?;
        if topic.is_empty() {
            bail!("expected TOPIC:PARTITION, got {text:?} (empty topic)");
        }
        let partition = partition
            .parse::<i32>()
            .ok()
            .filter(|p| *p >= 0)
            .with_context(|| format!("partition in {text:?} is not a non-negative number"))?;
        Ok(TopicPartition::new(topic, partition))
    }
}

/// The records of one partition a batch covers: `[from, until)`, fixed before fetching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRange {
    pub partition: TopicPartition,
    /// First offset, inclusive.
    pub from: i64,
    /// End, exclusive: the offset the next batch starts at.
    pub until: i64,
}

impl OffsetRange {
    /// Number of offsets the range spans (records may be fewer on compacted topics).
    pub fn len(&self) -> i64 {
        self.until - self.from
    }

    pub fn is_empty(&self) -> bool {
        self.until <= self.from
    }
}

impl fmt::Display for OffsetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}, {})", self.partition, self.from, self.until)
    }
}

/// The non-empty ranges of a batch, as logs and `host checkpoint inspect` show them:
/// `in:0 [0, 5), in:2 [7, 9)`, or `no new records`.
pub fn describe_ranges(ranges: &[OffsetRange]) -> String {
    let described: Vec<String> = ranges.iter().filter(|range| !range.is_empty()).map(ToString::to_string).collect();
    if described.is_empty() { "no new records".to_string() } else { described.join(", ") }
}

/// The range a batch takes from a partition whose next offset is `next` and whose log ends
/// at `high_watermark`: everything available, or at most `cap` offsets when rate-limited.
pub fn plan_range(partition: TopicPartition, next: i64, high_watermark: i64, cap: Option<i64>) -> OffsetRange {
    let end = high_watermark.max(next);
    let until = match cap {
        Some(cap) => end.min(next.saturating_add(cap.max(0))),
        None => end,
    };
    OffsetRange { partition, from: next, until }
}

/// Where a partition without a usable position starts, as Kafka's `auto.offset.reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AutoOffsetReset {
    /// The oldest record still in the log.
    Earliest,
    /// The end of the log: only records produced from now on (Kafka's default).
    #[default]
    Latest,
}

/// Where a partition's first batch on this host starts, and why (logged, so a surprising
/// start is explained).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// `--start TOPIC:PARTITION=OFFSET`, applied once.
    Explicit(i64),
    /// `sluice_offsets` of `--postgres-mode transactional`, where rows and offsets commit together.
    Database(i64),
    /// The offset committed to the consumer group: the authority on where a partition
    /// continues, whichever member processed it last.
    Committed(i64),
    /// The job's checkpoint, when the group has no offset or is behind the checkpoint.
    Checkpoint(i64),
    /// No position known: `--auto-offset-reset`.
    Reset(AutoOffsetReset, i64),
    /// No position known and the partition was created while the job ran: its earliest
    /// offset, so nothing written to it before the next batch is skipped.
    New(i64),
}

impl StartPosition {
    pub fn offset(self) -> i64 {
        match self {
            StartPosition::Explicit(offset)
            | StartPosition::Database(offset)
            | StartPosition::Committed(offset)
            | StartPosition::Checkpoint(offset)
            | StartPosition::Reset(_, offset)
            | StartPosition::New(offset) => offset,
        }
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::Explicit(offset) => write!(f, "{offset} (--start)"),
            StartPosition::Database(offset) => write!(f, "{offset} (sluice_offsets)"),
            StartPosition::Committed(offset) => write!(f, "{offset} (committed)"),
            StartPosition::Checkpoint(offset) => write!(f, "{offset} (checkpoint)"),
            StartPosition::Reset(AutoOffsetReset::Earliest, offset) => write!(f, "{offset} (earliest)"),
            StartPosition::Reset(AutoOffsetReset::Latest, offset) => write!(f, "{offset} (latest)"),
            StartPosition::New(offset) => write!(f, "{offset} (earliest: a partition created while the job ran)"),
        }
    }
}

/// Where a partition could start, one candidate per source of truth.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartCandidates {
    /// `--start TOPIC:PARTITION=OFFSET`, if not applied before.
    pub explicit: Option<i64>,
    /// The database's offset, when the database is where offsets commit.
    pub database: Option<i64>,
    /// The consumer group's committed offset.
    pub committed: Option<i64>,
    /// The checkpoint's offset.
    pub checkpoint: Option<i64>,
    /// The partition did not exist when this host started.
    pub created_since_start: bool,
}

/// Picks a partition's starting offset. Precedence, highest first: an explicit `--start` not
/// applied before, the database (when it holds the offsets), then the group's committed offset
/// or the checkpoint's, whichever is further (the group is normally at or ahead of the
/// checkpoint, which commits after it; a group behind the checkpoint was rewound by hand, and
/// re-reading would count state twice), then the reset policy against the log's current bounds
/// `[low, high)` (earliest for partitions created while the job ran). Whether the result is
/// still in the log is [`check_in_log`]'s business.
pub fn start_position(candidates: StartCandidates, reset: AutoOffsetReset, (low, high): (i64, i64)) -> StartPosition {
    let StartCandidates { explicit, database, committed, checkpoint, created_since_start } = candidates;
    if let Some(offset) = explicit {
        return StartPosition::Explicit(offset);
    }
    if let Some(offset) = database {
        return StartPosition::Database(offset);
    }
    match (committed, checkpoint) {
        (Some(committed), Some(checkpoint)) if checkpoint > committed => StartPosition::Checkpoint(checkpoint),
        (Some(committed), _) => StartPosition::Committed(committed),
        (None, Some(checkpoint)) => StartPosition::Checkpoint(checkpoint),
        (None, None) if created_since_start => StartPosition::New(low),
        (None, None) => match reset {
            AutoOffsetReset::Earliest => StartPosition::Reset(reset, low),
            AutoOffsetReset::Latest => StartPosition::Reset(reset, high),
        },
    }
}

/// What to do when a partition's position is no longer in the log (retention deleted the
/// records, or the log was truncated behind it), like Spark's `failOnDataLoss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffsetOutOfRange {
    /// Continue at the oldest record still in the log.
    Earliest,
    /// Continue at the end of the log.
    Latest,
    /// Stop the job with an error: losing data must be a decision.
    #[default]
    Fail,
}

/// A position moved because it was outside the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repositioned {
    pub from: i64,
    pub to: i64,
    /// Offsets passed over without being read (0 when moving backwards).
    pub skipped: i64,
    /// The log's bounds when it happened.
    pub log: (i64, i64),
}

impl fmt::Display for Repositioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (low, high) = self.log;
        if self.from < low {
            write!(f, "offsets [{}, {low}) are gone from the log (retention); ", self.from)?;
        } else {
            write!(f, "offset {} is past the log end {high}; ", self.from)?;
        }
        write!(f, "skipped {} offsets, continuing at {}", self.skipped, self.to)
    }
}

/// Checks that `position` lies in the log `[low, high]` (the end itself is a valid position:
/// the next record to be written) and applies `policy` when it does not.
pub fn check_in_log(
    partition: &TopicPartition,
    position: i64,
    (low, high): (i64, i64),
    policy: OnOffsetOutOfRange,
) -> anyhow::Result<Option<Repositioned>> {
    if (low..=high).contains(&position) {
        return Ok(None);
    }
    let to = match policy {
        OnOffsetOutOfRange::Earliest => low,
        OnOffsetOutOfRange::Latest => high,
        OnOffsetOutOfRange::Fail => bail!(
            "{partition}: offset {position} is outside the log, which holds offsets [{low}, {high}); \
             pass --on-offset-out-of-range earliest or latest to skip ahead"
        ),
    };
    Ok(Some(Repositioned { from: position, to, skipped: (to - position).max(0), log: (low, high) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("in", 3)
    }

    fn candidates(explicit: Option<i64>, committed: Option<i64>, checkpoint: Option<i64>) -> StartCandidates {
        StartCandidates { explicit, committed, checkpoint, ..StartCandidates::default() }
    }

    #[test]
    fn an_explicit_start_beats_everything() {
        let start = start_position(candidates(Some(5), Some(9), Some(7)), AutoOffsetReset::Latest, (0, 20));
        assert_eq!(start, StartPosition::Explicit(5));
    }

    #[test]
    fn the_database_beats_the_group_when_it_holds_the_offsets() {
        let both = StartCandidates { database: Some(3), committed: Some(9), ..StartCandidates::default() };
        assert_eq!(start_position(both, AutoOffsetReset::Latest, (0, 20)), StartPosition::Database(3));
    }

    #[test]
    fn the_group_is_the_authority_unless_it_fell_behind_the_checkpoint() {
        let ahead = start_position(candidates(None, Some(9), Some(7)), AutoOffsetReset::Latest, (0, 20));
        assert_eq!(ahead, StartPosition::Committed(9), "another member moved on: the group wins");
        let behind = start_position(candidates(None, Some(4), Some(7)), AutoOffsetReset::Latest, (0, 20));
        assert_eq!(behind, StartPosition::Checkpoint(7), "a rewound group must not re-count state");
        let only = start_position(candidates(None, None, Some(7)), AutoOffsetReset::Latest, (0, 20));
        assert_eq!(only, StartPosition::Checkpoint(7), "the group's offsets expired");
    }

    #[test]
    fn reset_uses_the_log_bounds_and_new_partitions_start_at_their_beginning() {
        let earliest = start_position(candidates(None, None, None), AutoOffsetReset::Earliest, (4, 20));
        let latest = start_position(candidates(None, None, None), AutoOffsetReset::Latest, (4, 20));
        assert_eq!((earliest.offset(), latest.offset()), (4, 20));
        let created = StartCandidates { created_since_start: true, ..StartCandidates::default() };
        assert_eq!(start_position(created, AutoOffsetReset::Latest, (4, 20)), StartPosition::New(4));
    }

    #[test]
    fn positions_in_the_log_are_kept() {
        for position in [4, 10, 20] {
            assert_eq!(check_in_log(&tp(), position, (4, 20), OnOffsetOutOfRange::Fail).unwrap(), None);
        }
    }

    #[test]
    fn a_lost_position_fails_by_default_naming_both_numbers() {
        let error = check_in_log(&tp(), 2, (4, 20), OnOffsetOutOfRange::Fail).unwrap_err();
        assert!(
            error.to_string().starts_with("in:3: offset 2 is outside the log, which holds offsets [4, 20)"),
            "{error}"
        );
    }

    #[test]
    fn a_lost_position_skips_ahead_by_policy_counting_what_was_skipped() {
        let earliest = check_in_log(&tp(), 2, (4, 20), OnOffsetOutOfRange::Earliest).unwrap().unwrap();
        assert_eq!((earliest.to, earliest.skipped), (4, 2));
        assert_eq!(
            earliest.to_string(),
            "offsets [2, 4) are gone from the log (retention); skipped 2 offsets, continuing at 4"
        );
        let latest = check_in_log(&tp(), 2, (4, 20), OnOffsetOutOfRange::Latest).unwrap().unwrap();
        assert_eq!((latest.to, latest.skipped), (20, 18));
        // Past the end (a truncated log): earliest rewinds, skipping nothing.
        let rewound = check_in_log(&tp(), 25, (4, 20), OnOffsetOutOfRange::Earliest).unwrap().unwrap();
        assert_eq!((rewound.to, rewound.skipped), (4, 0));
    }

    #[test]
    fn ranges_run_to_the_high_watermark_and_never_backwards() {
        assert_eq!(plan_range(tp(), 7, 12, None), OffsetRange { partition: tp(), from: 7, until: 12 });
        assert!(plan_range(tp(), 7, 7, None).is_empty());
        // A watermark behind the position (e.g. a truncated log) gives an empty range, not a
        // negative one.
        assert_eq!(plan_range(tp(), 7, 5, None).len(), 0);
    }

    #[test]
    fn a_cap_limits_the_range() {
        assert_eq!(plan_range(tp(), 7, 100, Some(10)).until, 17);
        assert_eq!(plan_range(tp(), 7, 12, Some(10)).until, 12);
    }

    #[test]
    fn topic_partitions_parse_with_the_last_colon() {
        assert_eq!("a.b:2".parse::<TopicPartition>().unwrap(), TopicPartition::new("a.b", 2));
        assert!("nopartition".parse::<TopicPartition>().is_err());
        assert!("t:-1".parse::<TopicPartition>().is_err());
        assert!(":1".parse::<TopicPartition>().is_err());
    }
}
