//! The ETL flow in-process: `MockCluster` and the engine in the test's own process, checked
//! with plain librdkafka clients. Fast to iterate on; the process-level test is the reference.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use sluice_host::config::{JobConfig, Topics};
use sluice_host::engine::{Engine, RunSummary, Shutdown};
use sluice_host::source::{AutoOffsetReset, TopicPartition};

use crate::harness::{self, etl_case};

const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Cluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
    input: String,
    output: String,
}

impl Cluster {
    fn new() -> Cluster {
        let cluster = MockCluster::new(1).unwrap();
        let (input, output) = (harness::unique("in"), harness::unique("out"));
        cluster.create_topic(&input, PARTITIONS, 1).unwrap();
        cluster.create_topic(&output, PARTITIONS, 1).unwrap();
        Cluster { cluster, input, output }
    }

    fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    fn produce(&self, lines: &[harness::Input]) {
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create().unwrap();
        for line in lines {
            let mut record = BaseRecord::to(&self.input).payload(&line.value).partition(line.partition);
            if let Some(key) = &line.key {
                record = record.key(key);
            }
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(TIMEOUT).unwrap();
    }

    fn job(&self, group: &str) -> JobConfig {
        JobConfig {
            plugin: PathBuf::from(sluice_plugin_artifacts::ETL),
            plugin_config: vec![],
            brokers: self.brokers(),
            topics: Topics::Named(vec![self.input.clone()]),
            group: group.into(),
            batch_interval: Duration::from_millis(100),
            output_topic: Some(self.output.clone()),
            print: None,
            kafka: vec![],
            start: BTreeMap::new(),
            auto_offset_reset: AutoOffsetReset::Earliest,
            max_batches: None,
            stop_when_caught_up: true,
            parallelism: 2,
            broker_timeout: TIMEOUT,
        }
    }

    /// Every value in the output topic, sorted.
    fn output_values(&self) -> Vec<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", harness::unique("reader"))
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        let mut remaining = 0;
        for partition in 0..PARTITIONS {
            let (low, high) = consumer.fetch_watermarks(&self.output, partition, TIMEOUT).unwrap();
            remaining += high - low;
            assignment.add_partition_offset(&self.output, partition, Offset::Offset(low)).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut values = Vec::new();
        while remaining > 0 {
            let message = consumer.poll(TIMEOUT).expect("output records within the timeout").unwrap();
            values.push(String::from_utf8(message.payload().unwrap().to_vec()).unwrap());
            remaining -= 1;
        }
        values.sort();
        values
    }

    fn committed(&self, group: &str) -> BTreeMap<i32, Option<i64>> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).set("group.id", group).create().unwrap();
        let mut query = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            query.add_partition(&self.input, partition);
        }
        let committed = consumer.committed_offsets(query, TIMEOUT).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
            .collect()
    }
}

async fn run(job: JobConfig) -> RunSummary {
    let engine = tokio::task::block_in_place(|| Engine::start(job)).unwrap();
    engine.run(Shutdown::manual().0).await.unwrap()
}

fn sorted(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_transforms_every_valid_record_and_commits_the_log_end() {
    let cluster = Cluster::new();
    let case = etl_case(0, 40, PARTITIONS);
    cluster.produce(&case.lines);

    let summary = run(cluster.job("backfill")).await;
    assert_eq!((summary.records_in, summary.rejected), (40, case.malformed as u64));
    assert_eq!(cluster.output_values(), sorted(case.expected.clone()));
    let ends: BTreeMap<i32, Option<i64>> = (0..PARTITIONS)
        .map(|p| (p, Some(case.lines.iter().filter(|l| l.partition == p).count() as i64)))
        .collect();
    assert_eq!(cluster.committed("backfill"), ends);

    // The committed offsets beat the reset policy: a rerun of the group reads nothing.
    let rerun = run(cluster.job("backfill")).await;
    assert_eq!(rerun.records_in, 0);
    assert_eq!(cluster.output_values().len(), case.expected.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_start_beats_the_committed_offset() {
    let cluster = Cluster::new();
    let case = etl_case(0, 30, PARTITIONS);
    cluster.produce(&case.lines);
    let first = run(cluster.job("seek")).await;
    assert_eq!(first.records_in, 30);

    // Replay partition 0 from offset 2, as the seeds' `seek` does; the others stay committed.
    let partition_0 = case.lines.iter().filter(|l| l.partition == 0).count() as u64;
    let mut job = cluster.job("seek");
    job.start.insert(TopicPartition::new(&cluster.input, 0), 2);
    let replay = run(job).await;
    assert_eq!(replay.records_in, partition_0 - 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_reset_skips_what_was_there_before_the_first_run() {
    let cluster = Cluster::new();
    cluster.produce(&etl_case(0, 12, PARTITIONS).lines);
    let mut job = cluster.job("latest");
    job.auto_offset_reset = AutoOffsetReset::Latest;
    let summary = run(job).await;
    assert_eq!(summary.records_in, 0);
    assert!(cluster.committed("latest").values().all(Option::is_some), "the starting positions are committed");
}
