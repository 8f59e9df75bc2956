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
    /// Shared, so a test can inject faults from another thread while a job runs.
    pub cluster: std::sync::Arc<DevBroker>,
}

/// One record with bytes everywhere, as a foreign producer may write it: header names need
/// not be UTF-8, and the timestamp may be Kafka's "none" (-1).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Logs of in-process jobs go to the test's output when `SLUICE_TEST_LOG` is set (a filter such
/// as `info`), for debugging a failing test.
pub fn init_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("SLUICE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

impl MockKafka {
    pub fn new() -> MockKafka {
        MockKafka::with_brokers(1)
    }

    /// A cluster of `brokers` brokers (ids 1 to `brokers`).
    pub fn with_brokers(brokers: i32) -> MockKafka {
        init_logs();
        MockKafka { cluster: std::sync::Arc::new(DevBroker::start(brokers, &[]).unwrap()) }
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

    /// Produces `records` to `partition` of `topic` through librdkafka's C API, so header names
    /// can be any bytes (rdkafka's own API takes them as `&str`).
    pub fn produce_raw(&self, topic: &str, partition: i32, records: &[RawRecord]) {
        use rdkafka::bindings as rdsys;
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create().unwrap();
        for record in records {
            let headers = OwnedHeaders::new_with_capacity(record.headers.len());
            let native =
                headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
            for (name, value) in &record.headers {
                let (value_ptr, value_len) =
                    value.as_ref().map_or((std::ptr::null(), 0), |v| (v.as_ptr().cast(), v.len() as isize));
                // SAFETY: a live header list; librdkafka copies name and value.
                let error = unsafe {
                    rdsys::rd_kafka_header_add(native, name.as_ptr().cast(), name.len() as isize, value_ptr, value_len)
                };
                assert_eq!(error, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
            }
            let mut message = BaseRecord::<[u8], [u8]>::to(topic).partition(partition).headers(headers);
            if let Some(key) = &record.key {
                message = message.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                message = message.payload(value.as_slice());
            }
            producer.send(message).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(TIMEOUT).unwrap();
    }

    /// Every record of `topic` as `(partition, offset, record, timestamp)`, headers read through
    /// librdkafka's C API (names as bytes).
    pub fn raw_records(&self, topic: &str) -> Vec<(i32, i64, RawRecord, Option<i64>)> {
        use rdkafka::bindings as rdsys;
        let mut records = Vec::new();
        self.read_all(topic, |message| {
            let mut list: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
            let mut headers = Vec::new();
            // SAFETY: the message is live while borrowed; librdkafka owns the header buffers.
            if unsafe { rdsys::rd_kafka_message_headers(message.ptr(), &mut list) }
                == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                for index in 0..unsafe { rdsys::rd_kafka_header_cnt(list) } {
                    let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
                    unsafe { rdsys::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size) };
                    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes().to_vec();
                    let value = (!value.is_null())
                        .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
                    headers.push((name, value));
                }
            }
            let record = RawRecord {
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers,
            };
            records.push((message.partition(), message.offset(), record, message.timestamp().to_millis()));
        });
        records.sort_by_key(|(partition, offset, _, _)| (*partition, *offset));
        records
    }

    /// Reads `topic` from the beginning of every partition to its end as it is now, calling
    /// `visit` with each record.
    fn read_all(&self, topic: &str, mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>)) {
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
        while remaining > 0 {
            let message = consumer.poll(TIMEOUT).expect("records within the timeout").unwrap();
            visit(&message);
            remaining -= 1;
        }
    }

    /// Every value in `topic`, sorted.
    pub fn values(&self, topic: &str) -> Vec<String> {
        let mut values: Vec<String> = self.records(topic).into_iter().map(|record| record.value).collect();
        values.sort();
        values
    }

    /// Every record in `topic`, partition by partition, in offset order.
    pub fn records(&self, topic: &str) -> Vec<Consumed> {
        let mut records = Vec::new();
        self.read_all(topic, |message| {
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
        });
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
