//! Keyed state shared across hosts (`--shared-state`): each host's batch writes the keyed
//! values of its input partitions to the job's shuffle topic (stage 1); the member owning
//! shuffle partition `s` applies it to state partition `s` exactly once and writes the
//! changes to changelog partition `s` (stage 2); a member newly given `s` restores it from
//! there. A host running the job alone keeps the in-process shuffle and publishes its state
//! when a group change comes. docs/adr/0009 has the protocol and every crash point.

mod chain;
mod records;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub use chain::{Resolved, Shuffled};
pub use records::StageRecord;
use records::{ChangelogEntry, ShuffleEntry, SourceRange};

use crate::checkpoint::{
    BatchChanges, Checkpoint, PartitionMeta, PartitionWrite, StateWrite, StoredState, state_partition,
};
use crate::config::JobConfig;
use crate::observe::progress::Progress;
use crate::offsets::{OffsetRange, TopicPartition};
use crate::runtime::KeyedValue;
use crate::sinks::KafkaSink;
use crate::source::{Committed, SourceRecord, retry_until};

/// A state partition waiting this long for a committed batch's values is warned about.
const WAITING_WARNING: Duration = Duration::from_secs(10);
/// How long one poll of the state reader waits for records.
const READ_POLL: Duration = Duration::from_millis(100);

/// The job's shuffle topic: keyed values on their way to their state partition.
pub fn shuffle_topic(group: &str) -> String {
    format!("{group}-shuffle")
}

/// The job's changelog topic: every state partition's changes, compacted.
pub fn changelog_topic(group: &str) -> String {
    format!("{group}-changelog")
}

/// The partition count of the job's shuffle topic, if it exists: the number of state
/// partitions a new checkpoint of the job takes.
pub fn existing_state_partitions(job: &JobConfig) -> Result<Option<u32>> {
    let probe: BaseConsumer = job.kafka_client_config().create().context("cannot create a Kafka client")?;
    Ok(partition_counts(job, &probe)?.get(&shuffle_topic(&job.group)).copied())
}

/// Every topic the brokers know, with its partition count.
fn partition_counts(job: &JobConfig, probe: &BaseConsumer) -> Result<BTreeMap<String, u32>> {
    let metadata = retry_until(job.broker_timeout, "fetch topic metadata", &job.brokers, |timeout| {
        probe.fetch_metadata(None, timeout)
    })?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| (topic.name().to_string(), topic.partitions().len() as u32))
        .collect())
}

/// Makes sure the job's shuffle and changelog topics exist with one partition per state
/// partition, creating them through the Admin API where the brokers allow it (the changelog
/// compacted); otherwise refuses, naming the topics, the count and a command that creates them.
pub fn prepare_topics(job: &JobConfig, partitions: u32) -> Result<()> {
    let config = job.kafka_client_config();
    let probe: BaseConsumer = config.create().context("cannot create a Kafka client")?;
    let (shuffle, changelog) = (shuffle_topic(&job.group), changelog_topic(&job.group));
    let mut existing = partition_counts(job, &probe)?;
    let missing: Vec<&String> = [&shuffle, &changelog].into_iter().filter(|t| !existing.contains_key(*t)).collect();
    if !missing.is_empty() {
        let count = partitions;
        create_topics(&config, &missing, count, &changelog).map_err(|error| {
            let wanted: Vec<String> = missing.iter().map(|topic| format!("{topic}:{count}")).collect();
            error.context(format!(
                "--shared-state needs topic(s) {} with {count} partitions each ({changelog} compacted), and the \
                 brokers at {} did not create them; create them first (kafka-topics.sh --create, or on the \
                 development broker `host dev-broker{}`)",
                missing.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" and "),
                job.brokers,
                wanted.iter().map(|w| format!(" --topic {w}")).collect::<String>()
            ))
        })?;
        let deadline = Instant::now() + job.broker_timeout;
        while missing.iter().any(|topic| !existing.contains_key(*topic)) {
            if Instant::now() > deadline {
                bail!("topics {missing:?} were created but do not appear in the brokers' metadata");
            }
            std::thread::sleep(Duration::from_millis(100));
            existing = partition_counts(job, &probe)?;
        }
        tracing::info!(
            "created {} with {count} partitions",
            missing.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" and ")
        );
    }
    for topic in [&shuffle, &changelog] {
        let count = existing[topic];
        if count != partitions {
            bail!(
                "topic `{topic}` has {count} partitions, and the job's checkpoint has {partitions} state partitions: \
                 the shuffle and changelog topics need one partition per state partition (recreate the topic with \
                 {partitions} partitions, or start from a checkpoint made for {count})"
            );
        }
    }
    Ok(())
}

