//! Restarts that used to go wrong: a batch that failed for its size failed again on every
//! restart (a replayed plan ignored the bounds), and a `--start` in a job file rewound the job
//! on every restart. A replayed batch now runs in pieces within the current bounds, and a
//! `--start` seeks once.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};

use crate::harness::{BrokerProcess, Input, host, produce, run_host, unique};
use crate::stateful::{Seeded, assert_everything_read, checkpoint_state, count, lines, stateful_job};

const LIMIT: Duration = Duration::from_secs(300);

/// A million lines of two words from a thousand, over 16 partitions (the mock cluster keeps
/// about 100,000 records per partition), produced with librdkafka; returns the word counts.
fn produce_backlog(brokers: &str, topic: &str) -> BTreeMap<String, u64> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let mut counts = BTreeMap::new();
    for n in 0..1_000_000u64 {
        let (a, b) = (format!("w{}", n % 1000), format!("w{}", (n * 7 + 3) % 1000));
        let line = format!("{a} {b}");
        *counts.entry(a).or_insert(0) += 1;
        *counts.entry(b).or_insert(0) += 1;
        let record = BaseRecord::<(), _>::to(topic).payload(&line).partition((n % 16) as i32);
        producer.send(record).map_err(|(error, _)| error).unwrap();
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    counts
}

#[test]
fn a_backlog_batch_that_crashed_is_replayed_in_pieces_within_smaller_bounds_exactly() {
    let (topic, output) = (unique("backlog"), unique("backlog-out"));
    let broker = BrokerProcess::start(&[(&topic, 16), (&output, 4)]);
    let expected = produce_backlog(&broker.brokers, &topic);
    let group = unique("backlog");
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let job = || {
        let mut command = host();
        command
            .args(["run", "--plugin", sluice_plugin_artifacts::WORDCOUNT, "--brokers", &broker.brokers])
            .args(["--topic", &topic, "--group", &group, "--output-topic", &output])
            .args(["--auto-offset-reset", "earliest", "--stop-when-caught-up", "--checkpoint"])
            .arg(&checkpoint);
        command
    };
    // The whole backlog in one batch, and a crash once it is processed and delivered.
    let mut first = job();
    first
        .args(["--max-records-per-partition", "1000000", "--max-bytes-per-partition", "1GiB"])
        .env(sluice_host::failpoint::VARIABLE, "deliver:1");
    let crashed = run_host(&mut first, LIMIT);
    assert!(crashed.stderr().contains("crashing at deliver #1"), "{}", crashed.stderr());

    // Restarted with the default bounds' fifth: the planned batch runs in pieces, each committed.
    let mut second = job();
    second.args(["--max-records-per-partition", "20000"]);
    let replayed = run_host(&mut second, LIMIT);
    replayed.assert_success();
    let log = replayed.stderr();
    let pieces = log.matches("is larger than the batch bounds; the rest runs next").count();
    assert_eq!(pieces, 3, "62,500 records per partition in pieces of 20,000:\n{log}");
    assert_eq!(replayed.summary().records_in, 1_000_000, "every record once");
    assert_eq!(checkpoint_state(&checkpoint), expected, "state counts each record once");
    assert_everything_read(&broker.brokers, &topic, &group, &checkpoint);
}

