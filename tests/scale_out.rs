//! Several `host` processes on one consumer group over the mock cluster: the group's
//! coordinator splits the partitions between them, hosts join, leave and die while records
//! arrive, and every record's output is delivered — exactly once, except for the one batch a
//! killed host had not committed. A stateful job refuses a second host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::{
    BrokerProcess, Input, Running, abandoned_batches, assert_delivered_once, consume, etl_case, host, offsets, owned,
    produce, records_in, run_host, unique, upgrade, wait_until,
};

const LIMIT: Duration = Duration::from_secs(120);
/// Records one batch takes from one partition, at most (rate 100/s × 200 ms): bounds what a
/// killed host can have left uncommitted.
const PER_PARTITION_BATCH: usize = 20;

/// `host run` of the ETL plugin as member `host-N` of `group`.
fn etl_host(brokers: &str, topic: &str, output: &str, group: &str, n: usize) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ETL, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--instance-id", &format!("host-{n}")])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "200ms", "--kafka", "fetch.wait.max.ms=20"])
        .args(["--max-rate-per-partition", "100"]);
    command
}

fn caught_up(brokers: &str, topic: &str, group: &str) -> bool {
    offsets(brokers, topic, group).values().all(|o| o.committed == Some(o.end))
}

#[test]
fn three_hosts_share_twelve_partitions_and_deliver_every_record_once() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = BrokerProcess::start(&[(&topic, 12), (&output, 4)]);
    let case = etl_case(0, 1200, 12);
    produce(&broker.brokers, &topic, &case.lines[..240]);
    let mut hosts: Vec<Running> =
        (1..=3).map(|n| Running::start(etl_host(&broker.brokers, &topic, &output, &group, n))).collect();
    // The coordinator settles on four partitions each (cooperative-sticky, in a few rounds).
    wait_until("each host owns four partitions", || hosts.iter_mut().all(|host| owned(host).len() == 4));
    let all: BTreeSet<String> = hosts.iter_mut().flat_map(owned).collect();
    assert_eq!(all.len(), 12, "the three shares cover the topic: {all:?}");
    produce(&broker.brokers, &topic, &case.lines[240..]);
    wait_until("the group has committed every partition to its end", || caught_up(&broker.brokers, &topic, &group));

    // The group as its commits describe it: three members, four partitions each.
    let status = run_host(
        host().args(["status", "--json", "--brokers", &broker.brokers, "--group", &group, "--topic", &topic]),
        LIMIT,
    );
    status.assert_success();
    let view: serde_json::Value = serde_json::from_str(&status.stdout()).unwrap();
    let members: BTreeMap<String, usize> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["member"].as_str().unwrap().to_string(), m["partitions"].as_array().unwrap().len()))
        .collect();
    assert_eq!(members, BTreeMap::from([("host-1".into(), 4), ("host-2".into(), 4), ("host-3".into(), 4)]));
    assert!(view["partitions"].as_array().unwrap().iter().all(|p| p["lag"] == 0), "{view}");

    let mut logs = Vec::new();
    for mut running in hosts {
        assert!(records_in(&mut running) > 0, "every host did part of the work");
        logs.push(running.stop());
    }
    let delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    assert_delivered_once(delivered, &case.expected, &logs);
}

