//! The Kafka source in direct mode: each batch fixes an offset range per partition before
//! fetching and reads exactly those ranges.
//!
//! Which partitions this host reads is the consumer group's decision ([`membership`]): the
//! job subscribes, the coordinator assigns, and assignment changes are applied at batch
//! boundaries. Each assigned partition gets its own librdkafka queue, so librdkafka keeps
//! prefetching every partition (bounded by `queued.max.messages.kbytes` per partition) while
//! a batch takes only its range: a small rate-limited batch finds its records already local.
//!
//! Broker trouble is ridden out, not reported as failure: librdkafka reconnects, finds new
//! leaders and retries by itself, so a fetch fails only when it has made no progress (no
//! record, no position change) for `--broker-timeout`.

mod members;
pub mod membership;
pub mod record;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::{JobConfig, TaskBounds, Topics};
use crate::offsets::{OffsetRange, OnOffsetOutOfRange, TopicPartition, check_in_log, plan_range};
pub use members::{GroupView, LiveMember, MemberView, PartitionView, group_view};
pub use membership::Change;
use membership::{Membership, is_generation_change, is_replaced, is_transient};
pub use record::{RawHeader, SourceRecord, Unreadable};

/// How long one metadata or offsets request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two attempts of a failed broker request.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// How long the fetch loop sleeps when no partition queue has records, unless woken.
const IDLE_WAIT: Duration = Duration::from_millis(10);
/// The same broker error is logged at most this often while it lasts.
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// A topic of a `--topic-pattern` job is dropped only after this many metadata answers in a
/// row lack it: one answer with a topic error is a broker's hiccup, not a deletion.
const MISSING_ANSWERS_BEFORE_DROP: u32 = 2;

/// The job's input: the partitions this member owns and where each one continues.
pub struct KafkaSource {
    /// Fetches records and is the group member; assignment changes arrive on its main queue.
    consumer: Arc<BaseConsumer<Membership>>,
    /// Asks for offsets and metadata on connections of its own: a broker answers a
    /// connection's requests in order, so on the fetching consumer's connection a ListOffsets
    /// would wait behind the long-polling Fetch (up to `fetch.wait.max.ms`).
    queries: BaseConsumer,
    cursors: BTreeMap<TopicPartition, Cursor>,
    /// Woken by librdkafka when a partition queue gets records, so the fetch loop never
    /// sleeps past their arrival.
    wake: Arc<Wake>,
    /// The longest the source waits on brokers without progress.
    broker_timeout: Duration,
    /// The bootstrap servers, for error messages.
    brokers: String,
    topics: Topics,
    /// What the consumer is subscribed to (topic names; a pattern is resolved here, with Rust
    /// regex semantics, rather than by librdkafka's own regex dialect).
    subscribed: BTreeSet<String>,
    /// Consecutive metadata answers that lacked a subscribed topic.
    missing: BTreeMap<String, u32>,
    /// Partitions that existed when this host started: a partition created later starts at its
    /// earliest offset, not per `--auto-offset-reset`, so nothing written to it is skipped.
    known_at_start: BTreeSet<TopicPartition>,
    on_out_of_range: OnOffsetOutOfRange,
    faults: FaultLog,
    /// With `--shared-state`: the job's shuffle topic, whose partitions the group assigns with
    /// the input's (owning shuffle partition `s` is owning state partition `s`). They are
    /// never fetched here: stage 2 reads them (see [`crate::shared_state`]).
    state_topic: Option<String>,
    /// The shuffle partitions this member owns.
    state_partitions: BTreeSet<TopicPartition>,
    /// Topics the job writes itself, never read as input even if `--topic-pattern` matches.
    own_topics: Vec<String>,
}

/// Where one partition continues, and its queue of prefetched records.
struct Cursor {
    /// The first offset of the next range.
    next: i64,
    queue: rdkafka::consumer::base_consumer::PartitionQueue<Membership>,
    /// A record at or past the current range's end, read while closing it.
    peeked: Option<SourceRecord>,
}

/// A batch's plan for one partition: its range and the log end seen when planning.
#[derive(Debug, Clone)]
pub struct PlannedRange {
    pub range: OffsetRange,
    pub high_watermark: i64,
}

/// What the group has committed for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: i64,
    /// What Sluice wrote beside the offset, if it was Sluice that committed it.
    pub metadata: Option<CommitMetadata>,
}

/// Written beside every offset Sluice commits: which batch committed it (on which member,
/// with which plugin build), and which explicit `--start` the job has applied to the partition,
/// so a restart does not apply it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMetadata {
    /// The batch time of the batch that committed the offset.
    pub batch: i64,
    /// The `--start` offset applied to this partition, if any ever was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    /// The member (`--instance-id`) that committed it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub member: String,
    /// The plugin build (SHA-256 prefix) that processed the batch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build: String,
    /// With `--shared-state`: the batch ran on a host alone, so its state changes are in
    /// that host's checkpoint and not (yet) in the changelog.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_state: bool,
}

