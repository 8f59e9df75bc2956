//! Watching a running job from outside: `/metrics` scraped and parsed by Prometheus' own Python
//! client, the Streaming page opened in a real browser (Debian's chromium, driven by
//! playwright-core), and `host status` read by a person. Every number is checked against the
//! batch log and against independent Kafka clients.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::Value;

use crate::harness::{
    BrokerProcess, Input, LoggedBatch, Running, consume, etl_case, host, logged_batches, offsets, produce, run_host,
    unique, upgrade_in_background,
};
use crate::stateful::{Seeded, count, lines};

const LIMIT: Duration = Duration::from_secs(60);

/// Metric families as `tests/clients/metrics_check.py` reports them.
struct Scrape(BTreeMap<String, Value>);

impl Scrape {
    fn take(address: &str) -> Scrape {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/metrics_check.py");
        let output = Command::new("python3").arg(script).arg(format!("http://{address}/metrics")).output().unwrap();
        assert!(output.status.success(), "scrape failed: {}", String::from_utf8_lossy(&output.stderr));
        Scrape(serde_json::from_slice(&output.stdout).unwrap())
    }

    /// Samples named `sample` whose labels include every `(name, value)` of `labels`.
    fn samples<'a>(&'a self, sample: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Value> + 'a {
        self.0.values().flat_map(|family| family["samples"].as_array().unwrap()).filter(move |s| {
            s["name"] == sample && labels.iter().all(|(name, value)| s["labels"][name].as_str() == Some(value))
        })
    }

    /// The sum of the matching samples.
    fn sum(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(sample, labels).map(|s| s["value"].as_f64().unwrap()).sum()
    }

    fn kind(&self, family: &str) -> &str {
        self.0[family]["type"].as_str().unwrap()
    }
}

/// The address `--metrics-address 127.0.0.1:0` ended up on, from the job's log.
fn metrics_address(running: &mut Running) -> String {
    running.wait_for("metrics on http://");
    let line = running.seen.iter().rev().find(|l| l.contains("metrics on http://")).unwrap();
    Regex::new(r"metrics on http://([\d.:]+)/metrics").unwrap().captures(line).unwrap()[1].to_string()
}

fn wait_caught_up(brokers: &str, topic: &str, group: &str) {
    let started = Instant::now();
    while !offsets(brokers, topic, group).values().all(|o| o.committed == Some(o.end)) {
        assert!(started.elapsed() < LIMIT, "the job did not catch up with {topic}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn etl_job(brokers: &str, topic: &str, output: &str, dead_letters: &str, dir: &Path) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ETL, "--brokers", brokers, "--topic", topic])
        .args(["--group", "monitoring", "--output-topic", output, "--dead-letter-topic", dead_letters])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "500ms", "--metrics-address", "127.0.0.1:0"])
        .args(["--max-records-per-partition", "40", "--page-batches", "30"])
        .arg("--checkpoint")
        .arg(dir);
    command
}