#[test]
fn hosts_joining_leaving_and_dying_lose_nothing_and_duplicate_only_the_dead_hosts_last_batch() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = BrokerProcess::start(&[(&topic, 12), (&output, 4)]);
    // Lines keep arriving, in chunks, until the last host has taken over everything.
    let case = etl_case(0, 20_000, 12);
    let (stop, produced) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let producer = {
        let (brokers, topic, lines) = (broker.brokers.clone(), topic.clone(), case.lines.clone());
        let (stop, produced) = (stop.clone(), produced.clone());
        std::thread::spawn(move || {
            for chunk in lines.chunks(60) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                produce(&brokers, &topic, chunk);
                produced.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        })
    };
    let job = |n| etl_host(&broker.brokers, &topic, &output, &group, n);
    let mut first = Running::start(job(1));
    wait_until("host-1 works", || records_in(&mut first) > 0);
    // Scale up.
    let mut second = Running::start(job(2));
    wait_until("host-2 takes a share", || records_in(&mut second) > 0);
    // Scale down, gracefully: its partitions go to host-2 at once.
    first.signal();
    let (code, first_log) = first.finish();
    assert_eq!(code, Some(0));
    wait_until("host-2 owns everything", || owned(&mut second).len() == 12);
    let mut third = Running::start(job(3));
    wait_until("host-3 takes a share", || records_in(&mut third) > 0);
    // A failure: host-2 dies with whatever batch it had in flight.
    let lost_with = owned(&mut second).len();
    let second_log = second.kill();
    wait_until("host-3 took over", || owned(&mut third).len() == 12);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    wait_until("host-3 caught up", || caught_up(&broker.brokers, &topic, &group));
    third.signal();
    let (code, third_log) = third.finish();
    assert_eq!(code, Some(0));

    let delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for value in &delivered {
        *times.entry(value).or_default() += 1;
    }
    let sent = etl_case(0, produced.load(Ordering::Relaxed), 12);
    let expected: BTreeSet<&str> = sent.expected.iter().map(String::as_str).collect();
    assert_eq!(times.keys().copied().collect::<BTreeSet<_>>(), expected, "every valid line, nothing else");
    let duplicates = delivered.len() - expected.len();
    assert!(times.values().all(|&n| n <= 2), "a record delivered more than twice");
    // The test's own producer retries too: a line written twice to the input is rightly
    // output twice, so input duplicates widen the bound.
    let mut written: BTreeMap<String, usize> = BTreeMap::new();
    for record in consume(&broker.brokers, &topic) {
        *written.entry(record.value.unwrap()).or_default() += 1;
    }
    let written_twice: usize = written.values().map(|n| n - 1).sum();
    // At most the batch host-2 had in flight (one batch of each partition it owned), plus any
    // batch a member abandoned because the group had moved on (fenced: a crash-like event
    // under load, logged as such; at most one batch of every partition).
    let abandoned = abandoned_batches(&[first_log.clone(), second_log.clone(), third_log.clone()]);
    let bound = (lost_with + abandoned * 12) * PER_PARTITION_BATCH + written_twice;
    if duplicates > bound {
        let twice: Vec<&str> = times.iter().filter(|(_, n)| **n > 1).map(|(value, _)| *value).collect();
        let logs = [("host-1", &first_log), ("host-2", &second_log), ("host-3", &third_log)]
            .map(|(name, log)| format!("{name}:\n{}", log.join("\n")));
        panic!(
            "{duplicates} duplicates, more than host-2's last batch ({lost_with} partitions) and {abandoned} abandoned \
             batches could hold, {written_twice} lines written twice: {twice:?}\n{}",
            logs.join("\n\n")
        );
    }
    eprintln!(
        "scale up, down and a kill: {} outputs, {duplicates} duplicates, {abandoned} batches abandoned",
        delivered.len()
    );
}