impl CommitMetadata {
    /// Kafka's offset metadata is a string; Sluice's is JSON with a marker, so offsets
    /// committed by other tools are told apart.
    fn encode(&self) -> String {
        format!("sluice:{}", serde_json::to_string(self).expect("plain struct"))
    }

    fn decode(text: &str) -> Option<CommitMetadata> {
        serde_json::from_str(text.strip_prefix("sluice:")?).ok()
    }
}

/// A partition newly assigned to this member, before it has a position.
#[derive(Debug, Clone)]
pub struct Assigned {
    pub partition: TopicPartition,
    /// The group's committed offset, the authority on where the partition continues.
    pub committed: Option<Committed>,
    /// The partition did not exist when this host started.
    pub created_since_start: bool,
    /// The log's bounds `[low, high)` now.
    pub bounds: (i64, i64),
}

/// What a rebalance changed, once applied.
#[derive(Debug, Default, Clone)]
pub struct Rebalanced {
    pub assigned: Vec<TopicPartition>,
    pub revoked: Vec<TopicPartition>,
    /// Revoked because this member's session had expired: another member may already own them.
    pub lost: Vec<TopicPartition>,
}

impl Rebalanced {
    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty() && self.revoked.is_empty()
    }
}

/// A batch's records: one list per range, in range order.
#[derive(Debug)]
pub struct Fetched {
    pub records: Vec<Vec<SourceRecord>>,
    /// Where each range actually ended: its planned end, or earlier when the task reached
    /// its bounds first (the rest is left for a later batch).
    pub ends: Vec<i64>,
}