#[test]
fn metrics_and_the_streaming_page_show_what_the_log_and_independent_clients_see() {
    let (topic, output, dead) = (unique("access"), unique("clean"), unique("dead"));
    let broker = BrokerProcess::start(&[(&topic, 3), (&output, 1), (&dead, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let case = etl_case(0, 600, 3);
    produce(&broker.brokers, &topic, &case.lines[..300]);
    let mut running = Running::start(etl_job(&broker.brokers, &topic, &output, &dead, dir.path()));
    let address = metrics_address(&mut running);
    wait_caught_up(&broker.brokers, &topic, "monitoring");
    // A new checkpoint's first build is the lineage from its first batch on.
    let before = open_page(&address);
    assert_eq!(before["lineage"].as_array().unwrap().len(), 1, "{}", before["lineage"]);
    assert!(before["lineage"][0].as_str().unwrap().starts_with("etl 0.1.0"), "{}", before["lineage"]);
    // The new build's probation needs batches with records: they arrive while it waits.
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::ETL_V2, dir.path(), &[]);
    running.wait_for("switching from etl 0.1.0");
    for chunk in case.lines[300..].chunks(50) {
        produce(&broker.brokers, &topic, chunk);
    }
    upgrading.join().unwrap().assert_success();
    wait_caught_up(&broker.brokers, &topic, "monitoring");

    let page = open_page(&address);
    let scrape = Scrape::take(&address);
    let log = running.stop();
    let batches = logged_batches(&log);

    // Counters: what the batch log totals and the independent clients count.
    let total = |field: fn(&LoggedBatch) -> u64| batches.iter().map(field).sum::<u64>() as f64;
    assert_eq!(scrape.kind("sluice_input_records"), "counter");
    assert_eq!(scrape.sum("sluice_input_records_total", &[("topic", &topic)]), 600.0);
    assert_eq!(total(|b| b.records_in), 600.0);
    let delivered = consume(&broker.brokers, &output).len() as f64;
    assert_eq!(delivered, case.expected.len() as f64);
    assert_eq!(scrape.sum("sluice_output_records_total", &[("topic", &output)]), delivered);
    assert_eq!(total(|b| b.outputs), delivered);
    assert_eq!(scrape.sum("sluice_rejected_records_total", &[("topic", &topic)]), case.malformed as f64);
    assert_eq!(total(|b| b.rejected), case.malformed as f64);
    let dead_letters = consume(&broker.brokers, &dead).len() as f64;
    assert_eq!(dead_letters, case.malformed as f64);
    assert_eq!(scrape.sum("sluice_dead_letters_total", &[]), dead_letters);

    // Histograms hold every batch the scrape counted, and the log shows at least those.
    let counted = scrape.sum("sluice_batches_total", &[]);
    assert!(counted >= 15.0 && counted <= batches.len() as f64, "{counted} batches vs {} logged", batches.len());
    for histogram in ["sluice_batch_processing_seconds", "sluice_batch_scheduling_delay_seconds"] {
        assert_eq!(scrape.kind(histogram), "histogram");
        assert_eq!(scrape.sum(&format!("{histogram}_count"), &[]), counted, "{histogram}");
    }
    assert_eq!(scrape.sum("sluice_batch_phase_seconds_count", &[("phase", "plugin")]), counted);
    // A plugin call per partition per batch (idle ones too); a checkpoint commit per batch with records,
    // except that the three batches of the probation commit together.
    let with_records = batches.iter().filter(|b| b.records_in > 0);
    let tasks: usize = with_records.clone().map(|b| b.ranges.len()).sum();
    assert!(scrape.sum("sluice_plugin_task_seconds_count", &[]) >= tasks as f64);
    let commits = scrape.sum("sluice_checkpoint_commit_seconds_count", &[]);
    assert!(commits >= (with_records.count() - 2) as f64 && commits <= counted, "{commits} checkpoint commits");
    assert_eq!(scrape.samples("sluice_partition_lag_records", &[("topic", &topic)]).count(), 3);
    assert_eq!(scrape.sum("sluice_partition_lag_records", &[("topic", &topic)]), 0.0);
    assert_eq!(scrape.sum("sluice_upgrades_total", &[("outcome", "upgraded")]), 1.0);
    assert_eq!(scrape.sum("sluice_plugin_build_info", &[("name", "etl"), ("version", "2.0.0")]), 1.0);
    assert_eq!(scrape.samples("sluice_plugin_build_info", &[]).count(), 1, "only the running build");
    assert!(scrape.sum("sluice_process_resident_memory_bytes", &[]) > 1e6);
    assert!(scrape.sum("sluice_plugin_instance_memory_bytes", &[]) > 0.0);

    // The page: its batches are the log's, with the log's ranges; the lineage has both builds.
    let shown = page["batches"].as_array().unwrap();
    assert!(!shown.is_empty() && shown.len() <= 30, "{page}");
    let by_time: BTreeMap<i64, &LoggedBatch> = batches.iter().map(|b| (b.time, b)).collect();
    let mut opened = 0;
    for row in shown {
        let time = row["batch_time_ms"].as_i64().unwrap();
        let logged = by_time.get(&time).unwrap_or_else(|| panic!("page shows batch {time}, the log does not"));
        assert_eq!(row["records_in"].as_u64(), Some(logged.records_in), "batch {time}");
        assert_eq!(row["outputs"].as_u64(), Some(logged.outputs), "batch {time}");
        if let Some(ranges) = row["ranges"].as_array() {
            let ranges: Vec<String> = ranges
                .iter()
                .filter(|r| r["from"] != r["until"])
                .map(|r| format!("{}:{} [{}, {})", r["topic"].as_str().unwrap(), r["partition"], r["from"], r["until"]))
                .collect();
            assert_eq!(ranges, logged.ranges, "ranges of batch {time}");
            assert!(row["build"].as_str().unwrap().starts_with("etl 2.0.0"), "{row}");
            opened += 1;
        }
    }
    assert_eq!(opened, 3, "the driver opened three batches");
    let lineage: Vec<&str> = page["lineage"].as_array().unwrap().iter().map(|b| b.as_str().unwrap()).collect();
    assert!(
        lineage.len() == 2 && lineage[0].starts_with("etl 0.1.0") && lineage[1].starts_with("etl 2.0.0"),
        "{lineage:?}"
    );
    assert_eq!(page["upgrades"], serde_json::json!([{"outcome": "upgraded"}]));
    assert_eq!(page["lag_rows"], 3);
    assert!(page["charts"].as_u64().unwrap() >= 8, "four timelines and four histograms: {page}");
    let shot = &page["screenshot"];
    assert!(shot["width"].as_u64().unwrap() >= 800 && shot["distinct_colours"].as_u64().unwrap() > 20, "{shot}");
}

/// Opens the Streaming page in headless chromium, opens the three newest batches, and returns
/// what the page shows (see tests/browser/streaming_page.mjs).
fn open_page(address: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/browser/streaming_page.mjs");
    let shot = std::env::temp_dir().join(format!("{}.png", unique("streaming-page")));
    let output = Command::new("node")
        .arg(script)
        .arg(format!("http://{address}/"))
        .arg(&shot)
        .args(["--expand", "3"])
        .output()
        .unwrap();
    assert!(output.status.success(), "the browser driver failed: {}", String::from_utf8_lossy(&output.stderr));
    let _ = std::fs::remove_file(shot);
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn state_metrics_count_the_keys_and_status_reads_as_lines() {
    let topic = unique("words");
    let broker = BrokerProcess::start(&[(&topic, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let input = lines(&mut Seeded(7), 400);
    produce(&broker.brokers, &topic, &input);
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::WORDCOUNT, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", "monitoring", "--auto-offset-reset", "earliest", "--batch-interval", "300ms"])
        .args(["--metrics-address", "127.0.0.1:0", "--parallelism", "4"])
        .arg("--checkpoint")
        .arg(dir.path());
    let mut running = Running::start(command);
    let address = metrics_address(&mut running);
    wait_caught_up(&broker.brokers, &topic, "monitoring");
    // One more batch after the last commit, so the sizes the scrape shows include it.
    let seen = running.drain_log().len();
    while logged_batches(&running.drain_log()[seen..]).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let scrape = Scrape::take(&address);
    let words = count(&input).len() as f64;
    assert_eq!(scrape.samples("sluice_state_keys", &[]).count(), 4, "one gauge per state partition");
    assert_eq!(scrape.sum("sluice_state_keys", &[]), words);
    assert!(scrape.sum("sluice_state_bytes", &[]) > words);

    let status = run_host(host().args(["status", "--checkpoint"]).arg(dir.path()), LIMIT);
    status.assert_success();
    let text = status.stdout();
    assert!(text.starts_with("plugin       wordcount 0.1.0 (stateful plugin, state schema 1)\n"), "{text}");
    assert!(text.contains("\nlag          0 records\n"), "{text}");
    assert!(Regex::new(r"\nlast batch   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC").unwrap().is_match(&text), "{text}");
    assert!(text.contains("\ninput rate   "), "{text}");
    running.stop();

    // After a restart the sizes are counted from the checkpoint, then kept by the commits.
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::WORDCOUNT, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", "monitoring", "--batch-interval", "300ms", "--metrics-address", "127.0.0.1:0"])
        .arg("--checkpoint")
        .arg(dir.path());
    let mut running = Running::start(command);
    let address = metrics_address(&mut running);
    // Its first batch counted the sizes; words new to the state arrive after it.
    while logged_batches(running.drain_log()).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let more: Vec<Input> =
        (0..50).map(|n| Input { partition: n % 3, key: None, value: format!("fresh{n} w1") }).collect();
    produce(&broker.brokers, &topic, &more);
    wait_caught_up(&broker.brokers, &topic, "monitoring");
    let seen = running.drain_log().len();
    while logged_batches(&running.drain_log()[seen..]).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let all: Vec<_> = input.iter().chain(&more).cloned().collect();
    assert_eq!(Scrape::take(&address).sum("sluice_state_keys", &[]), count(&all).len() as f64);
    running.stop();
}

#[test]
fn a_backfill_reports_its_progress_with_what_is_left_the_rate_and_an_eta() {
    let topic = unique("backlog");
    let broker = BrokerProcess::start(&[(&topic, 3)]);
    let backlog: Vec<Input> =
        (0..1_500).map(|n| Input { partition: n % 3, key: None, value: format!("record {n}") }).collect();
    produce(&broker.brokers, &topic, &backlog);
    // 150 records/s per partition over 1,500 records: about 3.5 s behind, long enough to report.
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::BUSY, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", "backfill", "--auto-offset-reset", "earliest", "--batch-interval", "200ms"])
        .args(["--max-rate-per-partition", "150", "--stop-when-caught-up"]);
    let run = run_host(&mut command, LIMIT);
    run.assert_success();
    let log = run.stderr();
    // stderr is a pipe here, so progress comes as log lines rather than a bar.
    let line = Regex::new(r"catching up: (\d+) of (\d+) records \((\d+)%\), (\d+) left, (\d+) records/s, ETA (\d+) s")
        .unwrap();
    let reports: Vec<[u64; 6]> =
        line.captures_iter(&log).map(|c| std::array::from_fn(|i| c[i + 1].parse().unwrap())).collect();
    assert!(!reports.is_empty(), "no progress line in:\n{log}");
    for [done, total, _, left, rate, _] in &reports {
        assert_eq!(*total, 1_500, "{log}");
        assert_eq!(done + left, 1_500);
        assert!(*rate > 100 && *rate < 1_000, "about 450 records/s: {rate}");
    }
    let done = Regex::new(r"catching up: done, (\d+) records in").unwrap().captures(&log);
    assert_eq!(done.map(|c| c[1].to_string()), Some("1500".to_string()), "{log}");
    assert_eq!(run.summary().records_in, 1_500);
}