#[test]
fn a_stateful_job_refuses_a_second_host() {
    let (topic, output, group) = (unique("words"), unique("counts"), unique("wordcount"));
    let broker = BrokerProcess::start(&[(&topic, 4), (&output, 4)]);
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let inputs: Vec<Input> =
        (0..40).map(|n| Input { partition: n % 4, key: None, value: format!("w{}", n % 5) }).collect();
    produce(&broker.brokers, &topic, &inputs[..20]);
    let job = |n: usize, dir: &std::path::Path| {
        let mut command = host();
        command
            .args(["run", "--plugin", sluice_plugin_artifacts::WORDCOUNT, "--brokers", &broker.brokers])
            .args(["--topic", &topic, "--group", &group, "--output-topic", &output, "--instance-id"])
            .arg(format!("host-{n}"))
            .args(["--auto-offset-reset", "earliest", "--batch-interval", "200ms", "--checkpoint"])
            .arg(dir);
        command
    };
    let mut first = Running::start(job(1, one.path()));
    wait_until("host-1 caught up", || caught_up(&broker.brokers, &topic, &group));
    // Refused either because it shares the partitions, or (when host-1 missed a rebalance
    // under load and host-2 got them all) because host-1's commits are past host-2's state.
    run_host(&mut job(2, two.path()), LIMIT).assert_error(&["stateful", "runs on one host at a time"]);
    // The first host gets its partitions back and goes on, counting each record once.
    produce(&broker.brokers, &topic, &inputs[20..]);
    wait_until("host-1 owns all four partitions again and caught up", || {
        owned(&mut first).len() == 4 && caught_up(&broker.brokers, &topic, &group)
    });
    first.stop();
    assert_eq!(crate::stateful::word_counts(one.path()), crate::stateful::count(&inputs));
}

#[test]
fn an_upgrade_rolled_across_a_group_host_by_host_keeps_every_record_once() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = BrokerProcess::start(&[(&topic, 4), (&output, 2)]);
    let case = etl_case(0, 800, 4);
    produce(&broker.brokers, &topic, &case.lines[..80]);
    // Each host keeps its own checkpoint directory: its admin endpoint and its builds.
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hosts: Vec<Running> = dirs
        .iter()
        .enumerate()
        .map(|(n, dir)| {
            let mut command = etl_host(&broker.brokers, &topic, &output, &group, n + 1);
            command.arg("--checkpoint").arg(dir.path());
            Running::start(command)
        })
        .collect();
    wait_until("each host owns two partitions", || hosts.iter_mut().all(|host| owned(host).len() == 2));
    let producer = {
        let (brokers, topic, lines) = (broker.brokers.clone(), topic.clone(), case.lines[80..].to_vec());
        std::thread::spawn(move || {
            for chunk in lines.chunks(40) {
                produce(&brokers, &topic, chunk);
            }
        })
    };
    // One host after the other, each at its own batch boundary.
    let mut digests = Vec::new();
    for dir in &dirs {
        let upgraded = upgrade(sluice_plugin_artifacts::ETL_V2, dir.path(), &[]);
        upgraded.assert_success();
        assert!(upgraded.stdout().contains("to etl 2.0.0"), "{}", upgraded.stdout());
        let status = run_host(host().args(["status", "--json"]).arg("--checkpoint").arg(dir.path()), LIMIT);
        let status: serde_json::Value = serde_json::from_str(&status.stdout()).unwrap();
        digests.push(status["plugin"]["digest"].as_str().unwrap()[..12].to_string());
    }
    producer.join().unwrap();
    wait_until("the group caught up", || caught_up(&broker.brokers, &topic, &group));

    // The group's commits name the new build for every member.
    let status = run_host(
        host().args(["status", "--json", "--brokers", &broker.brokers, "--group", &group, "--topic", &topic]),
        LIMIT,
    );
    let view: serde_json::Value = serde_json::from_str(&status.stdout()).unwrap();
    let builds: BTreeMap<String, Vec<String>> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["member"].as_str().unwrap().to_string(), serde_json::from_value(m["builds"].clone()).unwrap()))
        .collect();
    assert_eq!(digests[0], digests[1], "both hosts run the same v2 build");
    let v2 = vec![digests[0].clone()];
    assert_eq!(builds, BTreeMap::from([("host-1".into(), v2.clone()), ("host-2".into(), v2)]), "{view}");

    let logs: Vec<Vec<String>> = hosts.into_iter().map(Running::stop).collect();
    let records = consume(&broker.brokers, &output);
    assert_delivered_once(records.iter().map(|r| r.value.clone().unwrap()).collect(), &case.expected, &logs);
    assert!(records.iter().any(|r| r.headers.contains_key("etl-version")), "v2 wrote outputs");
    assert!(records.iter().any(|r| !r.headers.contains_key("etl-version")), "v1 wrote outputs");
}

