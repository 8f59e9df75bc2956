//! The ETL flow in-process: `MockCluster` and the engine in the test's own process, checked
//! with plain librdkafka clients. Fast to iterate on; the process-level test is the reference.

use std::collections::BTreeMap;

use sluice_host::config::{JobConfig, Topics};
use sluice_host::offsets::{AutoOffsetReset, TopicPartition};

use crate::harness::{etl_case, sorted};
use crate::mock_kafka::{MockKafka, Record, run};

const PARTITIONS: i32 = 3;

struct Etl {
    kafka: MockKafka,
    input: String,
    output: String,
}

impl Etl {
    fn new() -> Etl {
        let kafka = MockKafka::new();
        let (input, output) = (kafka.topic("in", PARTITIONS), kafka.topic("out", PARTITIONS));
        Etl { kafka, input, output }
    }

    fn produce(&self, lines: &[crate::harness::Input]) {
        let records: Vec<Record<'_>> = lines
            .iter()
            .map(|line| Record { key: line.key.as_deref(), ..Record::new(line.partition, &line.value) })
            .collect();
        self.kafka.produce(&self.input, &records);
    }

    fn job(&self, group: &str) -> JobConfig {
        let mut job = self.kafka.job(sluice_plugin_artifacts::ETL, Topics::Named(vec![self.input.clone()]), group);
        job.output_topic = Some(self.output.clone());
        job
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_transforms_every_valid_record_and_commits_the_log_end() {
    let etl = Etl::new();
    let case = etl_case(0, 40, PARTITIONS);
    etl.produce(&case.lines);

    let summary = run(etl.job("backfill")).await;
    assert_eq!((summary.records_in, summary.rejected), (40, case.malformed as u64));
    assert_eq!(etl.kafka.values(&etl.output), sorted(case.expected.clone()));
    let ends: BTreeMap<i32, Option<i64>> =
        (0..PARTITIONS).map(|p| (p, Some(case.lines.iter().filter(|l| l.partition == p).count() as i64))).collect();
    assert_eq!(etl.kafka.committed("backfill", &etl.input, PARTITIONS), ends);

    // The committed offsets beat the reset policy: a rerun of the group reads nothing.
    let rerun = run(etl.job("backfill")).await;
    assert_eq!(rerun.records_in, 0);
    assert_eq!(etl.kafka.values(&etl.output).len(), case.expected.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_start_beats_the_committed_offset() {
    let etl = Etl::new();
    let case = etl_case(0, 30, PARTITIONS);
    etl.produce(&case.lines);
    let first = run(etl.job("seek")).await;
    assert_eq!(first.records_in, 30);

    // Replay partition 0 from offset 2, as the seeds' `seek` does; the others stay committed.
    let partition_0 = case.lines.iter().filter(|l| l.partition == 0).count() as u64;
    let mut job = etl.job("seek");
    job.start.insert(TopicPartition::new(&etl.input, 0), 2);
    let replay = run(job).await;
    assert_eq!(replay.records_in, partition_0 - 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_reset_skips_what_was_there_before_the_first_run() {
    let etl = Etl::new();
    etl.produce(&etl_case(0, 12, PARTITIONS).lines);
    let mut job = etl.job("latest");
    job.auto_offset_reset = AutoOffsetReset::Latest;
    let summary = run(job).await;
    assert_eq!(summary.records_in, 0);
    let committed = etl.kafka.committed("latest", &etl.input, PARTITIONS);
    assert!(committed.values().all(Option::is_some), "the starting positions are committed");
}