/// Partitions this member lost while a batch was reading them (its group session expired
/// during a broker outage): the batch cannot be committed and is abandoned; the partitions'
/// owner of record replays it.
#[derive(Debug, thiserror::Error)]
#[error(
    "fenced: the consumer group took {partitions} away while the batch was reading them (this member's session expired)"
)]
pub struct Lost {
    pub partitions: String,
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// This member no longer owns (some of) the partitions: the group has moved on.
    #[error("fenced: the consumer group gave {partitions} to another member ({cause})")]
    Fenced { partitions: String, cause: String },
    /// The brokers did not accept the commit within `--broker-timeout`.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl KafkaSource {
    /// Connects, checks the job's topics exist, joins the consumer group and waits for the
    /// coordinator's first answer (an assignment, possibly empty). Unreachable brokers are
    /// retried, each attempt logged, until `--broker-timeout`.
    /// `state_topic`: the shuffle topic of a `--shared-state` job; `own_topics`: the topics the
    /// job writes itself, never read as its input.
    pub fn connect(job: &JobConfig, state_topic: Option<String>, own_topics: Vec<String>) -> Result<KafkaSource> {
        let mut config = job.kafka_client_config();
        config
            .set("group.id", &job.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Positions are always explicit; a fetch out of range must surface, not reset.
            .set("auto.offset.reset", "error");
        set_default(&mut config, "partition.assignment.strategy", "cooperative-sticky");
        let session = job.session_timeout.as_millis();
        set_default(&mut config, "session.timeout.ms", &session.to_string());
        // Three heartbeats per session, so one late heartbeat does not cost the membership.
        set_default(&mut config, "heartbeat.interval.ms", &(session / 3).min(3000).to_string());
        // Each partition's prefetch is bounded on its own (separate queues); librdkafka's
        // default of 64 MiB per queue is a lot of memory over many partitions.
        set_default(&mut config, "queued.max.messages.kbytes", "8192");
        // A partition whose queue was full when librdkafka looked is not fetched again for
        // this long; its default (1 s) stalled backlog batches by a second (docs/BENCHMARKS.md).
        set_default(&mut config, "fetch.queue.backoff.ms", "10");
        // New partitions of subscribed topics are noticed through metadata refreshes.
        set_default(&mut config, "topic.metadata.refresh.interval.ms", "5000");
        let consumer: BaseConsumer<Membership> =
            config.create_with_context(Membership::default()).context("cannot create the Kafka consumer")?;
        let queries: BaseConsumer = config.create().context("cannot create the Kafka consumer")?;
        let mut source = KafkaSource {
            consumer: Arc::new(consumer),
            queries,
            cursors: BTreeMap::new(),
            wake: Arc::new(Wake::default()),
            broker_timeout: job.broker_timeout,
            brokers: job.brokers.clone(),
            topics: job.topics.clone(),
            subscribed: BTreeSet::new(),
            missing: BTreeMap::new(),
            known_at_start: BTreeSet::new(),
            on_out_of_range: job.on_offset_out_of_range,
            faults: FaultLog::default(),
            state_topic,
            state_partitions: BTreeSet::new(),
            own_topics,
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
        source.known_at_start = partitions.iter().cloned().collect();
        source.subscribe(partitions.iter().map(|p| p.topic.clone()).collect())?;
        tracing::info!("joining consumer group {} for {}", job.group, source.topics_description());
        source.wait_for_assignment()?;
        Ok(source)
    }

    /// The partitions this member owns, in order.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.cursors.keys()
    }

    /// How many partitions the job's topics have now, whoever owns them.
    pub fn all_partitions(&self) -> Result<usize> {
        Ok(self.discover()?.len())
    }

    /// Every partition of the job's topics now, whoever owns them.
    pub fn all_input_partitions(&self) -> Result<Vec<TopicPartition>> {
        self.discover()
    }

    /// Serves the consumer's events (group protocol, errors) without fetching: called while the
    /// batch loop waits, so a long batch interval never looks like a dead member.
    pub fn keep_alive(&mut self) -> Result<()> {
        self.serve_events()
    }

    /// Whether the coordinator has announced an assignment change not yet applied.
    pub fn rebalance_pending(&mut self) -> Result<bool> {
        self.serve_events()?;
        Ok(self.consumer.context().has_changes())
    }

    /// Applies the assignment changes announced since the last boundary: revoked partitions
    /// are released (their last batch has committed by now), and newly assigned ones are
    /// started where `positions` says, given what the group has committed for them.
    pub fn rebalance(&mut self, positions: impl FnOnce(&[Assigned]) -> Result<Vec<i64>>) -> Result<Rebalanced> {
        self.serve_events()?;
        let mut rebalanced = Rebalanced::default();
        let mut newly: Vec<TopicPartition> = Vec::new();
        for change in self.consumer.context().take_changes() {
            match change {
                Change::Revoked { partitions, lost } => {
                    self.release(&partitions)?;
                    for partition in &partitions {
                        self.state_partitions.remove(partition);
                    }
                    newly.retain(|p| !partitions.contains(p));
                    if lost {
                        rebalanced.lost.extend(partitions.iter().cloned());
                    }
                    rebalanced.revoked.extend(partitions);
                }
                Change::Assigned(partitions) => {
                    if self.cooperative() {
                        // Acknowledged now; fetching starts once a position is chosen below.
                        self.consumer
                            .incremental_assign(&TopicPartitionList::new())
                            .context("cannot acknowledge a partition assignment")?;
                    }
                    newly.extend(partitions);
                }
            }
        }
        self.consumer.context().clear_lost();
        let state_topic = self.state_topic.as_deref();
        let (state, newly): (Vec<TopicPartition>, Vec<TopicPartition>) =
            newly.into_iter().partition(|p| Some(p.topic.as_str()) == state_topic);
        if !state.is_empty() {
            // Owned, never fetched by this consumer: assigned paused, at a position of its own
            // (no committed offset is looked up for them).
            let mut list = TopicPartitionList::new();
            for partition in &state {
                list.add_partition_offset(&partition.topic, partition.partition, Offset::Beginning)?;
            }
            if self.cooperative() {
                self.consumer.incremental_assign(&list).context("cannot assign state partitions")?;
            }
            self.state_partitions.extend(state.iter().cloned());
            if !self.cooperative() {
                self.assign_all()?;
            }
            self.consumer.pause(&list_of(&state)).context("cannot pause state partitions")?;
            rebalanced.assigned.extend(state);
        }
        if newly.is_empty() {
            return Ok(rebalanced);
        }
        let committed = self.committed(&newly)?;
        let mut assigned = Vec::with_capacity(newly.len());
        for partition in newly {
            let bounds = self.retry(&format!("read the log bounds of {partition}"), |consumer, timeout| {
                consumer.fetch_watermarks(&partition.topic, partition.partition, timeout)
            })?;
            assigned.push(Assigned {
                committed: committed.get(&partition).cloned(),
                created_since_start: !self.known_at_start.contains(&partition),
                bounds,
                partition,
            });
        }
        let chosen = positions(&assigned)?;
        let mut list = TopicPartitionList::new();
        for (assigned, offset) in assigned.iter().zip(chosen) {
            let partition = &assigned.partition;
            let mut queue = self
                .consumer
                .split_partition_queue(&partition.topic, partition.partition)
                .with_context(|| format!("cannot make a fetch queue for {partition}"))?;
            let wake = self.wake.clone();
            queue.set_nonempty_callback(move || wake.notify());
            self.cursors.insert(partition.clone(), Cursor { next: offset, queue, peeked: None });
            list.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(offset))?;
            rebalanced.assigned.push(partition.clone());
        }
        // The consumer fetches a partition only once it knows the partition's leader, and it
        // learns that from its own metadata: asked now, so its first fetch does not wait for
        // a lazy refresh (which took a second in the benchmarks).
        let topics: BTreeSet<&str> = assigned.iter().map(|a| a.partition.topic.as_str()).collect();
        for topic in topics {
            if let Err(error) = self.consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT) {
                tracing::debug!("metadata of {topic} not fetched ahead of assigning it: {error}");
            }
        }
        if self.cooperative() {
            self.consumer.incremental_assign(&list).context("cannot assign partitions")?;
        } else {
            self.assign_all()?;
        }
        Ok(rebalanced)
    }

    /// Picks up topics that started matching `--topic-pattern` (and drops those gone from
    /// several metadata answers in a row) by changing the subscription; new partitions of
    /// subscribed topics arrive through the group's rebalance.
    pub fn refresh_topics(&mut self) -> Result<()> {
        if !matches!(self.topics, Topics::Pattern(_)) {
            return Ok(());
        }
        let found: BTreeSet<String> = self.discover()?.into_iter().map(|p| p.topic).collect();
        let mut wanted = self.subscribed.clone();
        for topic in &self.subscribed {
            if found.contains(topic) {
                self.missing.remove(topic);
                continue;
            }
            let misses = self.missing.entry(topic.clone()).or_insert(0);
            *misses += 1;
            if *misses >= MISSING_ANSWERS_BEFORE_DROP {
                tracing::warn!(
                    "topic {topic} is gone from {} metadata answers in a row; no longer reading it",
                    *misses
                );
                wanted.remove(topic);
            }
        }
        let added: Vec<&String> = found.difference(&self.subscribed).collect();
        if !added.is_empty() {
            tracing::info!("discovered topics matching {}: {added:?}", self.topics_description());
        }
        wanted.extend(found.iter().cloned());
        if wanted != self.subscribed {
            self.missing.retain(|topic, _| wanted.contains(topic));
            self.subscribe(wanted)?;
        }
        Ok(())
    }

    /// Fixes this batch's range for every owned partition: from where the last batch ended up
    /// to the current high watermark (the last stable offset for `read_committed` consumers),
    /// capped per partition by `caps`, which gets each partition's lag in order. A position
    /// that fell out of the log (retention) is handled by `--on-offset-out-of-range` first.
    pub fn plan(&mut self, caps: impl FnOnce(&[i64]) -> Option<Vec<i64>>) -> Result<Vec<PlannedRange>> {
        let lows = self.list_offsets("list the log start offsets", Offset::Beginning)?;
        let highs = self.list_offsets("list the high watermarks", Offset::End)?;
        let mut positions = Vec::with_capacity(self.cursors.len());
        let mut moves = Vec::new();
        for (partition, cursor) in &self.cursors {
            let (Some(&low), Some(&high)) = (lows.get(partition), highs.get(partition)) else {
                bail!("the broker returned no log bounds for {partition}");
            };
            let mut next = cursor.next;
            if let Some(moved) = check_in_log(partition, next, (low, high), self.on_out_of_range)? {
                tracing::warn!("{partition}: {moved} (--on-offset-out-of-range)");
                moves.push((partition.clone(), moved.to));
                next = moved.to;
            }
            positions.push((partition.clone(), next, high));
        }
        for (partition, offset) in moves {
            self.seek(&partition, offset)?;
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

    /// Moves a partition's position, e.g. to replay a planned batch from its start.
    pub fn seek(&mut self, partition: &TopicPartition, offset: i64) -> Result<()> {
        let cursor = self.cursors.get_mut(partition).with_context(|| format!("{partition} is not assigned"))?;
        if cursor.next == offset && cursor.peeked.as_ref().is_none_or(|peeked| peeked.offset >= offset) {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        retry_until(self.broker_timeout, &format!("move {partition} to offset {offset}"), &self.brokers, |timeout| {
            consumer.seek(&partition.topic, partition.partition, Offset::Offset(offset), timeout)
        })?;
        let cursor = self.cursors.get_mut(partition).expect("checked above");
        cursor.next = offset;
        cursor.peeked = None;
        Ok(())
    }

    /// Reads the records of each range, in offset order, up to `bounds` per range. On success
    /// the cursors move to where each range actually ended.
    pub fn fetch(&mut self, ranges: &[OffsetRange], bounds: TaskBounds) -> Result<Fetched> {
        let mut tasks: Vec<Task> = Vec::with_capacity(ranges.len());
        for range in ranges {
            let cursor = self.cursors.get_mut(&range.partition).context("range for an unassigned partition")?;
            let mut task = Task { reached: range.from, until: range.until, records: Vec::new(), bytes: 0 };
            if let Some(peeked) = cursor.peeked.take() {
                // The record that closed the previous range opens this one (or lies past it).
                task.offer(peeked, bounds, &mut cursor.peeked);
            }
            tasks.push(task);
        }
        let mut pending = tasks.iter().filter(|task| task.open()).count();
        let mut last_progress = Instant::now();
        let mut positions = self.positions()?;
        while pending > 0 {
            let mut progressed = false;
            for (range, task) in ranges.iter().zip(&mut tasks) {
                if !task.open() {
                    continue;
                }
                let cursor = self.cursors.get_mut(&range.partition).expect("checked above");
                let _work = crate::panics::working_on(|| format!("fetching {}", range.partition));
                while task.open() {
                    let Some(result) = cursor.queue.poll(Duration::ZERO) else { break };
                    progressed = true;
                    match result {
                        Ok(message) => {
                            let record = SourceRecord::read(&message);
                            task.offer(record, bounds, &mut cursor.peeked);
                        }
                        Err(error) => self.faults.observe(&range.partition, error)?,
                    }
                }
                if !task.open() {
                    pending -= 1;
                }
            }
            if pending == 0 {
                break;
            }
            self.serve_events()?;
            // librdkafka stops fetching partitions whose assignment it lost; waiting for them
            // would wait for ever, and the batch could not commit them anyway.
            let lost = self.consumer.context().lost_among(ranges.iter().map(|range| &range.partition));
            if !lost.is_empty() {
                return Err(Lost { partitions: join(&lost) }.into());
            }
            if progressed {
                last_progress = Instant::now();
                continue;
            }
            // During a cooperative rebalance librdkafka pauses every fetcher until the
            // announced change is applied, which happens at the batch boundary: waiting for more
            // records would wait until --broker-timeout. The batch ends with what it has read
            // (like a task at its bounds); the rest follows in the next batch, on this member
            // or on the partition's new owner.
            if self.consumer.context().has_changes() {
                for task in tasks.iter_mut().filter(|task| task.open()) {
                    task.until = task.reached;
                }
                tracing::info!("the group is rebalancing: batch ends with the records read so far");
                break;
            }
            // Offsets inside a range may hold no record (transaction markers, compaction);
            // the consumer's position tells when a range is exhausted.
            let now = self.positions()?;
            for (range, task) in ranges.iter().zip(&mut tasks) {
                if let Some(&position) = now.get(&range.partition)
                    && task.open()
                    && position >= task.until
                {
                    task.reached = task.until;
                    pending -= 1;
                }
            }
            if now != positions {
                positions = now;
                last_progress = Instant::now();
            }
            if pending > 0 && last_progress.elapsed() > self.broker_timeout {
                let stuck: Vec<String> = ranges
                    .iter()
                    .zip(&tasks)
                    .filter(|(_, task)| task.open())
                    .map(|(range, task)| format!("{} at {} of {}", range.partition, task.reached, task.until))
                    .collect();
                bail!(
                    "no progress fetching records from {} for {} (--broker-timeout): {}{}",
                    self.brokers,
                    humantime::format_duration(self.broker_timeout),
                    stuck.join(", "),
                    self.faults.last().map(|e| format!("; last broker error: {e}")).unwrap_or_default()
                );
            }
            self.wake.wait(IDLE_WAIT);
        }
        self.faults.recovered();
        let mut fetched = Fetched { records: Vec::with_capacity(tasks.len()), ends: Vec::with_capacity(tasks.len()) };
        for (range, task) in ranges.iter().zip(tasks) {
            self.cursors.get_mut(&range.partition).expect("checked above").next = task.until;
            fetched.ends.push(task.until);
            fetched.records.push(task.records);
        }
        Ok(fetched)
    }

    /// Commits the ranges' ends to the consumer group with `metadata` per partition,
    /// synchronously. Transient failures are retried until `--broker-timeout`. A refusal because
    /// the group is rebalancing is retried while the rebalance runs (the consumer is served
    /// meanwhile, so it rejoins), unless the rebalance took the partitions away (or the member
    /// cannot get back into the group within `--broker-timeout`): then the commit is
    /// [`CommitError::Fenced`]. Nothing to commit (a member that owns no partitions) is done.
    pub fn commit(
        &mut self,
        ends: &[(TopicPartition, i64)],
        metadata: impl Fn(&TopicPartition) -> CommitMetadata,
    ) -> Result<(), CommitError> {
        if ends.is_empty() {
            return Ok(());
        }
        let lost = self.consumer.context().lost_among(ends.iter().map(|(partition, _)| partition));
        if !lost.is_empty() {
            return Err(CommitError::Fenced {
                partitions: join(&lost),
                cause: "this member's session expired and the partitions were reassigned".into(),
            });
        }
        let offsets = offset_list(ends, metadata)?;
        let started = Instant::now();
        let deadline = started + self.broker_timeout;
        let mut attempt = 1;
        let all = || ends.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        loop {
            match self.consumer.commit(&offsets, CommitMode::Sync) {
                Ok(()) => return Ok(()),
                Err(error) if is_replaced(&error) => {
                    return Err(CommitError::Fenced { partitions: join(&all()), cause: error.to_string() });
                }
                Err(error) if is_generation_change(&error) => {
                    self.serve_events().map_err(CommitError::Failed)?;
                    let lost = self.consumer.context().lost_among(ends.iter().map(|(partition, _)| partition));
                    if !lost.is_empty() {
                        return Err(CommitError::Fenced { partitions: join(&lost), cause: error.to_string() });
                    }
                    if Instant::now() > deadline {
                        let cause = format!(
                            "{error}, and this member was not back in the group within {}",
                            humantime::format_duration(self.broker_timeout)
                        );
                        return Err(CommitError::Fenced { partitions: join(&all()), cause });
                    }
                    tracing::debug!(
                        "commit refused during a rebalance ({error}); retrying once the member has rejoined"
                    );
                    std::thread::sleep(RETRY_BACKOFF);
                }
                Err(error) if Instant::now() < deadline => {
                    let described: Vec<String> = ends.iter().map(|(p, end)| format!("{p}={end}")).collect();
                    tracing::warn!(
                        "cannot commit offsets {} (attempt {attempt}): {error}; retrying",
                        described.join(", ")
                    );
                    attempt += 1;
                    // A rebalance in progress is finished by the consumer's own polling.
                    self.serve_events().map_err(CommitError::Failed)?;
                    std::thread::sleep(RETRY_BACKOFF);
                }
                Err(error) => {
                    return Err(CommitError::Failed(anyhow::Error::from(error).context(format!(
                        "cannot commit offsets to Kafka at {}: gave up after {} and {attempt} attempts",
                        self.brokers,
                        humantime::format_duration(self.broker_timeout)
                    ))));
                }
            }
        }
    }

    /// The group's member metadata, for offsets sent in a Kafka transaction.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// What the group has committed for `partitions`.
    pub fn committed(&self, partitions: &[TopicPartition]) -> Result<BTreeMap<TopicPartition, Committed>> {
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
                Offset::Offset(offset) => Some((
                    TopicPartition::new(element.topic(), element.partition()),
                    Committed { offset, metadata: CommitMetadata::decode(element.metadata()) },
                )),
                _ => None,
            })
            .collect())
    }

    /// Ends every partition queue of `partitions` and hands them back to the group.
    fn release(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        for partition in partitions {
            self.cursors.remove(partition);
        }
        if self.cooperative() {
            self.consumer.incremental_unassign(&list_of(partitions)).context("cannot release revoked partitions")
        } else {
            // The eager protocol revokes everything before each new assignment.
            self.cursors.clear();
            self.state_partitions.clear();
            self.consumer.unassign().context("cannot release revoked partitions")
        }
    }

    /// The eager protocol assigns the whole set every time.
    fn assign_all(&self) -> Result<()> {
        let mut list = TopicPartitionList::new();
        for (partition, cursor) in &self.cursors {
            list.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(cursor.next))?;
        }
        for partition in &self.state_partitions {
            list.add_partition_offset(&partition.topic, partition.partition, Offset::Beginning)?;
        }
        self.consumer.assign(&list).context("cannot assign partitions")?;
        if !self.state_partitions.is_empty() {
            let state: Vec<TopicPartition> = self.state_partitions.iter().cloned().collect();
            self.consumer.pause(&list_of(&state)).context("cannot pause state partitions")?;
        }
        Ok(())
    }

    fn cooperative(&self) -> bool {
        matches!(self.consumer.rebalance_protocol(), rdkafka::consumer::RebalanceProtocol::Cooperative)
    }

    fn subscribe(&mut self, topics: BTreeSet<String>) -> Result<()> {
        if topics.is_empty() {
            self.consumer.unsubscribe();
        } else {
            let names: Vec<&str> = topics.iter().map(String::as_str).chain(self.state_topic.as_deref()).collect();
            self.consumer.subscribe(&names).context("cannot subscribe to the job's topics")?;
        }
        self.subscribed = topics;
        Ok(())
    }

    /// Polls until the coordinator has answered the join (an assignment, possibly empty).
    fn wait_for_assignment(&mut self) -> Result<()> {
        if self.subscribed.is_empty() {
            return Ok(());
        }
        // A join completes when every member has rejoined, and a member busy committing when
        // the rebalance began rejoins only once its commit is done or given up, after up to
        // --broker-timeout (docs/adr/0007): the first assignment may take twice that.
        let wait = self.broker_timeout * 2;
        let deadline = Instant::now() + wait;
        while !self.consumer.context().has_changes() {
            if Instant::now() > deadline {
                bail!(
                    "the consumer group coordinator at {} did not assign partitions within {} (twice \
                     --broker-timeout){}",
                    self.brokers,
                    humantime::format_duration(wait),
                    self.faults.last().map(|e| format!("; last broker error: {e}")).unwrap_or_default()
                );
            }
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Err(error)) => self.faults.observe_client(error)?,
                Some(Ok(message)) => {
                    tracing::debug!("unexpected record from {} on the main queue", message.topic());
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Serves the main queue: group protocol events (recorded by [`Membership`]) and client
    /// errors (logged if transient, returned if not).
    fn serve_events(&mut self) -> Result<()> {
        loop {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    // Every assigned partition has its own queue; this is a leftover from
                    // before a queue was split off, and the partition queue sees it again.
                    tracing::debug!("record of {}:{} on the main queue", message.topic(), message.partition());
                }
                Some(Err(error)) => self.faults.observe_client(error)?,
            }
        }
        // The query client is never assigned, but errors and logs still queue up on it.
        while let Some(result) = self.queries.poll(Duration::ZERO) {
            if let Err(error) = result {
                tracing::debug!("offset queries: {error}");
            }
        }
        Ok(())
    }

    fn positions(&self) -> Result<BTreeMap<TopicPartition, i64>> {
        let positions = self.consumer.position().context("cannot read consumer positions")?;
        Ok(positions
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some((TopicPartition::new(e.topic(), e.partition()), offset)),
                _ => None,
            })
            .collect())
    }

    /// The offsets the broker reports for every owned partition at `which` (start or end).
    fn list_offsets(&self, what: &str, which: Offset) -> Result<BTreeMap<TopicPartition, i64>> {
        if self.cursors.is_empty() {
            return Ok(BTreeMap::new());
        }
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

    /// Every partition of the job's topics the brokers know now, in order. A topic whose
    /// metadata carries an error is left out of this answer (see [`Self::refresh_topics`]).
    fn discover(&self) -> Result<Vec<TopicPartition>> {
        let metadata =
            self.retry("fetch topic metadata", |consumer, timeout| consumer.fetch_metadata(None, timeout))?;
        let mut partitions = Vec::new();
        for topic in metadata.topics() {
            if self.own_topics.iter().any(|own| own == topic.name()) {
                continue;
            }
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

    /// Runs a request on the query client until it succeeds or `--broker-timeout` has passed.
    fn retry<T>(
        &self,
        what: &str,
        mut request: impl FnMut(&BaseConsumer, Duration) -> Result<T, KafkaError>,
    ) -> Result<T> {
        retry_until(self.broker_timeout, what, &self.brokers, |timeout| request(&self.queries, timeout))
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // Closing leaves the group (the coordinator reassigns at once rather than after the
        // session timeout); it waits for the final revocation, applied at once from now on,
        // and for any change still waiting for a boundary, acknowledged here. Partition queues
        // hold the consumer, so they go first.
        self.consumer.context().close();
        self.cursors.clear();
        for change in self.consumer.context().take_changes() {
            let cooperative = self.cooperative();
            let acknowledged = match change {
                Change::Assigned(partitions) if cooperative => self.consumer.incremental_assign(&list_of(&partitions)),
                Change::Revoked { partitions, .. } if cooperative => {
                    self.consumer.incremental_unassign(&list_of(&partitions))
                }
                Change::Assigned(partitions) => self.consumer.assign(&list_of(&partitions)),
                Change::Revoked { .. } => self.consumer.unassign(),
            };
            if let Err(error) = acknowledged {
                tracing::debug!("while leaving the group: {error}");
            }
        }
        // librdkafka's close can wait for good when it meets a cooperative rebalance in
        // progress (librdkafka #4527, fixed after the 2.12 this job links), and rdkafka's drop
        // waits for the close without a bound. Close here, within a bound; past it, the client
        // is left to the process exit and the coordinator drops this member after its session
        // timeout, as if it had died.
        let deadline = Instant::now() + LEAVE_TIMEOUT;
        let mut closed = self.consumer.close_queue().is_ok();
        while closed && !self.consumer.closed() {
            if Instant::now() > deadline {
                closed = false;
                break;
            }
            let _ = self.consumer.poll(Duration::from_millis(100));
        }
        if !closed {
            tracing::warn!(
                "leaving the consumer group did not finish within {}; the group drops this member after its \
                 session timeout",
                humantime::format_duration(LEAVE_TIMEOUT)
            );
            std::mem::forget(Arc::clone(&self.consumer));
        }
    }
}

/// How long a stopping job waits for its consumer to leave the group.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// `ends` as a librdkafka offset list, each with its commit `metadata`.
pub fn offset_list(
    ends: &[(TopicPartition, i64)],
    metadata: impl Fn(&TopicPartition) -> CommitMetadata,
) -> Result<TopicPartitionList> {
    let mut offsets = TopicPartitionList::new();
    for (partition, end) in ends {
        let mut element = offsets.add_partition(&partition.topic, partition.partition);
        element.set_offset(Offset::Offset(*end)).with_context(|| format!("offset {end} of {partition}"))?;
        element.set_metadata(metadata(partition).encode());
    }
    Ok(offsets)
}

/// Runs a broker request until it succeeds or `timeout` has passed, logging each failure, so a
/// broker that is briefly away does not stop the job.
pub fn retry_until<T>(
    timeout: Duration,
    what: &str,
    brokers: &str,
    mut request: impl FnMut(Duration) -> Result<T, KafkaError>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut attempt = 1;
    loop {
        // Several attempts fit in the timeout, each logged, so an outage is visible early.
        let limit = REQUEST_TIMEOUT.min(timeout / 4).max(RETRY_BACKOFF);
        match request(limit) {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() < deadline => {
                tracing::warn!("cannot {what} from {brokers} (attempt {attempt}): {error}; retrying");
                attempt += 1;
                std::thread::sleep(RETRY_BACKOFF.min(deadline.saturating_duration_since(Instant::now())));
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "cannot {what} from Kafka at {brokers}: gave up after {} and {attempt} attempts",
                        humantime::format_duration(timeout)
                    )
                });
            }
        }
    }
}

