//! Windows (`reduceByKeyAndWindow`) and state timeouts (`mapWithState`) in-process against
//! `MockCluster`, checked against a brute-force computation from the batches' offset ranges,
//! across a restart of the engine on the same checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sluice_host::config::{JobConfig, Topics, WindowSpec};
use sluice_host::engine::BatchReport;

use crate::mock_kafka::{MockKafka, Record, run_observed};

const INTERVAL: Duration = Duration::from_millis(200);
const PARTITIONS: i32 = 2;

/// What was produced, by partition and offset, so a batch's words can be recomputed from its
/// offset ranges.
#[derive(Default)]
struct Produced {
    lines: BTreeMap<i32, Vec<String>>,
}

impl Produced {
    fn produce(&mut self, kafka: &MockKafka, topic: &str, lines: &[(i32, String)]) {
        let records: Vec<Record<'_>> = lines.iter().map(|(partition, line)| Record::new(*partition, line)).collect();
        kafka.produce(topic, &records);
        for (partition, line) in lines {
            self.lines.entry(*partition).or_default().push(line.clone());
        }
    }

    /// The lines a batch read.
    fn batch_lines<'a>(&'a self, report: &'a BatchReport) -> impl Iterator<Item = &'a str> + 'a {
        report.ranges.iter().flat_map(move |range| {
            self.lines[&range.partition.partition][range.from as usize..range.until as usize].iter().map(String::as_str)
        })
    }
}

fn job(kafka: &MockKafka, plugin: &str, topic: &str, output: &str, checkpoint: &Path, batches: u64) -> JobConfig {
    let mut job = kafka.job(plugin, Topics::Named(vec![topic.to_string()]), "windows");
    job.batch_interval = INTERVAL;
    job.output_topic = Some(output.to_string());
    job.checkpoint = Some(checkpoint.to_path_buf());
    job.stop_when_caught_up = false;
    job.max_batches = Some(batches);
    job.kafka = vec![("fetch.wait.max.ms".into(), "20".into())];
    job
}

