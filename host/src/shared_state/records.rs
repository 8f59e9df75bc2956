//! The records of the job's own topics, as they travel: a keyed value on the shuffle topic
//! with the stage-1 batch it came from, the end of that batch's values for one shuffle
//! partition, and a state change or partition marker on the changelog.

use anyhow::{Context as _, Result, bail};

use crate::checkpoint::PartitionMeta;
use crate::offsets::TopicPartition;
use crate::sinks::Outgoing;
use crate::source::RawHeader;

/// Header of every shuffle record: the stage-1 batch range it belongs to (binary, see
/// [`SourceRange::encode`]).
pub const SHUFFLE_HEADER: &str = "sluice-shuffle";
/// Header of every changelog record: the batch that wrote it (`member@batch time`).
pub const WRITER_HEADER: &str = "sluice-writer";
/// Header of a changelog state record: last update time and state schema version (binary).
pub const STATE_HEADER: &str = "sluice-state";
/// Header of a changelog marker: the partition's [`PartitionMeta`] as JSON.
pub const MARKER_HEADER: &str = "sluice-marker";
/// Header of a shuffle end marker: the stage-1 batch's time (i64, little-endian), which is the
/// time of the window pane its values belong to.
pub const BATCH_HEADER: &str = "sluice-batch";
/// Header of a changelog pane record: the pane's time (i64, little-endian).
pub const PANE_HEADER: &str = "sluice-pane";
/// Header of a changelog window-result record: the window's end (i64, little-endian; empty
/// when the result is removed).
pub const WINDOW_HEADER: &str = "sluice-window";
/// First byte of a pane record's Kafka key (then the pane time, big-endian, then the key), so
/// that compaction keeps one record per key and pane.
const PANE_KEY: u8 = 1;
/// First byte of a window-result record's Kafka key (then the key).
const WINDOW_KEY: u8 = 2;
/// The key of every changelog marker, so compaction keeps only the newest one.
pub const MARKER_KEY: &[u8] = b"\0sluice-state-partition";

/// An input partition's offset range of one stage-1 batch: what identifies the values it
/// wrote to the shuffle, so that stage 2 applies each batch once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub source: TopicPartition,
    pub from: i64,
    pub until: i64,
}

