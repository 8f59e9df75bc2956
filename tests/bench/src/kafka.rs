//! The embedded broker every runner shares, and the independent reads that check their results.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use sluice_host::broker::DevBroker;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The mock cluster keeps at most 5 MiB and 100,000 records per partition, dropping the oldest
/// beyond that; an input must stay below both (with room for the record framing) to be read
/// whole.
const MAX_PARTITION_BYTES: usize = 4_500_000;
const MAX_PARTITION_RECORDS: u64 = 90_000;
/// Bytes of framing per record, roughly, in the mock cluster's log.
const RECORD_FRAMING: usize = 40;

/// A benchmark topic: its name and partition count.
#[derive(Debug, Clone, Copy)]
pub struct Topic<'a> {
    pub name: &'a str,
    pub partitions: i32,
}

/// `host dev-broker`'s mock cluster, in this process, on a loopback port.
pub struct Broker {
    cluster: DevBroker,
}

impl Broker {
    pub fn start() -> Result<Broker> {
        Ok(Broker { cluster: DevBroker::start(1, &[])? })
    }

    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Client settings every runner uses. The mock cluster answers an empty long-poll fetch
    /// only after `fetch.wait.max.ms`; a real broker answers on arrival.
    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap()).set("fetch.wait.max.ms", "20");
        config
    }

    pub fn create_topic(&self, topic: Topic<'_>) -> Result<()> {
        self.cluster.create_topic(topic.name, topic.partitions)
    }

    /// Creates `topic` and fills it with `count` lines, line `n` in partition `n % partitions`.
    pub fn load(&self, topic: Topic<'_>, count: u64, line: impl Fn(u64) -> String) -> Result<()> {
        let partitions = topic.partitions as u64;
        let bytes: usize = (0..count.min(partitions * 64)).map(|n| line(n).len() + RECORD_FRAMING).sum();
        let per_partition = count.div_ceil(partitions);
        let partition_bytes = bytes as u64 * per_partition / count.clamp(1, partitions * 64);
        ensure!(
            per_partition <= MAX_PARTITION_RECORDS && partition_bytes <= MAX_PARTITION_BYTES as u64,
            "{count} records ({per_partition} and about {partition_bytes} bytes per partition) do not fit {} \
             partitions of the mock cluster, which keeps at most {MAX_PARTITION_RECORDS} records and \
             {MAX_PARTITION_BYTES} bytes per partition: use more partitions or fewer records",
            topic.partitions
        );
        self.create_topic(topic)?;
        let Topic { name: topic, .. } = topic;
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .client()
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("cannot create the loading producer")?;
        for n in 0..count {
            let value = line(n);
            let mut record = BaseRecord::<(), _>::to(topic).payload(&value).partition((n % partitions) as i32);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        record = returned;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        producer.flush(TIMEOUT).context("cannot load the input")?;
        ensure!(self.log_ends(topic)?.iter().sum::<i64>() == count as i64, "topic {topic} did not take every line");
        Ok(())
    }

    /// Each partition's high watermark.
    pub fn log_ends(&self, topic: &str) -> Result<Vec<i64>> {
        let consumer: BaseConsumer = self.client().create()?;
        (0..self.partitions(&consumer, topic)?)
            .map(|partition| Ok(consumer.fetch_watermarks(topic, partition, TIMEOUT)?.1))
            .collect()
    }

    fn partitions(&self, consumer: &BaseConsumer, topic: &str) -> Result<i32> {
        let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        ensure!(partitions > 0, "topic {topic} has no partitions");
        Ok(partitions as i32)
    }

    /// The offsets `group` has committed for `topic`, as another client reads them.
    pub fn committed(&self, group: &str, topic: &str) -> Result<Vec<i64>> {
        let consumer: BaseConsumer = self.client().set("group.id", group).create()?;
        let mut query = TopicPartitionList::new();
        for partition in 0..self.partitions(&consumer, topic)? {
            query.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(query, TIMEOUT)?;
        Ok(committed.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { -1 }).collect())
    }

    /// Every record of `topic`: how many, and the last value seen for each key.
    pub fn latest_by_key(&self, topic: &str) -> Result<(u64, HashMap<String, String>)> {
        let ends = self.log_ends(topic)?;
        let consumer: BaseConsumer = self.client().set("group.id", "sluice-bench-reader").create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..ends.len() as i32 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let (mut remaining, mut count) = (ends.iter().sum::<i64>(), 0);
        let mut latest = HashMap::new();
        while remaining > 0 {
            let Some(message) = consumer.poll(TIMEOUT) else { bail!("{remaining} records of {topic} did not arrive") };
            let message = message?;
            let text = |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
            latest.insert(text(message.key()), text(message.payload()));
            remaining -= 1;
            count += 1;
        }
        Ok((count, latest))
    }

    /// How many records `topic` holds.
    pub fn count(&self, topic: &str) -> Result<u64> {
        Ok(self.log_ends(topic)?.iter().sum::<i64>() as u64)
    }
}
