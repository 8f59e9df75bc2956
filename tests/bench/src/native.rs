//! The native baseline: the same logic written directly against rdkafka, no Wasm and no
//! engine, with the same batching as the Sluice runs (the same offset ranges, one partition
//! task's records processed as a batch, outputs delivered, then offsets committed). It is the
//! ceiling for Sluice's design: what remains is the price of the sandbox and the engine.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use redb::{Database, ReadableTable as _, TableDefinition};
use sluice_sdk::{BatchContext, Output, Record, Transform as _};

use crate::Batching;
use crate::kafka::{Broker, TIMEOUT};

/// Reads a topic in batches of fixed offset ranges and commits each batch's ends.
struct BatchReader {
    consumer: BaseConsumer,
    topic: String,
    /// Where the next batch starts, per partition.
    next: Vec<i64>,
    /// The log ends when the run started: the backlog to work through.
    ends: Vec<i64>,
    /// Records fetched past a batch's end, kept for the next batch.
    ahead: Vec<Vec<Record>>,
    per_partition: i64,
}

/// One batch: per partition, its context (with the offset range) and its records.
struct Batch {
    tasks: Vec<(BatchContext, Vec<Record>)>,
}

impl BatchReader {
    fn new(broker: &Broker, topic: &str, group: &str, per_partition: i64) -> Result<BatchReader> {
        let consumer: BaseConsumer = broker
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("cannot create the consumer")?;
        let ends = broker.log_ends(topic)?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..ends.len() as i32 {
            assignment.add_partition_offset(topic, partition, Offset::Offset(0))?;
        }
        consumer.assign(&assignment)?;
        Ok(BatchReader {
            consumer,
            topic: topic.into(),
            next: vec![0; ends.len()],
            ahead: ends.iter().map(|_| Vec::new()).collect(),
            ends,
            per_partition,
        })
    }

    /// The next batch's records, or `None` once the backlog is done.
    fn next_batch(&mut self, batch_time: i64) -> Result<Option<Batch>> {
        if self.next == self.ends {
            return Ok(None);
        }
        let until: Vec<i64> =
            self.next.iter().zip(&self.ends).map(|(from, end)| (from + self.per_partition).min(*end)).collect();
        let mut tasks: Vec<(BatchContext, Vec<Record>)> = (0..self.ends.len())
            .map(|p| {
                let context = BatchContext {
                    topic: self.topic.clone(),
                    partition: p as i32,
                    from_offset: self.next[p],
                    until_offset: until[p],
                    batch_time,
                };
                let mut records = std::mem::take(&mut self.ahead[p]);
                let later = records.iter().position(|r| r.offset >= until[p]).unwrap_or(records.len());
                self.ahead[p] = records.split_off(later);
                (context, records)
            })
            .collect();
        // A range is complete once its last offset, or a record past its end, has arrived.
        let mut pending: Vec<bool> = tasks
            .iter()
            .zip(&self.ahead)
            .map(|((context, records), ahead)| {
                ahead.is_empty() && records.last().map_or(context.from_offset, |r| r.offset + 1) < context.until_offset
            })
            .collect();
        for (p, _) in pending.iter().enumerate().filter(|(_, pending)| **pending) {
            self.consumer.resume(&self.partition_list(p))?;
        }
        let mut left = pending.iter().filter(|pending| **pending).count();
        let deadline = Instant::now() + TIMEOUT;
        while left > 0 {
            let Some(message) = self.consumer.poll(Duration::from_millis(100)) else {
                if Instant::now() > deadline {
                    bail!("the batch's records did not arrive within {TIMEOUT:?}");
                }
                continue;
            };
            let (p, record) = record(&message?);
            let offset = record.offset;
            if offset < until[p] {
                tasks[p].1.push(record);
            } else {
                if self.ahead[p].is_empty() {
                    // Fetching further ahead would only buffer records: pause until needed.
                    self.consumer.pause(&self.partition_list(p))?;
                }
                self.ahead[p].push(record);
            }
            if pending[p] && offset + 1 >= until[p] {
                pending[p] = false;
                left -= 1;
            }
        }
        self.next = until;
        Ok(Some(Batch { tasks }))
    }

    fn partition_list(&self, partition: usize) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition as i32);
        list
    }

    /// Commits the ends of the batch just read.
    fn commit(&self) -> Result<()> {
        let mut offsets = TopicPartitionList::new();
        for (partition, until) in self.next.iter().enumerate() {
            offsets.add_partition_offset(&self.topic, partition as i32, Offset::Offset(*until))?;
        }
        self.consumer.commit(&offsets, CommitMode::Sync).context("cannot commit offsets")
    }
}

