//! Misbehaving plugins (tests/components/misbehave) against the sandbox and the failure
//! policies: the host stays up, applies the policy, names the cause, never commits past an
//! unresolved failure, and dead-letters exactly the poison records.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::harness::{BrokerProcess, Input, consume, host, offsets, produce, run_host, unique};

const LIMIT: Duration = Duration::from_secs(60);

fn input(partition: i32, value: &str) -> Input {
    Input { partition, key: None, value: value.to_string() }
}

/// `host run` of the misbehave plugin from the start of `topic` until caught up, with a short
/// deadline, a small memory cap and one retry.
fn misbehave(brokers: &str, topic: &str, group: &str) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::MISBEHAVE, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--auto-offset-reset", "earliest", "--stop-when-caught-up"])
        .args([
            "--batch-interval",
            "200ms",
            "--task-deadline",
            "300ms",
            "--max-memory",
            "32MiB",
            "--task-retries",
            "1",
        ]);
    command
}

#[test]
fn each_misbehaviour_halts_the_job_by_default_naming_its_cause_and_commits_nothing() {
    let cases = [
        ("loop", "(deadline): ran past its deadline of 300ms"),
        ("alloc", "(memory): exceeded its memory limit"),
        ("huge 100000000", "(memory): exceeded its memory limit"),
        // The guest's own panic message, not only the wasm backtrace.
        ("panic", "(trap): panicked at"),
        ("trap", "(trap)"),
        ("fail", "(plugin-error): asked to fail the task"),
    ];
    let topics: Vec<String> = cases.iter().map(|_| unique("misbehave")).collect();
    let broker = BrokerProcess::start(&topics.iter().map(|topic| (topic.as_str(), 1)).collect::<Vec<_>>());
    for ((command, cause), topic) in cases.iter().zip(&topics) {
        produce(&broker.brokers, topic, &[input(0, "fine"), input(0, command), input(0, "also fine")]);
        let group = unique("halt");
        let run = run_host(&mut misbehave(&broker.brokers, topic, &group), LIMIT);
        run.assert_error(&["plugin misbehave failed on", cause, "after 1 retries; halting (--on-failure halt)"]);
        assert!(run.stderr().contains("retry 1 of"), "the task was retried:\n{}", run.stderr());
        assert_eq!(offsets(&broker.brokers, topic, &group)[&0].committed, None, "{command}: nothing committed");
    }
}

#[test]
fn dead_letters_hold_exactly_the_poison_records_and_every_other_record_goes_through_once() {
    let (topic, output, dlq) = (unique("mixed"), unique("out"), unique("dlq"));
    let broker = BrokerProcess::start(&[(&topic, 2), (&output, 1), (&dlq, 1)]);
    let mut records = Vec::new();
    for n in 0..40 {
        let value = match n {
            13 => "panic".to_string(),
            27 => "loop".to_string(),
            31 => "huge not-a-number".to_string(), // rejected by the plugin, with a reason
            n => format!("good-{n}"),
        };
        records.push(input(0, &value));
    }
    records.extend((0..10).map(|n| input(1, &format!("other-{n}"))));
    produce(&broker.brokers, &topic, &records);
    let group = unique("dead-letter");
    let mut command = misbehave(&broker.brokers, &topic, &group);
    command.args(["--on-failure", "dead-letter", "--dead-letter-topic", &dlq, "--output-topic", &output]);
    let run = run_host(&mut command, LIMIT);
    run.assert_success();

    let mut delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    delivered.sort();
    let mut expected: Vec<String> =
        records.iter().map(|r| r.value.clone()).filter(|v| v.starts_with("good-") || v.starts_with("other-")).collect();
    expected.sort();
    assert_eq!(delivered, expected, "every good record exactly once");

    let digest: String = Sha256::digest(std::fs::read(sluice_plugin_artifacts::MISBEHAVE).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dead: Vec<(i64, String, BTreeMap<String, Option<String>>)> = consume(&broker.brokers, &dlq)
        .into_iter()
        .map(|r| (r.headers["sluice-source-offset"].clone().unwrap().parse().unwrap(), r.value.unwrap(), r.headers))
        .collect();
    dead.sort_by_key(|(offset, _, _)| *offset);
    let summary: Vec<(i64, &str, &str)> = dead
        .iter()
        .map(|(offset, value, headers)| (*offset, value.as_str(), headers["sluice-error-kind"].as_deref().unwrap()))
        .collect();
    assert_eq!(summary, [(13, "panic", "trap"), (27, "loop", "deadline"), (31, "huge not-a-number", "rejected")]);
    for (_, _, headers) in &dead {
        assert_eq!(headers["sluice-source-topic"].as_deref(), Some(topic.as_str()));
        assert_eq!(headers["sluice-source-partition"].as_deref(), Some("0"));
        assert_eq!(headers["sluice-plugin"].as_deref(), Some("misbehave 0.1.0"));
        assert_eq!(headers["sluice-plugin-digest"].as_deref(), Some(digest.as_str()));
    }
    let panicked = dead[0].2["sluice-error"].as_deref().unwrap();
    assert!(panicked.contains("asked to panic at offset 13"), "the panic message is in the dead letter: {panicked}");
    assert!(dead[1].2["sluice-error"].as_deref().unwrap().contains("deadline of 300ms"));
    assert_eq!(dead[2].2["sluice-error"].as_deref(), Some("invalid digit found in string"));
    for (partition, offsets) in offsets(&broker.brokers, &topic, &group) {
        assert_eq!(offsets.committed, Some(offsets.end), "{topic}:{partition} committed once resolved");
    }
}

#[test]
fn skip_drops_only_the_failing_task_and_the_job_goes_on() {
    let (topic, output) = (unique("skip"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 2), (&output, 1)]);
    produce(&broker.brokers, &topic, &[input(0, "a"), input(0, "trap"), input(0, "b"), input(1, "c"), input(1, "d")]);
    let group = unique("skip");
    let mut command = misbehave(&broker.brokers, &topic, &group);
    command.args(["--on-failure", "skip", "--output-topic", &output]);
    let run = run_host(&mut command, LIMIT);
    run.assert_success();
    assert!(run.stderr().contains("skipping 3 records of"), "{}", run.stderr());
    assert!(run.stderr().contains("0 dead letters, 3 skipped"), "{}", run.stderr());
    let mut delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    delivered.sort();
    assert_eq!(delivered, ["c", "d"]);
}