fn create_topics(config: &ClientConfig, topics: &[&String], partitions: u32, changelog: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.create().context("cannot create a Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| {
            let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1));
            if topic.as_str() == changelog { new.set("cleanup.policy", "compact") } else { new }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = futures::executor::block_on(admin.create_topics(&new, &options))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("cannot create topic `{topic}`: {code}"),
        }
    }
    Ok(())
}

/// The end offset of each of `partitions` of `group`'s changelog (for `host checkpoint
/// inspect`).
pub fn changelog_ends(brokers: &str, group: &str, partitions: impl Iterator<Item = u32>) -> Result<BTreeMap<u32, i64>> {
    let client: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("cannot create a Kafka client")?;
    let partitions: Vec<u32> = partitions.collect();
    list_offsets(&client, &changelog_topic(group), &partitions, Offset::End, Duration::from_secs(10), brokers)
}

/// `which` offset (log start or end) of each of `topic`'s `partitions`, retried until
/// `timeout`.
fn list_offsets(
    client: &BaseConsumer,
    topic: &str,
    partitions: &[u32],
    which: Offset,
    timeout: Duration,
    brokers: &str,
) -> Result<BTreeMap<u32, i64>> {
    if partitions.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut query = TopicPartitionList::new();
    for &partition in partitions {
        query.add_partition_offset(topic, partition as i32, which)?;
    }
    let answer = retry_until(timeout, &format!("list the offsets of {topic}"), brokers, |timeout| {
        client.offsets_for_times(query.clone(), timeout)
    })?;
    let mut offsets = BTreeMap::new();
    for element in answer.elements() {
        if let Offset::Offset(offset) = element.offset() {
            offsets.insert(element.partition() as u32, offset);
        }
    }
    if let Some(partition) = partitions.iter().find(|partition| !offsets.contains_key(partition)) {
        bail!("the brokers returned no offsets for {topic}:{partition}");
    }
    Ok(offsets)
}

/// This host's side of the job's shared state.
pub struct SharedState {
    shuffle: String,
    changelog: String,
    partitions: u32,
    /// Reads shuffle and changelog partitions by explicit assignment (no group).
    reader: BaseConsumer,
    /// State partitions this member owns: its shuffle partitions in the job's group.
    owned: BTreeSet<u32>,
    /// Each state partition's meta as of the last batch processed (committed or not).
    metas: BTreeMap<u32, PartitionMeta>,
    /// Each state partition's meta as the checkpoint holds it.
    committed: BTreeMap<u32, PartitionMeta>,
    member: String,
    broker_timeout: Duration,
    brokers: String,
    /// Since when each state partition waits for a committed batch's values (warned about
    /// when it lasts).
    waiting_since: BTreeMap<u32, Instant>,
    /// A windowed job: every batch goes through the shuffle, and stage 2 needs the group's
    /// commits each batch (they move the watermark).
    windowed: bool,
}

/// What stage 2 read for a batch.
pub struct StageTwo {
    /// Per owned state partition: what its shuffle records resolve to.
    pub resolved: BTreeMap<u32, Resolved>,
    /// Whether no owned shuffle partition had anything left to read.
    pub drained: bool,
}

impl SharedState {
    pub fn connect(job: &JobConfig, partitions: u32, checkpoint: &Checkpoint, windowed: bool) -> Result<SharedState> {
        let mut config = job.kafka_client_config();
        config
            .set("group.id", format!("{}-state-reader", job.group))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        // The reader reads to a known end and stops: a fetch never waits for more.
        config.set("fetch.wait.max.ms", "10").set("fetch.queue.backoff.ms", "10");
        let reader: BaseConsumer = config.create().context("cannot create the state reader")?;
        // Fetching starts only once the client knows the partitions' leaders: asked now, not
        // lazily on the first read.
        for topic in [shuffle_topic(&job.group), changelog_topic(&job.group)] {
            retry_until(job.broker_timeout, &format!("fetch the metadata of {topic}"), &job.brokers, |timeout| {
                reader.fetch_metadata(Some(&topic), timeout)
            })?;
        }
        let metas = checkpoint.partition_metas()?;
        Ok(SharedState {
            shuffle: shuffle_topic(&job.group),
            changelog: changelog_topic(&job.group),
            partitions,
            reader,
            owned: BTreeSet::new(),
            committed: metas.clone(),
            metas,
            member: job.instance_id.clone(),
            broker_timeout: job.broker_timeout,
            brokers: job.brokers.clone(),
            waiting_since: BTreeMap::new(),
            windowed,
        })
    }