fn record(message: &BorrowedMessage<'_>) -> (usize, Record) {
    let record = Record {
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: Vec::new(),
    };
    (message.partition() as usize, record)
}

/// Sends outputs and waits until every one is acknowledged.
struct Sender {
    producer: BaseProducer,
    topic: String,
}

impl Sender {
    fn new(broker: &Broker, topic: &str) -> Result<Sender> {
        let producer = broker.client().set("enable.idempotence", "true").create()?;
        Ok(Sender { producer, topic: topic.into() })
    }

    fn send_all<'a>(&self, outputs: impl IntoIterator<Item = (Option<&'a [u8]>, &'a [u8])>) -> Result<()> {
        for (key, value) in outputs {
            let mut record = BaseRecord::to(&self.topic).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            while let Err((error, returned)) = self.producer.send(record) {
                if !matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                    return Err(error).context("cannot send an output");
                }
                self.producer.poll(Duration::from_millis(10));
                record = returned;
            }
        }
        while self.producer.in_flight_count() > 0 {
            self.producer.poll(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// What a native run did.
pub struct NativeRun {
    pub elapsed: Duration,
    pub records: u64,
    pub outputs: u64,
}

/// The ETL plugin's own code, called natively on each partition task.
pub fn etl(broker: &Broker, input: &str, output: &str, group: &str, batching: Batching) -> Result<NativeRun> {
    let mut etl = etl::Etl::init(etl::Config { timezone: "UTC".into() }).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut reader = BatchReader::new(broker, input, group, batching.per_partition)?;
    let sender = Sender::new(broker, output)?;
    let started = Instant::now();
    let (mut records, mut outputs) = (0, 0);
    while let Some(batch) = reader.next_batch(0)? {
        let mut results = Vec::with_capacity(batch.tasks.len());
        for (context, task) in batch.tasks {
            records += task.len() as u64;
            results.push(etl.process_batch(&context, task).map_err(|e| anyhow::anyhow!("{e:?}"))?);
        }
        let all: Vec<&Output> = results.iter().flat_map(|result| &result.outputs).collect();
        outputs += all.len() as u64;
        sender.send_all(all.iter().map(|o| (o.key.as_deref(), o.value.as_deref().unwrap_or_default())))?;
        reader.commit()?;
    }
    Ok(NativeRun { elapsed: started.elapsed(), records, outputs })
}

const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
const OFFSETS: TableDefinition<u32, i64> = TableDefinition::new("offsets");

/// Word count with its state in redb, the store Sluice's checkpoint uses: each batch reads
/// the prior counts of the words it saw, writes the new ones and the offsets in one durable
/// transaction, and emits `(word,total)` per word it saw, as the wordcount plugin does.
pub fn wordcount(
    broker: &Broker,
    input: &str,
    output: &str,
    group: &str,
    batching: Batching,
    store: &Path,
) -> Result<NativeRun> {
    let db = Database::create(store.join("counts.redb")).context("cannot create the state store")?;
    let mut reader = BatchReader::new(broker, input, group, batching.per_partition)?;
    let sender = Sender::new(broker, output)?;
    let started = Instant::now();
    let (mut records, mut outputs) = (0, 0);
    while let Some(batch) = reader.next_batch(0)? {
        let mut seen: HashMap<String, u64> = HashMap::new();
        for (_, task) in &batch.tasks {
            records += task.len() as u64;
            for record in task {
                let line = std::str::from_utf8(record.value.as_deref().unwrap_or_default())?;
                for word in line.split_whitespace() {
                    match seen.get_mut(word) {
                        Some(count) => *count += 1,
                        None => {
                            seen.insert(word.to_string(), 1);
                        }
                    }
                }
            }
        }
        // redb's default durability: the commit is on disk when it returns.
        let txn = db.begin_write()?;
        let mut emitted = Vec::with_capacity(seen.len());
        {
            let mut counts = txn.open_table(COUNTS)?;
            for (word, new) in &seen {
                let total = counts.get(word.as_str())?.map_or(0, |prior| prior.value()) + new;
                counts.insert(word.as_str(), total)?;
                emitted.push((word.as_str(), format!("({word},{total})")));
            }
            let mut offsets = txn.open_table(OFFSETS)?;
            for (partition, until) in reader.next.iter().enumerate() {
                offsets.insert(partition as u32, until)?;
            }
        }
        outputs += emitted.len() as u64;
        sender.send_all(emitted.iter().map(|(word, value)| (Some(word.as_bytes()), value.as_bytes())))?;
        txn.commit()?;
        reader.commit()?;
    }
    ensure!(records > 0, "the word-count input was empty");
    Ok(NativeRun { elapsed: started.elapsed(), records, outputs })
}