#[test]
fn plugins_get_no_files_network_or_environment_unless_granted() {
    let (topic, output) = (unique("caps"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from the host").unwrap();
    let secret_file = dir.path().join("hello.txt");
    produce(
        &broker.brokers,
        &topic,
        &[
            input(0, "env SLUICE_TEST_SECRET"),
            input(0, &format!("read-file {}", secret_file.display())),
            input(0, "read-file /data/hello.txt"),
            input(0, &format!("connect {}", listener.local_addr().unwrap())),
            input(0, "print a line for the host log"),
        ],
    );

    let mut denied = misbehave(&broker.brokers, &topic, &unique("denied"));
    denied.env("SLUICE_TEST_SECRET", "host-only").args(["--print", "10"]);
    let run = run_host(&mut denied, LIMIT);
    run.assert_success();
    let answers: Vec<String> = run.stdout().lines().skip(3).take(5).map(str::to_string).collect();
    assert!(answers[..4].iter().all(|answer| answer.starts_with("denied: ")), "{answers:?}");
    assert!(listener.accept().is_err(), "no connection reached the host");
    assert!(
        run.stderr().contains("output: a line for the host log") && run.stderr().contains(r#"plugin="misbehave""#),
        "plugin stdout goes to the host log, tagged:\n{}",
        run.stderr()
    );

    let mut granted = misbehave(&broker.brokers, &topic, &unique("granted"));
    granted.args(["--print", "10", "--allow-env", "SLUICE_TEST_SECRET=granted-value"]);
    granted.arg("--allow-dir").arg(format!("{}:/data", dir.path().display()));
    let run = run_host(&mut granted, LIMIT);
    run.assert_success();
    let answers: Vec<String> = run.stdout().lines().skip(3).take(5).map(str::to_string).collect();
    assert_eq!(answers[0], "granted-value");
    assert!(answers[1].starts_with("denied: "), "the host path itself stays hidden: {answers:?}");
    assert_eq!(answers[2], "hello from the host");
    assert!(answers[3].starts_with("denied: "), "network is never granted: {answers:?}");
}

/// A task in which every record fails would cost about two plugin calls per record to bisect
/// (each on a fresh instance, each allowed the full deadline); isolation stops after
/// `--max-poison-per-task` records and dead-letters the parts that still fail whole.
#[test]
fn isolating_poison_records_is_bounded_per_task() {
    let (topic, dlq) = (unique("poisoned"), unique("dlq"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&dlq, 1)]);
    let inputs: Vec<Input> = (0..64).map(|_| input(0, "panic")).collect();
    produce(&broker.brokers, &topic, &inputs);
    let group = unique("poisoned");
    let mut command = misbehave(&broker.brokers, &topic, &group);
    command.args(["--on-failure", "dead-letter", "--dead-letter-topic", &dlq, "--max-poison-per-task", "4"]);
    let run = run_host(&mut command, LIMIT);
    run.assert_success();
    let log = run.stderr();
    assert!(log.contains("4 poison records isolated (--max-poison-per-task)"), "{log}");
    // Every failed call printed its panic: bisecting all 64 would take 127 calls.
    let calls = log.matches("output: thread '<unnamed>'").count();
    assert!(calls <= 30, "{calls} plugin calls to dead-letter 64 records");
    assert_eq!(consume(&broker.brokers, &dlq).len(), 64, "every record is dead-lettered, none lost");
}