impl SourceRange {
    /// `[kind][from][until][partition][count][topic]`: kind 0 is a value, 1 the end of the
    /// range's values for this shuffle partition (`count` of them, 0 for a value).
    fn encode(&self, end: Option<u32>) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(25 + self.source.topic.len());
        bytes.push(u8::from(end.is_some()));
        bytes.extend_from_slice(&self.from.to_le_bytes());
        bytes.extend_from_slice(&self.until.to_le_bytes());
        bytes.extend_from_slice(&self.source.partition.to_le_bytes());
        bytes.extend_from_slice(&end.unwrap_or(0).to_le_bytes());
        bytes.extend_from_slice(self.source.topic.as_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<(SourceRange, Option<u32>)> {
        if bytes.len() < 25 {
            bail!("a shuffle header of {} bytes", bytes.len());
        }
        let i64_at = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let partition = i32::from_le_bytes(bytes[17..21].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(bytes[21..25].try_into().expect("4 bytes"));
        let topic = std::str::from_utf8(&bytes[25..]).context("a shuffle header with a non-UTF-8 topic")?;
        let range = SourceRange { source: TopicPartition::new(topic, partition), from: i64_at(1), until: i64_at(9) };
        Ok((range, (bytes[0] == 1).then_some(count)))
    }
}

/// One record read from a shuffle partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShuffleEntry {
    pub offset: i64,
    pub range: SourceRange,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Value {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The range wrote `count` values to this shuffle partition before this record, in the
    /// stage-1 batch of `batch_time` (absent in records of versions before windows shared).
    End {
        count: u32,
        batch_time: Option<i64>,
    },
}

impl ShuffleEntry {
    pub fn read(offset: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[RawHeader]) -> Result<ShuffleEntry> {
        let header = headers
            .iter()
            .find(|header| header.name == SHUFFLE_HEADER.as_bytes())
            .and_then(|header| header.value.as_deref())
            .with_context(|| format!("shuffle record at offset {offset} has no {SHUFFLE_HEADER} header"))?;
        let (range, end) = SourceRange::decode(header).with_context(|| format!("shuffle record at offset {offset}"))?;
        let kind = match end {
            Some(count) => EntryKind::End { count, batch_time: header_i64(headers, BATCH_HEADER) },
            None => {
                EntryKind::Value { key: key.unwrap_or_default().to_vec(), value: value.unwrap_or_default().to_vec() }
            }
        };
        Ok(ShuffleEntry { offset, range, kind })
    }
}

/// A record for one of the job's own topics, sent to an explicit partition.
#[derive(Debug, Clone)]
pub struct StageRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    /// `None`: a changelog tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl StageRecord {
    /// A keyed value of `range` for shuffle partition `partition`.
    pub fn shuffled(topic: &str, partition: u32, range: &SourceRange, key: Vec<u8>, value: Vec<u8>) -> StageRecord {
        StageRecord {
            topic: topic.to_string(),
            partition: partition as i32,
            key,
            value: Some(value),
            headers: vec![(SHUFFLE_HEADER, range.encode(None))],
        }
    }

    /// The end of `range`'s `count` values in shuffle partition `partition`, written by the
    /// stage-1 batch of `batch_time`.
    pub fn shuffle_end(topic: &str, partition: u32, range: &SourceRange, count: u32, batch_time: i64) -> StageRecord {
        StageRecord {
            topic: topic.to_string(),
            partition: partition as i32,
            key: Vec::new(),
            value: None,
            headers: vec![
                (SHUFFLE_HEADER, range.encode(Some(count))),
                (BATCH_HEADER, batch_time.to_le_bytes().to_vec()),
            ],
        }
    }

    /// A key's pane at `time` (`None`: expired) on changelog partition `partition`.
    pub fn pane(
        topic: &str,
        partition: u32,
        writer: &str,
        key: &[u8],
        time: i64,
        pane: Option<Vec<u8>>,
    ) -> StageRecord {
        let mut kafka_key = vec![PANE_KEY];
        kafka_key.extend_from_slice(&time.to_be_bytes());
        kafka_key.extend_from_slice(key);
        StageRecord {
            topic: topic.to_string(),
            partition: partition as i32,
            key: kafka_key,
            value: pane,
            headers: vec![(WRITER_HEADER, writer.as_bytes().to_vec()), (PANE_HEADER, time.to_le_bytes().to_vec())],
        }
    }

    /// A key's kept window result (`None`: dropped) on changelog partition `partition`.
    pub fn window(
        topic: &str,
        partition: u32,
        writer: &str,
        key: &[u8],
        result: Option<(i64, Vec<u8>)>,
    ) -> StageRecord {
        let mut kafka_key = vec![WINDOW_KEY];
        kafka_key.extend_from_slice(key);
        let (end, value) = match result {
            Some((end, value)) => (end.to_le_bytes().to_vec(), Some(value)),
            None => (Vec::new(), None),
        };
        StageRecord {
            topic: topic.to_string(),
            partition: partition as i32,
            key: kafka_key,
            value,
            headers: vec![(WRITER_HEADER, writer.as_bytes().to_vec()), (WINDOW_HEADER, end)],
        }
    }

    /// A key's new state (`None`: removed) on changelog partition `partition`.
    pub fn state(
        topic: &str,
        partition: u32,
        writer: &str,
        key: Vec<u8>,
        state: Option<(i64, u32, Vec<u8>)>,
    ) -> StageRecord {
        let mut headers = vec![(WRITER_HEADER, writer.as_bytes().to_vec())];
        let value = state.map(|(touched, schema, bytes)| {
            let mut header = touched.to_le_bytes().to_vec();
            header.extend_from_slice(&schema.to_le_bytes());
            headers.push((STATE_HEADER, header));
            bytes
        });
        StageRecord { topic: topic.to_string(), partition: partition as i32, key, value, headers }
    }

    /// The marker that ends a batch's changes on changelog partition `partition`.
    pub fn marker(topic: &str, partition: u32, writer: &str, meta: &PartitionMeta) -> StageRecord {
        StageRecord {
            topic: topic.to_string(),
            partition: partition as i32,
            key: MARKER_KEY.to_vec(),
            value: Some(Vec::new()),
            headers: vec![
                (WRITER_HEADER, writer.as_bytes().to_vec()),
                (MARKER_HEADER, serde_json::to_vec(meta).expect("plain struct")),
            ],
        }
    }
}

impl Outgoing for StageRecord {
    fn topic(&self) -> Option<&str> {
        Some(&self.topic)
    }
    fn partition(&self) -> Option<i32> {
        Some(self.partition)
    }
    fn key(&self) -> Option<&[u8]> {
        Some(&self.key)
    }
    fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn for_each_header(&self, mut f: impl FnMut(&[u8], Option<&[u8]>)) {
        for (name, value) in &self.headers {
            f(name.as_bytes(), Some(value));
        }
    }
}

/// One record read from a changelog partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangelogEntry {
    /// A key's state: `Some((touched, schema, bytes))`, or `None` when it was removed.
    State {
        writer: String,
        key: Vec<u8>,
        state: Option<(i64, u32, Vec<u8>)>,
    },
    Marker {
        writer: String,
        meta: PartitionMeta,
    },
    /// A key's pane at `time`, or `None` when it expired.
    Pane {
        writer: String,
        key: Vec<u8>,
        time: i64,
        pane: Option<Vec<u8>>,
    },
    /// A key's kept window result (end, value), or `None` when it was dropped.
    Window {
        writer: String,
        key: Vec<u8>,
        result: Option<(i64, Vec<u8>)>,
    },
}

