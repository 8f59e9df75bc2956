//! The Kafka source in direct mode: the host assigns partitions itself (no group rebalancing),
//! fixes each batch's offset ranges before fetching, and reads exactly those ranges.
//!
//! One consumer stays assigned to every partition for the life of the job, so fetches run
//! ahead between batches. A record read past a range's end is kept for the next batch and its
//! partition paused, which bounds what is buffered to what librdkafka had already fetched.

mod ranges;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};

pub use ranges::{AutoOffsetReset, OffsetRange, StartPosition, TopicPartition, plan_range, start_position};

use crate::config::{JobConfig, Topics};
use crate::runtime::{Header, InputRecord};

/// How long one metadata or offsets request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two attempts of a failed broker request.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// How long `poll` blocks before the fetch loop checks partition positions again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The job's input: assigned partitions and where each one continues.
pub struct KafkaSource {
    /// Fetches records; assigned to every partition for the life of the job.
    consumer: BaseConsumer,
    /// Asks for offsets (log ends, committed offsets) on connections of its own: a broker
    /// answers a connection's requests in order, so on the fetching consumer's connection a
    /// ListOffsets would wait behind the long-polling Fetch (up to `fetch.wait.max.ms`).
    queries: BaseConsumer,
    cursors: BTreeMap<TopicPartition, Cursor>,
    /// The longest the source waits on brokers (connecting, listing offsets, fetching).
    broker_timeout: Duration,
    /// The bootstrap servers, for error messages.
    brokers: String,
}

/// Where one partition continues, plus records read ahead of the current range.
struct Cursor {
    /// The first offset of the next range.
    next: i64,
    /// Records at or past the current range's end, read while fetching it.
    read_ahead: VecDeque<InputRecord>,
    paused: bool,
}

/// A batch's plan for one partition: its range and the log end seen when planning.
#[derive(Debug, Clone)]
pub struct PlannedRange {
    pub range: OffsetRange,
    pub high_watermark: i64,
}

