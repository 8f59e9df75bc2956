//! The Kafka source in direct mode: the host assigns partitions itself (no group rebalancing),
//! fixes each batch's offset ranges before fetching, and reads exactly those ranges.
//!
//! One consumer stays assigned to every partition for the life of the job, so fetches run
//! ahead between batches. A record read past a range's end is kept for the next batch and its
//! partition paused, which bounds what is buffered to what librdkafka had already fetched.

mod ranges;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};

pub use ranges::{
    AutoOffsetReset, OffsetRange, OnOffsetOutOfRange, Repositioned, StartCandidates, StartPosition, TopicPartition,
    check_in_log, describe_ranges, plan_range, start_position,
};

use crate::config::{JobConfig, Topics};
use crate::runtime::{Header, InputRecord};

/// How long one metadata or offsets request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at one group commit before the batch moves on without it.
const COMMIT_ATTEMPTS: u32 = 3;
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
    /// Where the checkpoint says each partition continues; beats the group's offsets.
    checkpointed: BTreeMap<TopicPartition, i64>,
    /// The longest the source waits on brokers (connecting, listing offsets, fetching).
    broker_timeout: Duration,
    /// The bootstrap servers, for error messages.
    brokers: String,
    topics: Topics,
    auto_offset_reset: AutoOffsetReset,
    on_out_of_range: OnOffsetOutOfRange,
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
    /// (`--start` > `checkpointed` > committed > `--auto-offset-reset`) and assigns them.
    /// Unreachable brokers are retried with a log line each time until `broker_timeout`.
    pub fn connect(job: &JobConfig, checkpointed: BTreeMap<TopicPartition, i64>) -> Result<KafkaSource> {
        let mut config = job.kafka_client_config();
        config
            .set("group.id", &job.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Positions are always explicit; a fetch out of range must surface, not reset.
            .set("auto.offset.reset", "error");
        // A batch drains the fetch queue in one burst, and a partition whose queue was full
        // when librdkafka looked is not fetched again for this long: its default (1 s) stalled
        // the first batch of a backlog by a second (docs/BENCHMARKS.md).
        if config.get("fetch.queue.backoff.ms").is_none() {
            config.set("fetch.queue.backoff.ms", "10");
        }
        let consumer: BaseConsumer = config.create().context("cannot create the Kafka consumer")?;
        let queries: BaseConsumer = config.create().context("cannot create the Kafka consumer")?;
        let mut source = KafkaSource {
            consumer,
            queries,
            cursors: BTreeMap::new(),
            checkpointed,
            broker_timeout: job.broker_timeout,
            brokers: job.brokers.clone(),
            topics: job.topics.clone(),
            auto_offset_reset: job.auto_offset_reset,
            on_out_of_range: job.on_offset_out_of_range,
        };

        let partitions = source.discover()?;
        if let Topics::Named(names) = &job.topics
            && let Some(missing) = names.iter().find(|name| !partitions.iter().any(|p| &p.topic == *name))
        {
            bail!("topic `{missing}` does not exist on {}", job.brokers);
        }
        if partitions.is_empty() {
            tracing::warn!("no topic on {} matches --topic-pattern {} yet", job.brokers, source.topics_description());
        }
        if let Some(unknown) = job.start.keys().find(|p| !partitions.contains(p)) {
            bail!("--start names {unknown}, which is not a partition this job reads");
        }
        tracing::info!("reading {} partitions of {}", partitions.len(), source.topics_description());
        source.add_partitions(partitions, &job.start)?;
        Ok(source)
    }

    /// The partitions this job reads, in order.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.cursors.keys()
    }

    /// Picks up partitions created since the last call (new partitions start per the reset
    /// policy unless the group has committed offsets for them) and drops deleted ones.
    pub fn refresh_partitions(&mut self) -> Result<()> {
        let found = self.discover()?;
        let gone: Vec<TopicPartition> = self.cursors.keys().filter(|p| !found.contains(p)).cloned().collect();
        if !gone.is_empty() {
            let mut unassign = TopicPartitionList::new();
            for partition in &gone {
                unassign.add_partition(&partition.topic, partition.partition);
                self.cursors.remove(partition);
            }
            self.consumer.incremental_unassign(&unassign).context("cannot unassign deleted partitions")?;
            tracing::warn!("dropped partitions that no longer exist: {}", join(&gone));
        }
        let new: Vec<TopicPartition> = found.into_iter().filter(|p| !self.cursors.contains_key(p)).collect();
        if !new.is_empty() {
            tracing::info!("discovered new partitions: {}", join(&new));
            self.add_partitions(new, &BTreeMap::new())?;
        }
        Ok(())
    }

    /// Chooses starting offsets for `partitions` and adds them to the assignment.
    fn add_partitions(
        &mut self,
        partitions: Vec<TopicPartition>,
        explicit: &BTreeMap<TopicPartition, i64>,
    ) -> Result<()> {
        let committed = self.committed(&partitions)?;
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let bounds = self.retry(&format!("read the log bounds of {partition}"), |consumer, timeout| {
                consumer.fetch_watermarks(&partition.topic, partition.partition, timeout)
            })?;
            let candidates = StartCandidates {
                explicit: explicit.get(&partition).copied(),
                checkpoint: self.checkpointed.get(&partition).copied(),
                committed: committed.get(&partition).copied(),
            };
            let start = start_position(candidates, self.auto_offset_reset, bounds);
            let mut offset = start.offset();
            match check_in_log(&partition, offset, bounds, self.on_out_of_range)? {
                None => tracing::info!("{partition} starts at offset {start}"),
                Some(moved) => {
                    tracing::warn!("{partition}: start offset {start}: {moved} (--on-offset-out-of-range)");
                    offset = moved.to;
                }
            }
            assignment.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(offset))?;
            self.cursors.insert(partition, Cursor { next: offset, read_ahead: VecDeque::new(), paused: false });
        }
        // The consumer fetches a partition only once it knows the partition's leader, and it
        // learns that from its own metadata request: asked now, so that its first fetch does
        // not wait for a lazy refresh (which took a second in the benchmarks).
        let elements = assignment.elements();
        let topics: BTreeSet<&str> = elements.iter().map(|element| element.topic()).collect();
        for topic in topics {
            if let Err(error) = self.consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT) {
                tracing::debug!("metadata of {topic} not fetched ahead of assigning it: {error}");
            }
        }
        self.consumer.incremental_assign(&assignment).context("cannot assign partitions")
    }

    /// Fixes this batch's range for every partition: from where the last batch ended up to the
    /// current high watermark (the last stable offset for `read_committed` consumers), capped
    /// per partition by `caps`, which gets each partition's lag in order. A position that fell
    /// out of the log (retention) is handled by `--on-offset-out-of-range` first.
    pub fn plan(&mut self, caps: impl FnOnce(&[i64]) -> Option<Vec<i64>>) -> Result<Vec<PlannedRange>> {
        let lows = self.list_offsets("list the log start offsets", Offset::Beginning)?;
        let highs = self.list_offsets("list the high watermarks", Offset::End)?;
        let mut positions = Vec::with_capacity(self.cursors.len());
        for (partition, cursor) in &mut self.cursors {
            let (Some(&low), Some(&high)) = (lows.get(partition), highs.get(partition)) else {
                bail!("the broker returned no log bounds for {partition}");
            };
            if let Some(moved) = check_in_log(partition, cursor.next, (low, high), self.on_out_of_range)? {
                tracing::warn!("{partition}: {moved} (--on-offset-out-of-range)");
                self.consumer
                    .seek(&partition.topic, partition.partition, Offset::Offset(moved.to), REQUEST_TIMEOUT)
                    .with_context(|| format!("cannot move {partition} to offset {}", moved.to))?;
                cursor.next = moved.to;
                cursor.read_ahead.clear();
            }
            positions.push((partition.clone(), cursor.next, high));
        }
        let lags: Vec<i64> = positions.iter().map(|(_, next, high)| (high - next).max(0)).collect();
        let caps = caps(&lags);
        Ok(positions
            .into_iter()
            .enumerate()
            .map(|(i, (partition, next, high_watermark))| PlannedRange {
                range: plan_range(partition, next, high_watermark, caps.as_ref().map(|caps| caps[i])),
                high_watermark,
            })
            .collect())
    }

    /// The offsets the broker reports for every assigned partition at `which` (start or end).
    fn list_offsets(&self, what: &str, which: Offset) -> Result<BTreeMap<TopicPartition, i64>> {
        let mut query = TopicPartitionList::new();
        for partition in self.cursors.keys() {
            query.add_partition_offset(&partition.topic, partition.partition, which)?;
        }
        let answer = self.retry(what, |consumer, timeout| consumer.offsets_for_times(query.clone(), timeout))?;
        Ok(answer
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some((TopicPartition::new(element.topic(), element.partition()), offset)),
                _ => None,
            })
            .collect())
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
                self.cursors.get_mut(&TopicPartition::new(element.topic(), element.partition())).unwrap().paused =
                    false;
            }
        }

        let deadline = Instant::now() + self.broker_timeout;
        let mut pending = tasks.values().filter(|(reached, until, _)| reached < until).count();
        while pending > 0 {
            match self.consumer.poll(POLL_INTERVAL) {
                Some(Ok(message)) => {
                    let partition = TopicPartition::new(message.topic(), message.partition());
                    let record = input_record(&message);
                    let Some(cursor) = self.cursors.get_mut(&partition) else {
                        continue;
                    };
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
                        if let (Some((reached, until, _)), Offset::Offset(position)) =
                            (tasks.get_mut(&partition), element.offset())
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
    /// Kafka tooling only once the broker has accepted it. A failure is retried a few times,
    /// each logged with the partitions concerned; then the error is returned.
    pub fn commit(&self, ranges: &[OffsetRange]) -> Result<()> {
        let mut offsets = TopicPartitionList::new();
        for range in ranges {
            offsets.add_partition_offset(
                &range.partition.topic,
                range.partition.partition,
                Offset::Offset(range.until),
            )?;
        }
        let mut attempt = 1;
        loop {
            match self.consumer.commit(&offsets, CommitMode::Sync) {
                Ok(()) => return Ok(()),
                Err(error) => {
                    let partitions = ranges.iter().map(|r| format!("{}={}", r.partition, r.until)).collect::<Vec<_>>();
                    let message =
                        format!("cannot commit offsets {} (attempt {attempt}): {error}", partitions.join(", "));
                    if attempt >= COMMIT_ATTEMPTS {
                        bail!(message);
                    }
                    tracing::warn!("{message}; retrying");
                    attempt += 1;
                    std::thread::sleep(RETRY_BACKOFF);
                }
            }
        }
    }

    /// Every partition of the job's topics the brokers know now, in order.
    fn discover(&self) -> Result<Vec<TopicPartition>> {
        let metadata =
            self.retry("fetch topic metadata", |consumer, timeout| consumer.fetch_metadata(None, timeout))?;
        let mut partitions = Vec::new();
        for topic in metadata.topics() {
            let wanted = match &self.topics {
                Topics::Named(names) => names.iter().any(|name| name == topic.name()),
                Topics::Pattern(pattern) => !topic.name().starts_with("__") && pattern.is_match(topic.name()),
            };
            if wanted && topic.error().is_none() {
                partitions.extend(topic.partitions().iter().map(|p| TopicPartition::new(topic.name(), p.id())));
            }
        }
        partitions.sort();
        Ok(partitions)
    }

    fn topics_description(&self) -> String {
        match &self.topics {
            Topics::Named(names) => names.join(", "),
            Topics::Pattern(pattern) => pattern.as_str().to_string(),
        }
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
    fn retry<T>(
        &self,
        what: &str,
        mut request: impl FnMut(&BaseConsumer, Duration) -> Result<T, KafkaError>,
    ) -> Result<T> {
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

fn join(partitions: &[TopicPartition]) -> String {
    partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn input_record(message: &rdkafka::message::BorrowedMessage<'_>) -> InputRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|header| Header { key: header.key.to_string(), value: header.value.map(<[u8]>::to_vec) })
                .collect()
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
