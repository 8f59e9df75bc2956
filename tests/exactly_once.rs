//! `--delivery exactly-once` on Tansu, a broker with a real transaction coordinator nobody here
//! wrote: jobs killed at seeded moments and at every crash point, then judged by what a
//! `read_committed` reader sees. Tansu's fetch lists no aborted transactions, so the checking
//! side reads the output's raw record batches and control records (`committed_view`) instead of
//! trusting a client's filter.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{
    CommittedView, Input, Running, TansuBroker, committed_view, etl_case, host, offsets, produce_one_by_one, run_host,
    unique, upgrade_in_background,
};
use crate::stateful::{Seeded, count, lines, word_counts};

const LIMIT: Duration = Duration::from_secs(120);

/// `host run` of `plugin` with exactly-once delivery as member `instance`.
fn job(plugin: &str, brokers: &str, topic: &str, output: &str, group: &str, instance: &str) -> Command {
    job_every("100ms", plugin, brokers, topic, output, group, instance)
}

/// As [`job`], with batches every `interval`.
fn job_every(
    interval: &str,
    plugin: &str,
    brokers: &str,
    topic: &str,
    output: &str,
    group: &str,
    instance: &str,
) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", plugin, "--brokers", brokers, "--topic", topic, "--group", group])
        .args(["--output-topic", output, "--instance-id", instance, "--delivery", "exactly-once"])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", interval, "--kafka", "fetch.wait.max.ms=20"]);
    command
}

