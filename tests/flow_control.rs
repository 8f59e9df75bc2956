//! Flow control and lifecycle: rate limits, backpressure, topic discovery, offsets lost to
//! retention, and group commits that fail.

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use sluice_host::broker::Api;
use sluice_host::config::{RateLimits, Topics};
use sluice_host::engine::{Engine, Shutdown};
use sluice_host::offsets::AutoOffsetReset;

use crate::harness::{self, BrokerProcess, run_host};
use crate::mock_kafka::{MockKafka, Record, run, run_observed};

fn values(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n:05}")).collect()
}

fn records<'a>(values: &'a [String], partitions: i32) -> Vec<Record<'a>> {
    values.iter().enumerate().map(|(n, value)| Record::new(n as i32 % partitions, value)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cap_limits_every_batch_and_drains_a_backlog_in_the_expected_batches() {
    let kafka = MockKafka::new();
    let topic = kafka.topic("capped", 3);
    let input = values("r", 300);
    kafka.produce(&topic, &records(&input, 3));

    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic.clone()]), "capped");
    job.batch_interval = Duration::from_millis(200);
    // 50 records/s × 0.2 s = 10 records per partition per batch: 100 per partition, 10 batches.
    job.rate = RateLimits { max_rate_per_partition: Some(50.0), ..RateLimits::UNLIMITED };
    let (summary, reports) = run_observed(job, |_| {}).await;
    assert_eq!(summary.records_in, 300);
    assert_eq!(summary.batches, 10);
    for report in &reports {
        assert!(report.ranges.iter().all(|range| range.len() <= 10), "{:?}", report.ranges);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_initial_rate_limits_the_first_batch_of_a_cold_start() {
    let kafka = MockKafka::new();
    let topic = kafka.topic("cold", 2);
    let input = values("r", 200);
    kafka.produce(&topic, &records(&input, 2));

    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic]), "cold");
    job.batch_interval = Duration::from_millis(200);
    // 100 records/s for the job × 0.2 s = 20 records, split by lag: 10 per partition.
    job.rate = RateLimits { initial_rate: Some(100.0), ..RateLimits::UNLIMITED };
    let (summary, reports) = run_observed(job, |_| {}).await;
    assert_eq!(reports[0].records_in, 20);
    assert_eq!(reports[0].rate, Some(100.0));
    assert_eq!((summary.batches, summary.records_in), (2, 200), "the second batch takes the rest");
}

#[tokio::test(flavor = "multi_thread")]
async fn backpressure_shrinks_batches_to_fit_the_interval_and_grows_them_back() {
    let kafka = MockKafka::new();
    let topic = kafka.topic("pressure", 1);
    // A backlog of slow records followed by fast ones. The slow ones take about 0.4 ms each
    // (a cold start of 1 000 of them overruns a 200 ms interval), the fast ones almost nothing.
    let slow = values("slow", 4_000);
    let fast = values("fast", 20_000);
    let slow_headers: &[(&str, &str)] = &[("busy-work", "250000")];
    let mut input: Vec<Record<'_>> =
        slow.iter().map(|value| Record { headers: slow_headers, ..Record::new(0, value) }).collect();
    input.extend(fast.iter().map(|value| Record::new(0, value)));
    kafka.produce(&topic, &input);

    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic]), "pressure");
    job.batch_interval = Duration::from_millis(200);
    job.parallelism = 1;
    job.rate = RateLimits { initial_rate: Some(5_000.0), backpressure: Some(100.0), max_rate_per_partition: None };
    let (summary, reports) = run_observed(job, |_| {}).await;
    assert_eq!(summary.records_in, 24_000);
    let trace: Vec<(usize, u128)> = reports.iter().map(|r| (r.records_in, r.processing().as_millis())).collect();

    let sizes: Vec<usize> = reports.iter().map(|r| r.records_in).collect();
    let interval = Duration::from_millis(200);
    // The cold start takes 1 000 slow records and overruns the interval...
    assert_eq!(sizes[0], 1_000);
    assert!(reports[0].processing() > interval, "{:?}", reports[0].processing());
    // ...then the estimate brings batches down until a slow batch fits the interval (the last
    // batch takes whatever was left, a size no estimate chose)...
    let chosen = &sizes[..sizes.len() - 1];
    let smallest = *chosen.iter().min().unwrap();
    assert!(smallest < sizes[0] / 2, "batch sizes never shrank: {trace:?}");
    assert!(
        reports.iter().any(|r| r.records_in > 0 && r.records_in < sizes[0] && r.processing() <= interval),
        "no batch fit the interval: {trace:?}",
    );
    // ...and once the records are fast, batches grow well past the slow ones.
    let largest_after_smallest = sizes[chosen.iter().position(|s| *s == smallest).unwrap()..].iter().max().unwrap();
    assert!(*largest_after_smallest > smallest * 4, "batches never grew back: {trace:?}");
}