/// One range being fetched.
struct Task {
    /// The next offset this task expects.
    reached: i64,
    /// Where the task ends: the range's end, or earlier once it reached its bounds.
    until: i64,
    records: Vec<SourceRecord>,
    bytes: usize,
}

impl Task {
    fn open(&self) -> bool {
        self.reached < self.until
    }

    /// Takes `record` if it belongs to the task and fits its bounds; a record past the end
    /// (or one that does not fit) is kept in `peeked` for the next batch.
    fn offer(&mut self, record: SourceRecord, bounds: TaskBounds, peeked: &mut Option<SourceRecord>) {
        if record.offset < self.reached {
            return; // already taken: a re-delivery after a seek
        }
        if record.offset >= self.until {
            self.reached = self.until;
            *peeked = Some(record);
            return;
        }
        let size = record.size();
        let full = self.records.len() >= bounds.max_records
            || (!self.records.is_empty() && self.bytes.saturating_add(size) > bounds.max_bytes);
        if full {
            // The task ends before this record; the next batch starts with it.
            self.until = record.offset;
            self.reached = record.offset;
            *peeked = Some(record);
            return;
        }
        self.reached = record.offset + 1;
        self.bytes += size;
        self.records.push(record);
    }
}

/// Wakes the fetch loop when a partition queue gets records.
#[derive(Default)]
struct Wake {
    ready: Mutex<bool>,
    signal: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.ready.lock().expect("not poisoned") = true;
        self.signal.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let ready = self.ready.lock().expect("not poisoned");
        let (mut ready, _) = self.signal.wait_timeout_while(ready, timeout, |ready| !*ready).expect("not poisoned");
        *ready = false;
    }
}