#[test]
fn a_stalled_host_is_fenced_and_the_groups_offsets_never_move_back() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = BrokerProcess::start(&[(&topic, 4), (&output, 2)]);
    let case = etl_case(0, 20_000, 4);
    let (stop, produced) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let producer = {
        let (brokers, topic, lines) = (broker.brokers.clone(), topic.clone(), case.lines.clone());
        let (stop, produced) = (stop.clone(), produced.clone());
        std::thread::spawn(move || {
            for chunk in lines.chunks(40) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                produce(&brokers, &topic, chunk);
                produced.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        })
    };
    // Another client watches the group's offsets throughout: they must never decrease, whoever
    // commits.
    let watcher = {
        let (brokers, topic, group, stop) = (broker.brokers.clone(), topic.clone(), group.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut highest: BTreeMap<i32, i64> = BTreeMap::new();
            let mut backwards = Vec::new();
            let mut finished = false;
            while !finished {
                finished = stop.load(Ordering::Relaxed);
                for (partition, offsets) in offsets(&brokers, &topic, &group) {
                    let Some(committed) = offsets.committed else { continue };
                    let seen = highest.entry(partition).or_insert(committed);
                    if committed < *seen {
                        backwards.push(format!("partition {partition}: {seen} then {committed}"));
                    }
                    *seen = committed.max(*seen);
                }
            }
            backwards
        })
    };
    let job = |n| etl_host(&broker.brokers, &topic, &output, &group, n);
    let mut hosts = [Running::start(job(1)), Running::start(job(2))];
    wait_until("each host owns two partitions", || hosts.iter_mut().all(|host| owned(host).len() == 2));
    wait_until("host-1 works", || records_in(&mut hosts[0]) > 0);

    // host-1 stalls (as in a long GC pause or a frozen VM) past its session timeout: the group
    // gives its partitions to host-2, which goes on from host-1's last commit.
    let stalled = hosts[0].pid().to_string();
    let stall = |signal: &str| {
        assert!(std::process::Command::new("kill").args([signal, &stalled]).status().unwrap().success());
    };
    stall("-STOP");
    let before = records_in(&mut hosts[1]);
    wait_until("host-2 owns all four partitions", || owned(&mut hosts[1]).len() == 4);
    wait_until("host-2 works on them", || records_in(&mut hosts[1]) > before + 80);
    stall("-CONT");
    // Back, host-1 learns that its partitions are gone: its batch in flight is not committed.
    wait_until("host-1 knows it was fenced", || {
        hosts[0].drain();
        hosts[0].seen.iter().any(|line| line.contains("lost") || line.contains("fenced"))
    });
    wait_until("host-1 rejoined and works again", || owned(&mut hosts[0]).len() == 2);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    wait_until("the group caught up", || caught_up(&broker.brokers, &topic, &group));
    let backwards = watcher.join().unwrap();
    let logs: Vec<Vec<String>> = hosts.into_iter().map(Running::stop).collect();
    assert!(backwards.is_empty(), "the group's offsets moved back: {backwards:?}");

    let delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for value in &delivered {
        *times.entry(value).or_default() += 1;
    }
    let sent = etl_case(0, produced.load(Ordering::Relaxed), 4);
    let expected: BTreeSet<&str> = sent.expected.iter().map(String::as_str).collect();
    assert_eq!(times.keys().copied().collect::<BTreeSet<_>>(), expected, "every valid line, nothing else");
    // Only host-1's batch in flight when it stalled can repeat (two partitions' worth), and any
    // other batch a host logged as abandoned (at most four partitions).
    let duplicates = delivered.len() - expected.len();
    let bound = (2 + 4 * abandoned_batches(&logs)) * PER_PARTITION_BATCH;
    assert!(duplicates <= bound, "{duplicates} duplicates, more than {bound}");
    eprintln!("a stalled host: {} outputs, {duplicates} duplicates", delivered.len());
}