#[test]
fn a_start_in_a_job_file_seeks_once_across_restarts() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, 2), (&output, 2)]);
    let group = unique("start");
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let job_file = dir.path().join("job.toml");
    let write_job = |start: i64| {
        std::fs::write(&job_file, format!("[start]\n\"{topic}:0\" = {start}\n\"{topic}:1\" = {start}\n")).unwrap();
    };
    let mut random = Seeded(77);
    let mut produced: Vec<Input> = Vec::new();
    write_job(0);
    for run in 0..3 {
        let more =
            lines(&mut random, 40).into_iter().map(|i| Input { partition: i.partition % 2, ..i }).collect::<Vec<_>>();
        produce(&broker.brokers, &topic, &more);
        produced.extend(more);
        let mut command =
            stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint);
        command.arg("--config").arg(&job_file);
        let result = run_host(&mut command, LIMIT);
        result.assert_success();
        let log = result.stderr();
        if run == 0 {
            assert!(log.contains("starts at offset 0 (--start)"), "{log}");
        } else {
            assert!(log.contains("--start 0 was applied before; ignored"), "run {run}:\n{log}");
        }
        assert_eq!(checkpoint_state(&checkpoint), count(&produced), "run {run} counts each record once");
    }
    // A new value seeks again: partition 0 is re-read from offset 5.
    write_job(5);
    let mut command =
        stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint);
    command.arg("--config").arg(&job_file);
    let result = run_host(&mut command, LIMIT);
    result.assert_success();
    assert!(result.stderr().contains("starts at offset 5 (--start)"), "{}", result.stderr());
    let re_read: Vec<Input> = [0, 1]
        .iter()
        .flat_map(|&partition| produced.iter().filter(move |i| i.partition == partition).skip(5).cloned())
        .collect();
    let mut expected = count(&produced);
    for (word, n) in count(&re_read) {
        *expected.get_mut(&word).unwrap() += n;
    }
    assert_eq!(checkpoint_state(&checkpoint), expected, "a new --start is a decision to re-read");
}

/// Runs misbehave over `clock` records, crashing once its first batch is delivered, then again
/// to replay that batch; returns the outputs of both runs, in order.
fn clock_readings_over_a_replay(grants: &[&str]) -> (Vec<String>, Vec<String>) {
    let (topic, output) = (unique("clock"), unique("clock-out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let inputs: Vec<Input> = (0..5).map(|_| Input { partition: 0, key: None, value: "clock".into() }).collect();
    produce(&broker.brokers, &topic, &inputs);
    let dir = tempfile::tempdir().unwrap();
    let job = || {
        let mut command = host();
        command
            .args(["run", "--plugin", sluice_plugin_artifacts::MISBEHAVE, "--brokers", &broker.brokers])
            .args(["--topic", &topic, "--group", "clock", "--output-topic", &output, "--batch-interval", "200ms"])
            .args(["--auto-offset-reset", "earliest", "--stop-when-caught-up", "--checkpoint"])
            .arg(dir.path())
            .args(grants);
        command
    };
    let crashed = run_host(job().env(sluice_host::failpoint::VARIABLE, "deliver:1"), LIMIT);
    assert!(crashed.stderr().contains("crashing at deliver #1"), "{}", crashed.stderr());
    run_host(&mut job(), LIMIT).assert_success();
    let values: Vec<String> =
        crate::harness::consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    assert_eq!(values.len(), 10, "the batch delivered twice: before the crash and by its replay");
    let (first, replay) = values.split_at(5);
    (first.to_vec(), replay.to_vec())
}

#[test]
fn a_replayed_batch_reads_the_clock_and_randomness_its_first_run_read() {
    let (first, replay) = clock_readings_over_a_replay(&[]);
    assert_eq!(first, replay, "the replay produced other outputs");
    let readings: Vec<(i64, u64, u64)> = first
        .iter()
        .map(|value| {
            let fields: Vec<&str> = value.split(' ').collect();
            (fields[1].parse().unwrap(), fields[2].parse().unwrap(), fields[3].parse().unwrap())
        })
        .collect();
    let (wall, elapsed, _) = readings[0];
    assert_eq!(wall % 200, 0, "the wall clock reads the batch time, a tick of the 200 ms interval");
    assert!(readings.iter().all(|reading| reading.0 == wall && reading.1 == 0), "time stands still: {readings:?}");
    assert_eq!(elapsed, 0);
    let randoms: std::collections::BTreeSet<u64> = readings.iter().map(|reading| reading.2).collect();
    assert_eq!(randoms.len(), 5, "each record draws another number from the batch's stream");
}

#[test]
fn with_the_real_clock_and_randomness_granted_a_replay_reads_others() {
    let (first, replay) = clock_readings_over_a_replay(&["--allow-wall-clock", "--allow-random"]);
    for (first, replay) in first.iter().zip(&replay) {
        assert_ne!(first, replay);
    }
}