impl KafkaSource {
    /// Connects, discovers the job's partitions, picks each one's starting offset
    /// (`--start` > committed > `--auto-offset-reset`) and assigns them. Unreachable brokers
    /// are retried with a log line each time until `broker_timeout`.
    pub fn connect(job: &JobConfig) -> Result<KafkaSource> {
        let mut config = job.kafka_client_config();
        config
            .set("group.id", &job.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Positions are always explicit; a fetch out of range must surface, not reset.
            .set("auto.offset.reset", "error");
        let consumer: BaseConsumer = config.create().context("cannot create the Kafka consumer")?;
        let queries: BaseConsumer = config.create().context("cannot create the Kafka consumer")?;
        let mut source =
            KafkaSource { consumer, queries, cursors: BTreeMap::new(), broker_timeout: job.broker_timeout, brokers: job.brokers.clone() };

        let partitions = source.discover(job)?;
        let committed = source.committed(&partitions)?;
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let bounds = source.retry(&format!("read the log bounds of {partition}"), |consumer, timeout| {
                consumer.fetch_watermarks(&partition.topic, partition.partition, timeout)
            })?;
            let explicit = job.start.get(&partition).copied();
            let start = start_position(&partition, explicit, committed.get(&partition).copied(), job.auto_offset_reset, bounds)?;
            tracing::info!("{partition} starts at offset {start}");
            assignment.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(start.offset()))?;
            source.cursors.insert(partition, Cursor { next: start.offset(), read_ahead: VecDeque::new(), paused: false });
        }
        if let Some(unknown) = job.start.keys().find(|p| !source.cursors.contains_key(p)) {
            bail!("--start names {unknown}, which is not a partition this job reads");
        }
        source.consumer.assign(&assignment).context("cannot assign partitions")?;
        Ok(source)
    }

    /// The partitions this job reads, in order.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.cursors.keys()
    }

    /// Fixes this batch's range for every partition: from where the last batch ended up to the
    /// current high watermark (the last stable offset for `read_committed` consumers).
    pub fn plan(&mut self) -> Result<Vec<PlannedRange>> {
        let mut query = TopicPartitionList::new();
        for partition in self.cursors.keys() {
            query.add_partition_offset(&partition.topic, partition.partition, Offset::End)?;
        }
        let ends = self.retry("list the high watermarks", |consumer, timeout| consumer.offsets_for_times(query.clone(), timeout))?;
        let mut planned = Vec::with_capacity(self.cursors.len());
        for element in ends.elements() {
            let partition = TopicPartition::new(element.topic(), element.partition());
            let Offset::Offset(high_watermark) = element.offset() else {
                bail!("the broker returned no high watermark for {partition} ({:?})", element.error());
            };
            let next = self.cursors[&partition].next;
            planned.push(PlannedRange { range: plan_range(partition, next, high_watermark), high_watermark });
        }
        planned.sort_by(|a, b| a.range.partition.cmp(&b.range.partition));
        Ok(planned)
    }

    /// Reads exactly the records of each range, in offset order. On success the cursors move
    /// to the ranges' ends; the caller commits them once the batch's output is delivered.
    pub fn fetch(&mut self, ranges: &[OffsetRange]) -> Result<Vec<Vec<InputRecord>>> {
        let mut tasks: BTreeMap<&TopicPartition, (i64, i64, Vec<InputRecord>)> = BTreeMap::new();
        for range in ranges {
            let cursor = self.cursors.get_mut(&range.partition).context("range for an unassigned partition")?;
            let mut records = Vec::new();
            while let Some(record) = cursor.read_ahead.front() {
                if record.offset >= range.until {
                    break;
                }
                let record = cursor.read_ahead.pop_front().expect("front exists");
                if record.offset >= range.from {
                    records.push(record);
                }
            }
            // Records arrive in offset order, so one read ahead past the end closes the range.
            let reached = match (records.last(), cursor.read_ahead.is_empty()) {
                (_, false) => range.until,
                (Some(last), true) => last.offset + 1,
                (None, true) => range.from,
            };
            tasks.insert(&range.partition, (reached, range.until, records));
        }

        // Resume the partitions that still need records.
        let mut resume = TopicPartitionList::new();
        for (partition, (reached, until, _)) in &tasks {
            let cursor = &self.cursors[*partition];
            if reached < until && cursor.paused {
                resume.add_partition(&partition.topic, partition.partition);
            }
        }
        if resume.count() > 0 {
            self.consumer.resume(&resume).context("cannot resume partitions")?;
            for element in resume.elements() {
                self.cursors.get_mut(&TopicPartition::new(element.topic(), element.partition())).unwrap().paused = false;
            }
        }

        let deadline = Instant::now() + self.broker_timeout;
        let mut pending = tasks.values().filter(|(reached, until, _)| reached < until).count();
        while pending > 0 {
            match self.consumer.poll(POLL_INTERVAL) {
                Some(Ok(message)) => {
                    let partition = TopicPartition::new(message.topic(), message.partition());
                    let record = input_record(&message);
                    let Some(cursor) = self.cursors.get_mut(&partition) else { continue };
                    let Some((reached, until, records)) = tasks.get_mut(&partition) else {
                        // A partition with no range in this batch: keep for the next one.
                        cursor.read_ahead.push_back(record);
                        continue;
                    };
                    if record.offset < *reached {
                        continue; // already taken (a re-fetch after resume)
                    }
                    if record.offset >= *until {
                        cursor.read_ahead.push_back(record);
                        if !cursor.paused {
                            let mut pause = TopicPartitionList::new();
                            pause.add_partition(&partition.topic, partition.partition);
                            self.consumer.pause(&pause).context("cannot pause partition")?;
                            cursor.paused = true;
                        }
                        if reached < until {
                            *reached = *until;
                            pending -= 1;
                        }
                        continue;
                    }
                    let was_pending = reached < until;
                    *reached = record.offset + 1;
                    records.push(record);
                    if was_pending && reached >= until {
                        pending -= 1;
                    }
                }
                Some(Err(error)) => return Err(error).context("cannot fetch records"),
                None => {
                    // Offsets inside a range may hold no record (transaction markers,
                    // compaction); the consumer's position tells when a range is exhausted.
                    let positions = self.consumer.position().context("cannot read consumer positions")?;
                    for element in positions.elements() {
                        let partition = TopicPartition::new(element.topic(), element.partition());
                        if let (Some((reached, until, _)), Offset::Offset(position)) = (tasks.get_mut(&partition), element.offset())
                            && reached < until
                            && position >= *until
                        {
                            *reached = *until;
                            pending -= 1;
                        }
                    }
                    if pending > 0 && Instant::now() > deadline {
                        let stuck: Vec<String> = tasks
                            .iter()
                            .filter(|(_, (reached, until, _))| reached < until)
                            .map(|(partition, (reached, until, _))| format!("{partition} at {reached} of {until}"))
                            .collect();
                        bail!("timed out after {:?} fetching records: {}", self.broker_timeout, stuck.join(", "));
                    }
                }
            }
        }

        let mut batches = Vec::with_capacity(ranges.len());
        for range in ranges {
            let (_, _, records) = tasks.remove(&range.partition).expect("every range has a task");
            batches.push(records);
        }
        for range in ranges {
            self.cursors.get_mut(&range.partition).expect("assigned").next = range.until;
        }
        Ok(batches)
    }

    /// Commits the ranges' ends to the consumer group, synchronously: the batch is done for
    /// Kafka tooling only once the broker has accepted it.
    pub fn commit(&self, ranges: &[OffsetRange]) -> Result<()> {
        let mut offsets = TopicPartitionList::new();
        for range in ranges {
            offsets.add_partition_offset(&range.partition.topic, range.partition.partition, Offset::Offset(range.until))?;
        }
        self.consumer.commit(&offsets, CommitMode::Sync).context("cannot commit offsets to the consumer group")
    }

    fn discover(&self, job: &JobConfig) -> Result<Vec<TopicPartition>> {
        let metadata = self.retry("fetch topic metadata", |consumer, timeout| consumer.fetch_metadata(None, timeout))?;
        let mut partitions = Vec::new();
        let mut found = BTreeMap::new();
        for topic in metadata.topics() {
            let wanted = match &job.topics {
                Topics::Named(names) => names.iter().any(|name| name == topic.name()),
                Topics::Pattern(pattern) => !topic.name().starts_with("__") && pattern.is_match(topic.name()),
            };
            if wanted && topic.error().is_none() {
                found.insert(topic.name().to_string(), topic.partitions().len());
                partitions.extend(topic.partitions().iter().map(|p| TopicPartition::new(topic.name(), p.id())));
            }
        }
        match &job.topics {
            Topics::Named(names) => {
                if let Some(missing) = names.iter().find(|name| !found.contains_key(*name)) {
                    bail!("topic `{missing}` does not exist on {}", job.brokers);
                }
            }
            Topics::Pattern(pattern) if found.is_empty() => {
                bail!("no topic on {} matches --topic-pattern {}", job.brokers, pattern.as_str())
            }
            Topics::Pattern(_) => {}
        }
        partitions.sort();
        tracing::info!(
            "reading {} partitions of {}",
            partitions.len(),
            found.iter().map(|(topic, n)| format!("{topic} ({n})")).collect::<Vec<_>>().join(", ")
        );
        Ok(partitions)
    }

    fn committed(&self, partitions: &[TopicPartition]) -> Result<BTreeMap<TopicPartition, i64>> {
        let mut query = TopicPartitionList::new();
        for partition in partitions {
            query.add_partition(&partition.topic, partition.partition);
        }
        let committed = self.retry("read the group's committed offsets", |consumer, timeout| {
            consumer.committed_offsets(query.clone(), timeout)
        })?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some((TopicPartition::new(element.topic(), element.partition()), offset)),
                _ => None,
            })
            .collect())
    }

    /// Runs a broker request until it succeeds or `broker_timeout` has passed, logging each
    /// failure, so a broker that is briefly away does not stop the job.
    fn retry<T>(&self, what: &str, mut request: impl FnMut(&BaseConsumer, Duration) -> Result<T, KafkaError>) -> Result<T> {
        let deadline = Instant::now() + self.broker_timeout;
        let mut attempt = 1;
        loop {
            // Several attempts fit in the timeout, each logged, so an outage is visible early.
            let timeout = REQUEST_TIMEOUT.min(self.broker_timeout / 4).max(RETRY_BACKOFF);
            match request(&self.queries, timeout) {
                Ok(value) => return Ok(value),
                Err(error) if Instant::now() < deadline => {
                    tracing::warn!("cannot {what} from {} (attempt {attempt}): {error}; retrying", self.brokers);
                    attempt += 1;
                    std::thread::sleep(RETRY_BACKOFF.min(deadline.saturating_duration_since(Instant::now())));
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "cannot {what} from Kafka at {}: gave up after {} and {attempt} attempts",
                            self.brokers,
                            humantime::format_duration(self.broker_timeout)
                        )
                    });
                }
            }
        }
    }
}

fn input_record(message: &rdkafka::message::BorrowedMessage<'_>) -> InputRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers.iter().map(|header| Header { key: header.key.to_string(), value: header.value.map(<[u8]>::to_vec) }).collect()
        })
        .unwrap_or_default();
    InputRecord {
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}