/// Broker errors seen while fetching: transient ones are logged (each kind at most every few
/// seconds while it lasts) and waited out; others end the fetch.
#[derive(Default)]
struct FaultLog {
    last: Option<String>,
    logged: BTreeMap<String, Instant>,
    since: Option<Instant>,
}

impl FaultLog {
    fn observe(&mut self, partition: &TopicPartition, error: KafkaError) -> Result<()> {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
        ) {
            bail!(
                "{partition}: the fetch position is no longer in the log (retention removed it while the batch \
                 was reading): {error}; the next run plans from the log's bounds per --on-offset-out-of-range"
            );
        }
        self.note(format!("{partition}: {error}"), &error)
    }

    fn observe_client(&mut self, error: KafkaError) -> Result<()> {
        self.note(error.to_string(), &error)
    }

    fn note(&mut self, text: String, error: &KafkaError) -> Result<()> {
        if !is_transient(error) {
            bail!("Kafka client error: {text}");
        }
        self.since.get_or_insert_with(Instant::now);
        let kind = format!("{:?}", error.rdkafka_error_code());
        let due = self.logged.get(&kind).is_none_or(|at| at.elapsed() >= FAULT_LOG_INTERVAL);
        if due {
            tracing::warn!("broker trouble, waiting for librdkafka to recover: {text}");
            self.logged.insert(kind, Instant::now());
        }
        self.last = Some(text);
        Ok(())
    }

    fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                "fetching again after {} of broker trouble",
                humantime::format_duration(round(since.elapsed()))
            );
            self.logged.clear();
            self.last = None;
        }
    }
}