/// Runs `job` for its batches, producing a few lines (chosen by `lines_for`, from the batch
/// count so far) after each batch, and returns the reports.
async fn run_producing(
    kafka: &MockKafka,
    topic: &str,
    produced: &mut Produced,
    job: JobConfig,
    lines_for: impl Fn(usize) -> Vec<(i32, String)>,
) -> Vec<BatchReport> {
    let mut batch = 0;
    let (_, reports) = run_observed(job, |_| {
        produced.produce(kafka, topic, &lines_for(batch));
        batch += 1;
    })
    .await;
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_counts_equal_a_brute_force_count_across_a_restart() {
    let kafka = MockKafka::new();
    let (topic, output) = (kafka.topic("words", PARTITIONS), kafka.topic("windows", 1));
    let dir = tempfile::tempdir().unwrap();
    let window = WindowSpec::new(INTERVAL * 3, Some(INTERVAL * 2), INTERVAL).unwrap();
    let mut produced = Produced::default();
    // Words vary by batch so that windows differ; some batches get no input at all.
    let lines_for = |offset: usize| {
        move |batch: usize| -> Vec<(i32, String)> {
            let n = batch + offset;
            if n % 5 == 3 {
                return Vec::new();
            }
            (0..1 + n % 3).map(|i| ((i % 2) as i32, format!("w{} w{} common", n % 4, (n + i) % 6))).collect()
        }
    };
    let mut reports = Vec::new();
    for (run, batches) in [(0, 12), (1, 10)] {
        let mut job = job(&kafka, sluice_plugin_artifacts::WINDOWED_COUNT, &topic, &output, dir.path(), batches);
        job.window = Some(window);
        reports.extend(run_producing(&kafka, &topic, &mut produced, job, lines_for(run * 100)).await);
    }

    // Brute force: at every batch whose time is a multiple of the slide, the counts of the
    // words read by the batches of (end - window, end].
    let (length, slide) = (window.length.as_millis() as i64, window.slide.as_millis() as i64);
    let mut expected: BTreeMap<i64, BTreeMap<String, u64>> = BTreeMap::new();
    for end in reports.iter().map(|r| r.batch_time).filter(|time| time % slide == 0) {
        let counts = expected.entry(end).or_default();
        for report in reports.iter().filter(|r| r.batch_time > end - length && r.batch_time <= end) {
            for word in produced.batch_lines(report).flat_map(str::split_whitespace) {
                *counts.entry(word.to_string()).or_insert(0) += 1;
            }
        }
    }
    let mut actual: BTreeMap<i64, BTreeMap<String, u64>> = expected.keys().map(|end| (*end, BTreeMap::new())).collect();
    for record in kafka.records(&output) {
        let end: i64 = record.headers["window-end"].parse().unwrap();
        let (word, count) = record.value.trim_matches(|c| c == '(' || c == ')').split_once(',').unwrap();
        assert_eq!(record.key.as_deref(), Some(word), "results are keyed by their word");
        let previous = actual.entry(end).or_default().insert(word.to_string(), count.parse().unwrap());
        assert_eq!(previous, None, "one result per word and window");
    }
    assert!(expected.values().filter(|counts| !counts.is_empty()).count() >= 6, "enough windows: {expected:?}");
    assert_eq!(actual, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_time_out_after_the_idle_period_and_only_then_across_a_restart() {
    let kafka = MockKafka::new();
    let (topic, output) = (kafka.topic("clicks", PARTITIONS), kafka.topic("sessions", 1));
    let dir = tempfile::tempdir().unwrap();
    let timeout = INTERVAL * 3;
    let mut produced = Produced::default();
    // Users click in bursts with gaps of varying length: some gaps exceed the timeout.
    let lines_for = |offset: usize| {
        move |batch: usize| -> Vec<(i32, String)> {
            let n = batch + offset;
            let mut lines = Vec::new();
            for user in 0..4usize {
                let active = match user {
                    0 => n % 7 < 2,           // bursts, idle 5 batches between
                    1 => n.is_multiple_of(3), // idle 2 batches: never times out in a run
                    2 => n < 3,               // a single early session
                    _ => n % 9 == 4,          // rare
                };
                if active {
                    lines.push(((user % 2) as i32, format!("u{user} click{n}")));
                }
            }
            lines
        }
    };
    let mut reports = Vec::new();
    for (run, batches) in [(0, 14), (1, 14)] {
        let mut job = job(&kafka, sluice_plugin_artifacts::SESSIONS, &topic, &output, dir.path(), batches);
        job.state_timeout = Some(timeout);
        reports.extend(run_producing(&kafka, &topic, &mut produced, job, lines_for(run * 50)).await);
    }

    // Brute force: a user's session is timed out at the first batch at least `timeout` after
    // the last batch that had one of its events, and summarises the events since it began.
    struct Open {
        events: u64,
        first: i64,
        last: i64,
    }
    let timeout = timeout.as_millis() as i64;
    let mut open: BTreeMap<String, Open> = BTreeMap::new();
    let mut expected: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for report in &reports {
        let time = report.batch_time;
        let mut touched: BTreeMap<String, u64> = BTreeMap::new();
        for line in produced.batch_lines(report) {
            *touched.entry(line.split_whitespace().next().unwrap().to_string()).or_insert(0) += 1;
        }
        let idle: Vec<String> = open
            .iter()
            .filter(|(user, s)| time - s.last >= timeout && !touched.contains_key(*user))
            .map(|(u, _)| u.clone())
            .collect();
        for user in idle {
            let session = open.remove(&user).unwrap();
            let summary =
                format!("user={user} events={} first={} last={}", session.events, session.first, session.last);
            expected.entry(time).or_default().push(summary);
        }
        for (user, events) in touched {
            let session = open.entry(user).or_insert(Open { events: 0, first: time, last: time });
            session.events += events;
            session.last = time;
        }
    }
    let fired: usize = expected.values().map(Vec::len).sum();
    assert!(fired >= 4, "the input makes sessions time out: {expected:?}");

    // Each batch delivered exactly the summaries due at it, no earlier and no later.
    let per_batch: BTreeMap<i64, usize> = reports.iter().map(|r| (r.batch_time, r.outputs)).collect();
    for (time, outputs) in &per_batch {
        assert_eq!(*outputs, expected.get(time).map_or(0, Vec::len), "summaries delivered by batch {time} ms");
    }
    let mut actual: Vec<String> = kafka.records(&output).into_iter().map(|record| record.value).collect();
    let mut summaries: Vec<String> = expected.into_values().flatten().collect();
    actual.sort();
    summaries.sort();
    assert_eq!(actual, summaries);
}
