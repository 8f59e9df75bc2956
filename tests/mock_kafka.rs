//! In-process Kafka for fast tests: librdkafka's mock cluster (through the host's `DevBroker`,
//! which exposes its fault API), with plain librdkafka clients to produce input and read
//! results back, and a job template for the engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use sluice_host::broker::DevBroker;
use sluice_host::config::{JobConfig, JobOptions, Topics};
use sluice_host::engine::{BatchReport, Engine, RunSummary, Shutdown};
use sluice_host::offsets::AutoOffsetReset;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// One record to produce.
pub struct Record<'a> {
    pub partition: i32,
    pub key: Option<&'a str>,
    pub value: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> Record<'a> {
    pub fn new(partition: i32, value: &'a str) -> Record<'a> {
        Record { partition, key: None, value, headers: &[] }
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: String,
    pub headers: BTreeMap<String, String>,
}

pub struct MockKafka {
    pub cluster: DevBroker,
}

impl MockKafka {
    pub fn new() -> MockKafka {
        MockKafka::with_brokers(1)
    }

    /// A cluster of `brokers` brokers (ids 1 to `brokers`).
    pub fn with_brokers(brokers: i32) -> MockKafka {
        MockKafka { cluster: DevBroker::start(brokers, &[]).unwrap() }
    }

    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic with a name no other test uses.
    pub fn topic(&self, name: &str, partitions: i32) -> String {
        let topic = crate::harness::unique(name);
        self.cluster.create_topic(&topic, partitions).unwrap();
        topic
    }

    pub fn produce(&self, topic: &str, records: &[Record<'_>]) {
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create().unwrap();
        for record in records {
            let mut message = BaseRecord::to(topic).payload(record.value).partition(record.partition);
            if let Some(key) = record.key {
                message = message.key(key);
            }
            if !record.headers.is_empty() {
                let headers = record.headers.iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
                    headers.insert(Header { key, value: Some(*value) })
                });
                message = message.headers(headers);
            }
            producer.send(message).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(TIMEOUT).unwrap();
    }

    /// Every value in `topic`, sorted.
    pub fn values(&self, topic: &str) -> Vec<String> {
        let mut values: Vec<String> = self.records(topic).into_iter().map(|record| record.value).collect();
        values.sort();
        values
    }

    /// Every record in `topic`, partition by partition, in offset order.
    pub fn records(&self, topic: &str) -> Vec<Consumed> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", crate::harness::unique("reader"))
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).unwrap();
        let mut assignment = TopicPartitionList::new();
        let mut remaining = 0;
        for partition in metadata.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, partition.id(), TIMEOUT).unwrap();
            remaining += high - low;
            assignment.add_partition_offset(topic, partition.id(), Offset::Offset(low)).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut records = Vec::new();
        while remaining > 0 {
            let message = consumer.poll(TIMEOUT).expect("records within the timeout").unwrap();
            let text = |bytes: Option<&[u8]>| bytes.map(|b| String::from_utf8(b.to_vec()).unwrap());
            let headers = message
                .headers()
                .map(|headers| headers.iter().map(|h| (h.key.to_string(), text(h.value).unwrap_or_default())).collect())
                .unwrap_or_default();
            records.push(Consumed {
                partition: message.partition(),
                offset: message.offset(),
                key: text(message.key()),
                value: text(message.payload()).unwrap_or_default(),
                headers,
            });
            remaining -= 1;
        }
        records.sort_by_key(|record| (record.partition, record.offset));
        records
    }

    /// The group's committed offset of each partition of `topic`.
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Option<i64>> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).set("group.id", group).create().unwrap();
        let mut query = TopicPartitionList::new();
        for partition in 0..partitions {
            query.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(query, TIMEOUT).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
            .collect()
    }

    /// A backfill job over `topics` with `plugin`: earliest start, stop when caught up.
    pub fn job(&self, plugin: &str, topics: Topics, group: &str) -> JobConfig {
        let (topics, topic_pattern) = match topics {
            Topics::Named(names) => (names, None),
            Topics::Pattern(pattern) => {
                let whole = pattern.as_str().trim_start_matches("^(?:").trim_end_matches(")$").to_string();
                (Vec::new(), Some(whole))
            }
        };
        JobConfig::from_options(JobOptions {
            plugin: Some(PathBuf::from(plugin)),
            brokers: Some(self.brokers()),
            topics,
            topic_pattern,
            group: Some(group.into()),
            batch_interval: Some(Duration::from_millis(100)),
            auto_offset_reset: Some(AutoOffsetReset::Earliest),
            stop_when_caught_up: true,
            parallelism: Some(2),
            broker_timeout: Some(TIMEOUT),
            session_timeout: Some(humantime::parse_duration(crate::harness::TEST_SESSION_TIMEOUT).unwrap()),
            instance_id: Some("test".into()),
            ..JobOptions::default()
        })
        .unwrap()
    }
}

/// Runs `job` to its end.
pub async fn run(job: JobConfig) -> RunSummary {
    run_observed(job, |_| {}).await.0
}

/// Runs `job` to its end, returning every batch's report too.
pub async fn run_observed(job: JobConfig, mut observe: impl FnMut(&BatchReport)) -> (RunSummary, Vec<BatchReport>) {
    let engine = tokio::task::block_in_place(|| Engine::start(job)).unwrap();
    let mut reports = Vec::new();
    let summary = engine
        .run_observed(Shutdown::manual().0, |report| {
            observe(report);
            reports.push(report.clone());
            Ok(())
        })
        .await
        .unwrap();
    (summary, reports)
}