fn round(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

fn list_of(partitions: &[TopicPartition]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        list.add_partition(&partition.topic, partition.partition);
    }
    list
}

pub fn join(partitions: &[TopicPartition]) -> String {
    partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, bytes: usize) -> SourceRecord {
        SourceRecord { offset, timestamp: None, key: None, value: Some(vec![0; bytes]), headers: Vec::new() }
    }

    #[test]
    fn a_task_takes_its_range_and_keeps_the_next_record() {
        let bounds = TaskBounds { max_records: 100, max_bytes: 1 << 20 };
        let mut task = Task { reached: 5, until: 8, records: Vec::new(), bytes: 0 };
        let mut peeked = None;
        for offset in [4, 5, 6, 7, 8] {
            task.offer(record(offset, 10), bounds, &mut peeked);
        }
        assert_eq!(task.records.iter().map(|r| r.offset).collect::<Vec<_>>(), [5, 6, 7]);
        assert!(!task.open());
        assert_eq!(peeked.map(|r| r.offset), Some(8));
    }

    #[test]
    fn a_task_ends_early_at_its_bounds_leaving_the_rest() {
        let mut peeked = None;
        let by_count = TaskBounds { max_records: 2, max_bytes: 1 << 20 };
        let mut task = Task { reached: 0, until: 10, records: Vec::new(), bytes: 0 };
        for offset in 0..3 {
            task.offer(record(offset, 10), by_count, &mut peeked);
        }
        assert_eq!((task.records.len(), task.until), (2, 2));
        assert_eq!(peeked.take().map(|r| r.offset), Some(2));

        // By bytes: a record that would overflow waits, but a task always takes one record.
        let by_bytes = TaskBounds { max_records: 100, max_bytes: 1000 };
        let mut task = Task { reached: 0, until: 10, records: Vec::new(), bytes: 0 };
        task.offer(record(0, 5000), by_bytes, &mut peeked);
        task.offer(record(1, 10), by_bytes, &mut peeked);
        assert_eq!((task.records.len(), task.until), (1, 1));
        assert_eq!(peeked.map(|r| r.offset), Some(1));
    }

    #[test]
    fn commit_metadata_round_trips_and_ignores_other_tools() {
        let metadata = CommitMetadata {
            batch: 1000,
            start: Some(42),
            member: "a".into(),
            build: "0123".into(),
            local_state: false,
        };
        assert_eq!(CommitMetadata::decode(&metadata.encode()), Some(metadata));
        assert_eq!(CommitMetadata::decode(""), None);
        assert_eq!(CommitMetadata::decode("{\"batch\":1}"), None);
    }
}