    pub fn shuffle_topic(&self) -> &str {
        &self.shuffle
    }

    pub fn owned(&self) -> &BTreeSet<u32> {
        &self.owned
    }

    /// Whether this member owns every state partition.
    pub fn owns_all(&self) -> bool {
        self.owned.len() as u32 == self.partitions
    }

    /// Takes state partition `partition` on: restores its changes since this copy's last
    /// marker from the changelog, unless this copy is newer than the changelog (a host that
    /// ran alone and has not published yet).
    pub fn take(&mut self, partition: u32, checkpoint: &Checkpoint) -> Result<()> {
        self.owned.insert(partition);
        let meta = self.metas.get(&partition).cloned().unwrap_or_default();
        if meta.dirty {
            tracing::info!(
                "state partition {partition}: keeping this host's copy, which is newer than the changelog; it is \
                 published before the partition is shared"
            );
            return Ok(());
        }
        let started = Instant::now();
        let low = self.bounds(&self.changelog.clone(), &[partition], Offset::Beginning)?[&partition];
        if low > meta.changelog {
            bail!(
                "changelog partition {}:{partition} starts at offset {low}, and this host's copy of state partition \
                 {partition} continues from {}: changes it needs were deleted, so a restore would be incomplete. The \
                 changelog must be compacted (cleanup.policy=compact), never trimmed by retention",
                self.changelog,
                meta.changelog
            );
        }
        let (records, _) =
            self.read(&self.changelog.clone(), &[(partition, meta.changelog)])?.remove(&partition).unwrap_or_default();
        let mut meta = meta;
        let (mut batch, mut keys, mut batches) = (Vec::new(), 0usize, 0usize);
        let mut pending: Vec<(String, PartitionWrite)> = Vec::new();
        let mut progress = Progress::start(format!("restoring state partition {partition}"), "records");
        let mut since_marker = 0;
        for (index, record) in records.iter().enumerate() {
            since_marker += 1;
            match ChangelogEntry::read(record.offset, record.key.as_deref(), record.value.as_deref(), &record.headers)
                .with_context(|| format!("changelog partition {partition}"))?
            {
                ChangelogEntry::State { writer, key, state } => {
                    let stored = state.map(|(touched, schema, bytes)| StoredState { touched, schema, bytes });
                    pending.push((writer, PartitionWrite::State { key, stored }));
                }
                ChangelogEntry::Pane { writer, key, time, pane } => {
                    pending.push((writer, PartitionWrite::Pane { key, time, pane }));
                }
                ChangelogEntry::Window { writer, key, result } => {
                    pending.push((writer, PartitionWrite::Window { key, result }));
                }
                ChangelogEntry::Marker { writer, meta: marked } => {
                    // A batch's changes count only with its marker; anything else before it
                    // was written by an attempt that did not finish.
                    batch.extend(pending.drain(..).filter(|(w, _)| *w == writer).map(|(_, write)| write));
                    meta = PartitionMeta { changelog: record.offset + 1, dirty: false, ..marked };
                    keys += batch.len();
                    batches += 1;
                    checkpoint.restore_partition(partition, &batch, &meta)?;
                    self.committed.insert(partition, meta.clone());
                    batch.clear();
                    progress.advance(std::mem::take(&mut since_marker), (records.len() - index - 1) as u64);
                }
            }
        }
        self.metas.insert(partition, meta);
        progress.finish();
        if !records.is_empty() {
            let took = started.elapsed();
            tracing::info!(
                "restored state partition {partition} from {}: {keys} key changes of {batches} batches ({} records) \
                 in {:.2} s, {:.0} records/s",
                self.changelog,
                records.len(),
                took.as_secs_f64(),
                records.len() as f64 / took.as_secs_f64().max(1e-6)
            );
        }
        Ok(())
    }

    /// Gives state partition `partition` up (another member owns it now); its local copy and
    /// meta stay, so getting it back restores only what changed meanwhile.
    pub fn release(&mut self, partition: u32) {
        self.owned.remove(&partition);
    }