/// Waits until the group has committed the end of every partition of `topic`; on a timeout
/// shows what `hosts` logged.
fn wait_caught_up(brokers: &str, topic: &str, group: &str, hosts: &mut [&mut Running]) {
    let started = Instant::now();
    while !offsets(brokers, topic, group).values().all(|o| o.committed == Some(o.end)) {
        if started.elapsed() > LIMIT {
            let logs: Vec<String> = hosts.iter_mut().map(|host| host.drain_log().join("\n")).collect();
            panic!(
                "the group did not catch up with {topic}: {:?}\n{}",
                offsets(brokers, topic, group),
                logs.join("\n\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The committed outputs' values, sorted.
fn values(view: &CommittedView) -> Vec<String> {
    let mut values: Vec<String> = view.records.iter().map(|r| r.value.clone().unwrap()).collect();
    values.sort();
    values
}

#[test]
fn etl_killed_at_seeded_moments_commits_every_output_exactly_once() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = TansuBroker::start(&[(&topic, 2), (&output, 2)]);
    let case = etl_case(0, 400, 2);
    produce_one_by_one(&broker.brokers, &topic, &case.lines);
    let mut random = Seeded(17);
    let etl = || {
        let mut command = job(sluice_plugin_artifacts::ETL, &broker.brokers, &topic, &output, &group, "etl-1");
        // Slow enough that every cycle is killed with work left, in any phase of a batch.
        command.args(["--max-rate-per-partition", "20"]);
        command
    };
    let mut cycles = 0;
    for cycle in 0..24 {
        let mut command = etl();
        if cycle % 6 == 5 {
            // A transaction's window is a few milliseconds a batch, which a kill at a random
            // moment seldom hits: every sixth run dies with its outputs sent and its
            // transaction open, so aborted transactions are certain to be in the log.
            command.env("SLUICE_CRASH_AT", "deliver:2");
            let mut running = Running::start(command);
            running.wait_for("assigned");
            assert_ne!(running.exit_code(), Some(0), "the crash point was reached");
        } else {
            let mut running = Running::start(command);
            running.wait_for("assigned");
            std::thread::sleep(Duration::from_millis(50 + random.next(700)));
            running.kill();
        }
        cycles += 1;
    }
    let mut last = etl();
    last.arg("--stop-when-caught-up");
    run_host(&mut last, LIMIT).assert_success();

    let view = committed_view(&broker.brokers, &output);
    let mut expected = case.expected.clone();
    expected.sort();
    assert_eq!(values(&view), expected, "every valid line once in what read_committed readers see");
    // Without aborted transactions in the log the kills proved nothing.
    assert!(view.aborted > 0, "no aborted transaction after {cycles} kills: {} committed", view.records.len());
    assert_eq!(view.open, 0, "a transaction left open");
    wait_caught_up(&broker.brokers, &topic, &group, &mut []);
    eprintln!("exactly-once ETL: {cycles} kills, {} records of aborted transactions in the log", view.aborted);
}

#[test]
fn word_count_crashing_at_every_phase_keeps_outputs_and_state_exact() {
    let (topic, output, group) = (unique("words"), unique("counts"), unique("wordcount"));
    let broker = TansuBroker::start(&[(&topic, 3), (&output, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let inputs = lines(&mut Seeded(5), 120);
    let word_count = || {
        let mut command = job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &output, &group, "wc-1");
        command.arg("--checkpoint").arg(dir.path()).args(["--max-rate-per-partition", "40"]);
        command
    };
    let mut sent = 0;
    // `commit` is between the transaction's commit and the checkpoint's.
    for phase in ["fetch", "record", "plugin", "deliver", "commit", "checkpoint"] {
        let batch: Vec<Input> = inputs[sent..sent + 20].to_vec();
        sent += batch.len();
        produce_one_by_one(&broker.brokers, &topic, &batch);
        let mut crashing = word_count();
        crashing.env("SLUICE_CRASH_AT", format!("{phase}:1"));
        let run = run_host(&mut crashing, LIMIT);
        assert!(!run.success(), "{phase}: the crash point was reached\n{}", run.stderr());
    }
    let mut last = word_count();
    last.arg("--stop-when-caught-up");
    run_host(&mut last, LIMIT).assert_success();

    let expected = count(&inputs[..sent]);
    assert_eq!(word_counts(dir.path()), expected, "state counts every record once");
    // Outputs: per word, the running totals a read_committed reader sees rise strictly and end
    // at the word's count. A replay that delivered again would repeat a total.
    let view = committed_view(&broker.brokers, &output);
    let mut totals: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for record in &view.records {
        let value = record.value.as_deref().unwrap();
        let (word, total) = value.trim_matches(|c| c == '(' || c == ')').split_once(',').unwrap();
        totals.entry(word.to_string()).or_default().push(total.parse().unwrap());
    }
    for (word, seen) in &totals {
        assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "{word}: totals {seen:?} repeat or go back");
        assert_eq!(seen.last(), expected.get(word), "{word}: last total");
    }
    assert_eq!(totals.len(), expected.len(), "a total for every word");
    assert!(view.aborted > 0, "the crashes left aborted transactions in the log");
    wait_caught_up(&broker.brokers, &topic, &group, &mut []);
}

#[test]
fn a_stalled_host_whose_job_was_started_again_is_fenced_and_nothing_commits_twice() {
    let (topic, output, group) = (unique("events"), unique("out"), unique("busy"));
    let broker = TansuBroker::start(&[(&topic, 1), (&output, 1)]);
    let inputs: Vec<Input> = (0..150).map(|n| Input { partition: 0, key: None, value: format!("e{n}") }).collect();
    produce_one_by_one(&broker.brokers, &topic, &inputs[..50]);
    // Slow on purpose (tens of milliseconds a record), so the stall hits a batch in flight.
    let busy = || {
        let mut command = job(sluice_plugin_artifacts::BUSY, &broker.brokers, &topic, &output, &group, "busy-1");
        command.args(["--plugin-config", "work-per-record=30000000"]);
        command
    };
    let mut first = Running::start(busy());
    wait_caught_up(&broker.brokers, &topic, &group, &mut [&mut first]);
    produce_one_by_one(&broker.brokers, &topic, &inputs[50..100]);
    // The next batch (100 ms away) takes these fifty, for a second or more of plugin work: the
    // stall comes in the middle of it.
    std::thread::sleep(Duration::from_millis(500));
    let stalled = first.pid().to_string();
    let signal = |name: &str| assert!(Command::new("kill").args([name, &stalled]).status().unwrap().success());
    signal("-STOP");
    // The same job started again (the same group and instance): its producer fences the stalled
    // one's, and once the stalled member's session expires it takes the partition over.
    let mut second = Running::start(busy());
    wait_caught_up(&broker.brokers, &topic, &group, &mut [&mut second]);
    signal("-CONT");
    // Back, the first finishes its batch and cannot commit it: its transaction is fenced.
    first.wait_for("another instance with transactional id");
    assert_ne!(first.exit_code(), Some(0), "the fenced host stops with an error");
    produce_one_by_one(&broker.brokers, &topic, &inputs[100..]);
    wait_caught_up(&broker.brokers, &topic, &group, &mut [&mut second]);
    second.stop();

    let mut expected: Vec<String> = inputs.iter().map(|input| input.value.clone()).collect();
    expected.sort();
    let view = committed_view(&broker.brokers, &output);
    assert_eq!(values(&view), expected, "every record once, whoever wrote it");
}

#[test]
fn a_rolled_back_upgrade_leaves_no_output_of_the_new_build_visible() {
    let (topic, output, group) = (unique("events"), unique("out"), unique("upgrade"));
    let broker = TansuBroker::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let value = |value: String| Input { partition: 0, key: None, value };
    let inputs: Vec<Input> = (0..10)
        .map(|n| value(format!("ok-{n}")))
        .chain((10..20).map(|n| value(format!("held-{n}"))))
        .chain(std::iter::once(value("trap".into())))
        .collect();
    produce_one_by_one(&broker.brokers, &topic, &inputs[..10]);
    // Two-second batches of at most ten records: the new build's first batch takes held-10..19
    // however slowly they arrive, and `trap` falls into its second.
    let mut command =
        job_every("2s", sluice_plugin_artifacts::BUSY, &broker.brokers, &topic, &output, &group, "busy-1");
    command.arg("--checkpoint").arg(dir.path()).args(["--max-rate-per-partition", "5"]);
    let mut running = Running::start(command);
    running.wait_for("admin endpoint on");
    wait_caught_up(&broker.brokers, &topic, &group, &mut [&mut running]);
    // misbehave echoes values as busy does, and traps on `trap`.
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::MISBEHAVE, dir.path(), &["--force"]);
    running.wait_for("switching from busy");
    // The new build's first batch is delivered into the transaction and held open, and its
    // second traps: the rollback aborts the transaction, busy runs both again.
    produce_one_by_one(&broker.brokers, &topic, &inputs[10..]);
    upgrading.join().unwrap().assert_error(&["rolled back from misbehave", "(trap)"]);
    wait_caught_up(&broker.brokers, &topic, &group, &mut [&mut running]);
    running.stop();

    let view = committed_view(&broker.brokers, &output);
    let mut expected: Vec<String> = inputs.iter().map(|input| input.value.clone()).collect();
    expected.sort();
    assert_eq!(values(&view), expected, "each value once: the held batch's outputs were aborted");
    assert!(view.aborted > 0, "the held batch's outputs are in the log, aborted");
}
