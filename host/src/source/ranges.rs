//! Offset ranges and starting positions: the pure arithmetic of direct mode, kept apart from
//! the Kafka client so it can be tested on its own.

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

/// The range a batch takes from a partition whose next offset is `next` and whose log ends
/// at `high_watermark`: everything available. (Rate limits will clamp `until` here.)
pub fn plan_range(partition: TopicPartition, next: i64, high_watermark: i64) -> OffsetRange {
    OffsetRange { partition, from: next, until: high_watermark.max(next) }
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

/// Where a partition's first batch starts, and why (logged, so a surprising start is explained).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// `--start TOPIC:PARTITION=OFFSET`.
    Explicit(i64),
    /// The offset committed to the consumer group.
    Committed(i64),
    /// No position known: `--auto-offset-reset`.
    Reset(AutoOffsetReset, i64),
}

impl StartPosition {
    pub fn offset(self) -> i64 {
        match self {
            StartPosition::Explicit(offset) | StartPosition::Committed(offset) | StartPosition::Reset(_, offset) => offset,
        }
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::Explicit(offset) => write!(f, "{offset} (--start)"),
            StartPosition::Committed(offset) => write!(f, "{offset} (committed)"),
            StartPosition::Reset(AutoOffsetReset::Earliest, offset) => write!(f, "{offset} (earliest)"),
            StartPosition::Reset(AutoOffsetReset::Latest, offset) => write!(f, "{offset} (latest)"),
        }
    }
}

/// Picks a partition's starting offset. Precedence, highest first: an explicit `--start`,
/// the group's committed offset, then the reset policy against the log's current bounds
/// `[low, high)`. An explicit or committed offset outside the log is an error naming both.
pub fn start_position(
    partition: &TopicPartition,
    explicit: Option<i64>,
    committed: Option<i64>,
    reset: AutoOffsetReset,
    (low, high): (i64, i64),
) -> anyhow::Result<StartPosition> {
    let position = match (explicit, committed) {
        (Some(offset), _) => StartPosition::Explicit(offset),
        (None, Some(offset)) => StartPosition::Committed(offset),
        (None, None) => match reset {
            AutoOffsetReset::Earliest => StartPosition::Reset(reset, low),
            AutoOffsetReset::Latest => StartPosition::Reset(reset, high),
        },
    };
    let offset = position.offset();
    if offset < low || offset > high {
        bail!("{partition}: start offset {position} is outside the log, which holds offsets [{low}, {high})");
    }
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("in", 3)
    }

    #[test]
    fn explicit_start_beats_committed_and_reset() {
        let start = start_position(&tp(), Some(5), Some(9), AutoOffsetReset::Latest, (0, 20)).unwrap();
        assert_eq!(start, StartPosition::Explicit(5));
    }

    #[test]
    fn committed_beats_reset() {
        let start = start_position(&tp(), None, Some(9), AutoOffsetReset::Earliest, (0, 20)).unwrap();
        assert_eq!(start, StartPosition::Committed(9));
    }

    #[test]
    fn reset_uses_the_log_bounds() {
        let earliest = start_position(&tp(), None, None, AutoOffsetReset::Earliest, (4, 20)).unwrap();
        let latest = start_position(&tp(), None, None, AutoOffsetReset::Latest, (4, 20)).unwrap();
        assert_eq!((earliest.offset(), latest.offset()), (4, 20));
    }

    #[test]
    fn a_position_outside_the_log_is_refused_with_both_numbers() {
        let error = start_position(&tp(), None, Some(2), AutoOffsetReset::Earliest, (4, 20)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "in:3: start offset 2 (committed) is outside the log, which holds offsets [4, 20)"
        );
        assert!(start_position(&tp(), Some(21), None, AutoOffsetReset::Earliest, (4, 20)).is_err());
        // The end of the log itself is a valid position: the next record to be written.
        assert!(start_position(&tp(), Some(20), None, AutoOffsetReset::Earliest, (4, 20)).is_ok());
    }

    #[test]
    fn ranges_run_to_the_high_watermark_and_never_backwards() {
        assert_eq!(plan_range(tp(), 7, 12), OffsetRange { partition: tp(), from: 7, until: 12 });
        assert!(plan_range(tp(), 7, 7).is_empty());
        // A watermark behind the position (e.g. a truncated log) gives an empty range, not a
        // negative one.
        assert_eq!(plan_range(tp(), 7, 5).len(), 0);
    }

    #[test]
    fn topic_partitions_parse_with_the_last_colon() {
        assert_eq!("a.b:2".parse::<TopicPartition>().unwrap(), TopicPartition::new("a.b", 2));
        assert!("nopartition".parse::<TopicPartition>().is_err());
        assert!("t:-1".parse::<TopicPartition>().is_err());
        assert!(":1".parse::<TopicPartition>().is_err());
    }
}