    /// Publishes every owned state partition whose local copy is newer than its changelog
    /// (changed by batches run alone): all its keys, then a marker. Returns whether there was
    /// any.
    pub fn publish_dirty(&mut self, checkpoint: &Checkpoint, sink: &mut KafkaSink) -> Result<bool> {
        let dirty: Vec<u32> =
            self.owned.iter().copied().filter(|p| self.metas.get(p).is_some_and(|m| m.dirty)).collect();
        if dirty.is_empty() {
            return Ok(false);
        }
        let started = Instant::now();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let writer = format!("{}@snapshot-{}", self.member, now.as_millis());
        let mut records = Vec::new();
        let mut metas = Vec::new();
        for &partition in &dirty {
            for (key, stored) in checkpoint.partition_state(partition, self.partitions)? {
                let state = Some((stored.touched, stored.schema, stored.bytes));
                records.push(StageRecord::state(&self.changelog, partition, &writer, key, state));
            }
            let meta = PartitionMeta { dirty: false, ..self.metas[&partition].clone() };
            records.push(StageRecord::marker(&self.changelog, partition, &writer, &meta));
            metas.push((partition, meta));
        }
        send(sink, &records, "publish state partitions to the changelog")?;
        let ends = self.ends(&self.changelog.clone(), &dirty)?;
        for (partition, meta) in &mut metas {
            meta.changelog = ends[partition];
        }
        checkpoint.set_partition_metas(&metas)?;
        self.committed(&metas);
        tracing::info!(
            "published state partitions {dirty:?} to {} ({} records in {:.2} s): the state this host kept alone can \
             move to other hosts",
            self.changelog,
            records.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(true)
    }

    /// Stage 2's input: the owned shuffle partitions' records from where each was resolved
    /// to, against the group's commits of the input partitions.
    /// `commits` gives every input partition and the group's commits of them.
    pub fn read_stage_two(
        &mut self,
        commits: impl FnOnce() -> Result<(Vec<TopicPartition>, BTreeMap<TopicPartition, Committed>)>,
    ) -> Result<StageTwo> {
        let starts: Vec<(u32, i64)> = self.owned.iter().map(|&p| (p, self.meta(p).resume)).collect();
        let partitions: Vec<u32> = starts.iter().map(|(p, _)| *p).collect();
        let ends = self.ends(&self.shuffle.clone(), &partitions)?;
        if !self.windowed && starts.iter().all(|(partition, start)| *start >= ends[partition]) {
            let resolved = starts
                .iter()
                .map(|&(partition, _)| (partition, Resolved { meta: self.meta(partition), ..Resolved::default() }))
                .collect();
            return Ok(StageTwo { resolved, drained: true });
        }
        // Commits first, log ends second: every range the commits cover was acknowledged
        // before its commit, so it lies below the log ends read after.
        let (inputs, commits) = commits()?;
        let mut read = self.read(&self.shuffle.clone(), &starts)?;
        let mut resolved = BTreeMap::new();
        let mut drained = true;
        for (partition, start) in starts {
            let (records, end) = read.remove(&partition).unwrap_or((Vec::new(), start));
            drained &= records.is_empty();
            let entries = records
                .iter()
                .map(|r| ShuffleEntry::read(r.offset, r.key.as_deref(), r.value.as_deref(), &r.headers))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("shuffle partition {partition}"))?;
            let mut outcome = chain::resolve(partition, entries, &self.meta(partition), &commits, end)?;
            if self.windowed {
                match chain::watermark(&outcome, &inputs, &commits) {
                    Ok(watermark) => outcome.watermark = Some(watermark),
                    Err(held) => tracing::debug!("state partition {partition}: window slides wait: {held}"),
                }
            }
            if !outcome.waiting.is_empty() {
                let waiting: Vec<String> = outcome.waiting.iter().map(ToString::to_string).collect();
                let since = *self.waiting_since.entry(partition).or_insert_with(Instant::now);
                if since.elapsed() > WAITING_WARNING {
                    tracing::warn!(
                        "state partition {partition} has waited {} s for the committed batches of {} to reach its \
                         shuffle partition (read from offset {start})",
                        since.elapsed().as_secs(),
                        waiting.join(", ")
                    );
                    self.waiting_since.insert(partition, Instant::now());
                }
            } else {
                self.waiting_since.remove(&partition);
            }
            resolved.insert(partition, outcome);
        }
        Ok(StageTwo { resolved, drained })
    }