/// With `--auto-offset-reset latest`, what the first topic held before the job started is
/// skipped; a topic created while the job runs is read from its beginning, so records written
/// to it before the next batch are not lost. A topic whose metadata briefly carries an error
/// is not taken for deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_created_while_running_under_the_pattern_is_read_from_its_beginning() {
    let kafka = MockKafka::new();
    let prefix = harness::unique("disc");
    let first = format!("{prefix}-a");
    kafka.cluster.create_topic(&first, 2).unwrap();
    kafka.produce(&first, &records(&values("before", 10), 2));

    let mut job = kafka.job(
        sluice_plugin_artifacts::BUSY,
        Topics::Pattern(regex::Regex::new(&format!("^(?:{prefix}-.*)$")).unwrap()),
        "discovery",
    );
    job.stop_when_caught_up = false;
    job.auto_offset_reset = AutoOffsetReset::Latest;
    let engine = tokio::task::block_in_place(|| Engine::start(job)).unwrap();
    let (shutdown, stop) = Shutdown::manual();
    let second = format!("{prefix}-b");
    let (after, later, last) = (values("after", 4), values("b", 6), values("last", 2));
    let (mut seen, mut batches) = (0, 0);
    let mut without_first = 0;
    let summary = engine
        .run_observed(shutdown, |report| {
            seen += report.records_in;
            batches += 1;
            // The first topic is in every batch: a metadata hiccup does not drop it (which
            // would revoke its partitions and bring them back a rebalance later).
            if !report.ranges.iter().any(|range| range.partition.topic == first) {
                without_first += 1;
            }
            match batches {
                // After the first batch: records for the first topic, and a new matching topic
                // with records in it before any batch has seen it.
                1 => {
                    kafka.produce(&first, &records(&after, 2));
                    kafka.cluster.create_topic(&second, 3).unwrap();
                    kafka.produce(&second, &records(&later, 3));
                }
                // Once both are read, the first topic's metadata breaks for one answer...
                _ if seen == 10 && batches < 100 => {
                    kafka.cluster.set_topic_error(&first, Some(RDKafkaErrorCode::LeaderNotAvailable)).unwrap();
                    batches = 100;
                }
                // ...and is fine again; the topic is still read.
                101 => {
                    kafka.cluster.set_topic_error(&first, None).unwrap();
                    kafka.produce(&first, &records(&last, 2));
                }
                _ if seen == 12 => stop.send(true).unwrap(),
                _ => {}
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(summary.records_in, 12, "4 + 6 + 2: nothing of before the start, nothing lost after");
    assert_eq!(without_first, 0, "batches without the first topic");
    let committed = kafka.committed("discovery", &second, 3);
    assert_eq!(committed.values().map(|c| c.unwrap()).sum::<i64>(), 6, "{committed:?}");
    let committed = kafka.committed("discovery", &first, 2);
    assert_eq!(committed.values().map(|c| c.unwrap()).sum::<i64>(), 16, "{committed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_group_commits_are_retried_and_never_stop_the_job() {
    let kafka = MockKafka::new();
    let topic = kafka.topic("commits", 1);
    let first = values("a", 5);
    kafka.produce(&topic, &records(&first, 1));
    // Commit failures are retried until --broker-timeout; these are ridden out.
    kafka.cluster.push_request_errors(Api::OffsetCommit, &[RDKafkaErrorCode::RequestTimedOut; 3]);

    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic.clone()]), "commits");
    job.stop_when_caught_up = false;
    job.max_batches = Some(3);
    let summary = run(job).await;
    assert_eq!((summary.batches, summary.records_in), (3, 5));
    assert_eq!(kafka.committed("commits", &topic, 1)[&0], Some(5));
}

/// Records of 900 kB: the mock cluster keeps about 5 MB per partition, so eight of them push
/// the first ones out of the log, as retention would.
fn fill_past_retention(broker: &BrokerProcess, topic: &str) {
    let big = "x".repeat(900_000);
    let lines: Vec<harness::Input> =
        (0..8).map(|n| harness::Input { partition: 0, key: None, value: format!("{n}{big}") }).collect();
    for line in lines {
        harness::produce(&broker.brokers, topic, &[line]);
    }
}

#[test]
fn a_start_offset_lost_to_retention_follows_the_policy_with_a_log_line() {
    let topic = harness::unique("retention");
    let broker = BrokerProcess::start(&[(&topic, 1)]);
    fill_past_retention(&broker, &topic);
    let log = harness::offsets(&broker.brokers, &topic, "nobody")[&0];
    let run = |policy: Option<&str>| {
        let mut command = harness::host();
        command.args([
            "run",
            "--plugin",
            sluice_plugin_artifacts::BUSY,
            "--brokers",
            &broker.brokers,
            "--topic",
            &topic,
        ]);
        command.args([
            "--group",
            &harness::unique("lost"),
            "--start",
            &format!("{topic}:0=0"),
            "--stop-when-caught-up",
        ]);
        command.args(["--batch-interval", "100ms"]);
        if let Some(policy) = policy {
            command.args(["--on-offset-out-of-range", policy]);
        }
        run_host(&mut command, Duration::from_secs(60))
    };

    run(None).assert_error(&[&format!("{topic}:0: offset 0 is outside the log"), "--on-offset-out-of-range"]);

    let earliest = run(Some("earliest"));
    earliest.assert_success();
    let gone = earliest.stderr();
    assert!(gone.contains("offsets [0, "), "{gone}");
    let summary = earliest.summary();
    // What was skipped plus what was read is the whole log.
    let skipped: i64 = regex::Regex::new(r"skipped (\d+) offsets, continuing at (\d+)")
        .unwrap()
        .captures(&gone)
        .map(|c| c[1].parse().unwrap())
        .unwrap_or_else(|| panic!("no skip line in:\n{gone}"));
    assert!(skipped > 0);
    assert_eq!(skipped + summary.records_in as i64, log.end);

    let latest = run(Some("latest"));
    latest.assert_success();
    assert!(
        latest.stderr().contains(&format!("skipped {} offsets, continuing at {}", log.end, log.end)),
        "{}",
        latest.stderr()
    );
    assert_eq!(latest.summary().records_in, 0);
}