/// A little-endian i64 header's value, if the header is there and 8 bytes long.
fn header_i64(headers: &[RawHeader], name: &str) -> Option<i64> {
    let value = headers.iter().find(|header| header.name == name.as_bytes())?.value.as_deref()?;
    Some(i64::from_le_bytes(value.try_into().ok()?))
}

impl ChangelogEntry {
    pub fn read(
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[RawHeader],
    ) -> Result<ChangelogEntry> {
        let header = |name: &str| {
            headers.iter().find(|header| header.name == name.as_bytes()).and_then(|header| header.value.as_deref())
        };
        let writer = header(WRITER_HEADER)
            .with_context(|| format!("changelog record at offset {offset} has no {WRITER_HEADER} header"))?;
        let writer = String::from_utf8_lossy(writer).into_owned();
        if let Some(meta) = header(MARKER_HEADER) {
            let meta = serde_json::from_slice(meta).with_context(|| format!("changelog marker at offset {offset}"))?;
            return Ok(ChangelogEntry::Marker { writer, meta });
        }
        let key = key.unwrap_or_default();
        if let Some(time) = header_i64(headers, PANE_HEADER) {
            let key = key.get(9..).context("a pane record with a short key")?.to_vec();
            return Ok(ChangelogEntry::Pane { writer, key, time, pane: value.map(<[u8]>::to_vec) });
        }
        if header(WINDOW_HEADER).is_some() {
            let key = key.get(1..).context("a window record with a short key")?.to_vec();
            let result = match value {
                Some(value) => {
                    let end = header_i64(headers, WINDOW_HEADER).context("a window result without its end")?;
                    Some((end, value.to_vec()))
                }
                None => None,
            };
            return Ok(ChangelogEntry::Window { writer, key, result });
        }
        let key = key.to_vec();
        let state = match (value, header(STATE_HEADER)) {
            (Some(bytes), Some(state)) if state.len() == 12 => {
                let touched = i64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
                let schema = u32::from_le_bytes(state[8..].try_into().expect("4 bytes"));
                Some((touched, schema, bytes.to_vec()))
            }
            (None, _) => None,
            _ => bail!("changelog record at offset {offset} has a value without a valid {STATE_HEADER} header"),
        };
        Ok(ChangelogEntry::State { writer, key, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's headers as a reader gets them back.
    fn raw(record: &StageRecord) -> Vec<RawHeader> {
        record.headers.iter().map(|(n, v)| RawHeader { name: n.as_bytes().to_vec(), value: Some(v.clone()) }).collect()
    }

    #[test]
    fn shuffle_headers_round_trip() {
        let range = SourceRange { source: TopicPartition::new("words", 7), from: 12, until: 40 };
        let value = StageRecord::shuffled("s", 3, &range, b"k".to_vec(), b"v".to_vec());
        let end = StageRecord::shuffle_end("s", 3, &range, 9, 4_000);
        let read = ShuffleEntry::read(5, Some(b"k"), Some(b"v"), &raw(&value)).unwrap();
        assert_eq!(read.range, range);
        assert_eq!(read.kind, EntryKind::Value { key: b"k".to_vec(), value: b"v".to_vec() });
        let read = ShuffleEntry::read(6, None, None, &raw(&end)).unwrap();
        assert_eq!(read.kind, EntryKind::End { count: 9, batch_time: Some(4_000) });
    }

    #[test]
    fn changelog_records_round_trip() {
        let put = StageRecord::state("c", 0, "a@1", b"k".to_vec(), Some((17, 2, b"s".to_vec())));
        assert_eq!(
            ChangelogEntry::read(0, Some(b"k"), put.value.as_deref(), &raw(&put)).unwrap(),
            ChangelogEntry::State { writer: "a@1".into(), key: b"k".to_vec(), state: Some((17, 2, b"s".to_vec())) }
        );
        let pane = StageRecord::pane("c", 0, "a@1", b"k", 3_000, Some(b"p".to_vec()));
        assert_eq!(
            ChangelogEntry::read(2, Some(&pane.key), pane.value.as_deref(), &raw(&pane)).unwrap(),
            ChangelogEntry::Pane { writer: "a@1".into(), key: b"k".to_vec(), time: 3_000, pane: Some(b"p".to_vec()) }
        );
        let expired = StageRecord::pane("c", 0, "a@1", b"k", 3_000, None);
        assert_ne!(expired.key, StageRecord::pane("c", 0, "a@1", b"k", 4_000, None).key, "one record per pane");
        let window = StageRecord::window("c", 0, "a@1", b"k", Some((6_000, b"w".to_vec())));
        assert_eq!(
            ChangelogEntry::read(3, Some(&window.key), window.value.as_deref(), &raw(&window)).unwrap(),
            ChangelogEntry::Window { writer: "a@1".into(), key: b"k".to_vec(), result: Some((6_000, b"w".to_vec())) }
        );
        let dropped = StageRecord::window("c", 0, "a@1", b"k", None);
        assert_eq!(
            ChangelogEntry::read(4, Some(&dropped.key), None, &raw(&dropped)).unwrap(),
            ChangelogEntry::Window { writer: "a@1".into(), key: b"k".to_vec(), result: None }
        );
        let meta =
            PartitionMeta { applied: vec![(TopicPartition::new("in", 1), 9)], resume: 4, ..PartitionMeta::default() };
        let marker = StageRecord::marker("c", 0, "a@1", &meta);
        assert_eq!(
            ChangelogEntry::read(1, Some(MARKER_KEY), Some(b""), &raw(&marker)).unwrap(),
            ChangelogEntry::Marker { writer: "a@1".into(), meta }
        );
    }
}