    /// Stage 1's records: each input range's keyed values to the shuffle partition of its key,
    /// then the range's end (with the batch's time) in every shuffle partition.
    pub fn stage_one(&self, ranges: &[OffsetRange], values: Vec<Vec<KeyedValue>>, batch_time: i64) -> Vec<StageRecord> {
        let mut records = Vec::new();
        for (range, values) in ranges.iter().zip(values) {
            if range.until <= range.from {
                continue;
            }
            let source = SourceRange { source: range.partition.clone(), from: range.from, until: range.until };
            let mut counts = vec![0u32; self.partitions as usize];
            for value in values {
                let partition = state_partition(&value.key, self.partitions);
                counts[partition as usize] += 1;
                records.push(StageRecord::shuffled(&self.shuffle, partition, &source, value.key, value.value));
            }
            for (partition, count) in counts.into_iter().enumerate() {
                records.push(StageRecord::shuffle_end(&self.shuffle, partition as u32, &source, count, batch_time));
            }
        }
        records
    }

    /// Stage 2's changelog for a batch: each owned partition's state writes (or panes and
    /// window results), then a marker with its new meta. Written before the group commit and
    /// the checkpoint's; returns the metas (with their changelog ends) for the checkpoint.
    pub fn write_changelog(
        &mut self,
        sink: &mut KafkaSink,
        changes: &BatchChanges,
        metas: Vec<(u32, PartitionMeta)>,
        batch_time: i64,
        schema: u32,
    ) -> Result<Vec<(u32, PartitionMeta)>> {
        let writer = format!("{}@{batch_time}", self.member);
        let mut metas: BTreeMap<u32, PartitionMeta> = metas.into_iter().collect();
        let mut by_partition: BTreeMap<u32, Vec<StageRecord>> = BTreeMap::new();
        let (changelog, partitions) = (&self.changelog, self.partitions);
        let mut add = |key: &[u8], record: &dyn Fn(u32) -> StageRecord| {
            let partition = state_partition(key, partitions);
            by_partition.entry(partition).or_default().push(record(partition));
        };
        for write in &changes.state {
            let (key, state) = match write {
                StateWrite::Put { key, bytes, .. } => (key, Some((batch_time, schema, bytes.clone()))),
                StateWrite::Remove { key, .. } => (key, None),
            };
            add(key, &|p| StageRecord::state(changelog, p, &writer, key.clone(), state.clone()));
        }
        for (key, time, pane) in &changes.panes {
            add(key, &|p| StageRecord::pane(changelog, p, &writer, key, *time, Some(pane.clone())));
        }
        for (key, time) in &changes.expired_panes {
            add(key, &|p| StageRecord::pane(changelog, p, &writer, key, *time, None));
        }
        for (key, end, value) in &changes.window_results {
            add(key, &|p| StageRecord::window(changelog, p, &writer, key, Some((*end, value.clone()))));
        }
        for key in &changes.dropped_windows {
            add(key, &|p| StageRecord::window(changelog, p, &writer, key, None));
        }
        // Changes without new input (keys timing out) end with the partition's marker too.
        for partition in by_partition.keys() {
            metas.entry(*partition).or_insert_with(|| self.meta(*partition));
        }
        let changed: Vec<(u32, PartitionMeta)> = metas.into_iter().collect();
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        for (partition, meta) in &changed {
            records.extend(by_partition.remove(partition).unwrap_or_default());
            records.push(StageRecord::marker(&self.changelog, *partition, &writer, meta));
        }
        send(sink, &records, "write the changelog")?;
        crate::failpoint::reached("changelog");
        let partitions: Vec<u32> = changed.iter().map(|(partition, _)| *partition).collect();
        let ends = self.ends(&self.changelog.clone(), &partitions)?;
        Ok(changed
            .into_iter()
            .map(|(partition, meta)| (partition, PartitionMeta { changelog: ends[&partition], ..meta }))
            .collect())
    }

    /// A processed batch moved these partitions' metas (not committed yet).
    pub fn advance(&mut self, metas: &[(u32, PartitionMeta)]) {
        self.metas.extend(metas.iter().cloned());
    }

    /// The checkpoint committed these metas.
    pub fn committed(&mut self, metas: &[(u32, PartitionMeta)]) {
        self.committed.extend(metas.iter().cloned());
        self.metas.extend(metas.iter().cloned());
    }

    /// Drops what uncommitted batches advanced (abandoned or rolled back: they run again).
    pub fn forget_uncommitted(&mut self) {
        self.metas = self.committed.clone();
    }

    /// After [`Self::publish_dirty`]: metas resolved before it take the published state's
    /// changelog position.
    pub fn published(&self, resolved: &mut BTreeMap<u32, Resolved>) {
        for (partition, resolved) in resolved {
            let meta = self.meta(*partition);
            resolved.meta.dirty = meta.dirty;
            resolved.meta.changelog = meta.changelog;
        }
    }

    /// A state partition's meta as last committed.
    pub fn meta(&self, partition: u32) -> PartitionMeta {
        self.metas.get(&partition).cloned().unwrap_or_default()
    }

    /// The metas after a batch run alone that applied `ranges` in process: every partition
    /// has every range, and its local copy is ahead of the changelog.
    pub fn applied_alone(&self, ranges: &[OffsetRange], read_to: &BTreeMap<u32, i64>) -> Vec<(u32, PartitionMeta)> {
        let advanced = ranges.iter().any(|range| range.until > range.from);
        self.owned
            .iter()
            .map(|&partition| {
                let mut meta = self.meta(partition);
                for range in ranges.iter().filter(|range| range.until > range.from) {
                    meta.set_applied(&range.partition, range.until);
                }
                if let Some(&end) = read_to.get(&partition) {
                    meta.resume = end;
                }
                meta.dirty |= advanced;
                (partition, meta)
            })
            .collect()
    }

    /// Each of `partitions`' records of `topic` from its start offset to the log end seen
    /// now, with that end.
    fn read(&self, topic: &str, starts: &[(u32, i64)]) -> Result<BTreeMap<u32, (Vec<SourceRecord>, i64)>> {
        let partitions: Vec<u32> = starts.iter().map(|(p, _)| *p).collect();
        let ends = self.ends(topic, &partitions)?;
        let mut read: BTreeMap<u32, (Vec<SourceRecord>, i64)> = BTreeMap::new();
        let mut list = TopicPartitionList::new();
        let mut left: BTreeMap<i32, i64> = BTreeMap::new();
        for &(partition, start) in starts {
            let end = ends[&partition];
            read.insert(partition, (Vec::new(), end));
            if start < end {
                list.add_partition_offset(topic, partition as i32, Offset::Offset(start))?;
                left.insert(partition as i32, end);
            }
        }
        if left.is_empty() {
            return Ok(read);
        }
        self.reader.assign(&list).with_context(|| format!("cannot read {topic}"))?;
        let mut progress = Instant::now();
        while !left.is_empty() {
            match self.reader.poll(READ_POLL) {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    let Some(&end) = left.get(&partition) else { continue };
                    if message.offset() < end {
                        read.get_mut(&(partition as u32)).expect("assigned").0.push(SourceRecord::read(&message));
                    }
                    if message.offset() + 1 >= end {
                        left.remove(&partition);
                    }
                    progress = Instant::now();
                }
                Some(Err(error)) => tracing::warn!("reading {topic}: {error}"),
                None => {
                    // Control records (transaction markers) have offsets but are never
                    // delivered: the position says when a partition is done.
                    let positions = self.reader.position()?;
                    for element in positions.elements() {
                        if let (Offset::Offset(position), Some(&end)) =
                            (element.offset(), left.get(&element.partition()))
                            && position >= end
                        {
                            left.remove(&element.partition());
                        }
                    }
                    if !left.is_empty() && progress.elapsed() > self.broker_timeout {
                        bail!(
                            "cannot read {topic} partitions {:?} to their ends from {} within {}",
                            left.keys().collect::<Vec<_>>(),
                            self.brokers,
                            humantime::format_duration(self.broker_timeout)
                        );
                    }
                }
            }
        }
        self.reader.unassign()?;
        Ok(read)
    }

    fn ends(&self, topic: &str, partitions: &[u32]) -> Result<BTreeMap<u32, i64>> {
        self.bounds(topic, partitions, Offset::End)
    }

    fn bounds(&self, topic: &str, partitions: &[u32], which: Offset) -> Result<BTreeMap<u32, i64>> {
        list_offsets(&self.reader, topic, partitions, which, self.broker_timeout, &self.brokers)
    }
}

/// Sends the job's own records; any the brokers refuse fails the step (they cannot be
/// skipped or dead-lettered: they are the state).
pub fn send(sink: &mut KafkaSink, records: &[StageRecord], what: &str) -> Result<()> {
    let refused = sink.send_all(records, |_| true).with_context(|| format!("cannot {what}"))?;
    if let Some(first) = refused.first() {
        bail!(
            "cannot {what}: {} of {} records refused, the first by topic {}: {}",
            refused.len(),
            records.len(),
            first.topic,
            first.reason
        );
    }
    Ok(())
}
