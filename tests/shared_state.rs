//! Stateful jobs on several hosts (`--shared-state`) over the mock cluster as a process: keyed
//! values cross hosts through the job's shuffle topic, state partitions move through its
//! changelog when hosts join, leave and die, and every word is counted exactly once — judged
//! from the hosts' checkpoints and from the outputs read back with confluent-kafka.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::harness::{
    BrokerProcess, Input, LoggedBatch, Running, TansuBroker, consume, host, logged_batches, offsets, owned, produce,
    produce_one_by_one, records_in, run_host, unique, upgrade, wait_until,
};
use crate::stateful::{Seeded, count, word_counts};

const LIMIT: Duration = Duration::from_secs(120);
/// State partitions of the tests' jobs: the partition count of their shuffle and changelog.
const STATE_PARTITIONS: u32 = 6;
/// Distinct words in the word-count input.
const VOCABULARY: usize = 100_000;

/// `host run` of the word count as member `host-N` of `group`, sharing its state.
fn word_count_host(
    brokers: &str,
    topic: &str,
    output: &str,
    group: &str,
    n: usize,
    dir: &Path,
) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::WORDCOUNT, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--instance-id", &format!("host-{n}")])
        .args(["--shared-state", "--checkpoint"])
        .arg(dir.join(format!("host-{n}")))
        .args(["--admin-address", "127.0.0.1:0", "--session-timeout", "6s"])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "300ms", "--kafka", "fetch.wait.max.ms=20"])
        .args(["--max-rate-per-partition", "1500"]);
    command
}

/// Lines of three words over 12 partitions: every word of the vocabulary appears, plus words
/// drawn from a seeded generator (some words many times).
fn lines(first: usize, count: usize, seed: u64) -> Vec<Input> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (first..first + count)
        .map(|i| {
            let (a, b) = ((2 * i) % VOCABULARY, (2 * i + 1) % VOCABULARY);
            let c = (next() % (VOCABULARY as u64 / 50)) as usize;
            Input { partition: (i % 12) as i32, key: None, value: format!("w{a} w{b} w{c}") }
        })
        .collect()
}

/// As [`crate::harness::wait_until`], showing every host's latest log lines and `state()`
/// when it times out.
fn wait_for_hosts(
    hosts: &mut BTreeMap<usize, Running>,
    what: &str,
    mut done: impl FnMut(&mut BTreeMap<usize, Running>) -> bool,
    state: impl Fn() -> String,
) {
    let started = std::time::Instant::now();
    while !done(hosts) {
        if started.elapsed() > Duration::from_secs(150) {
            let telling = ["assigned", "revoked", "lost", "restored", "published", "abandoned", "WARN", "ERROR"];
            for (n, host) in hosts.iter_mut() {
                let whole = std::env::temp_dir().join(format!("{}-host-{n}.log", unique("stalled")));
                std::fs::write(&whole, host.drain_log().join("\n")).unwrap();
                let log: Vec<&String> =
                    host.drain_log().iter().filter(|line| telling.iter().any(|t| line.contains(t))).collect();
                let log = log.iter().map(|line| line.as_str()).collect::<Vec<_>>().join("\n");
                eprintln!("--- host-{n} (whole log in {}):\n{log}", whole.display());
            }
            panic!("timed out waiting until {what}: {}", state());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn caught_up(brokers: &str, topic: &str, group: &str) -> bool {
    offsets(brokers, topic, group).values().all(|o| o.end == 0 || o.committed == Some(o.end))
}

/// Each state partition's owner now, by the hosts' assignment log lines: the host assigned it
/// last, unless it gave it up since. (A host whose session expired while it was busy may not
/// have noticed yet that it lost its partitions: the newer assignment is the coordinator's.)
fn state_owners(hosts: &mut BTreeMap<usize, Running>, shuffle: &str) -> BTreeMap<u32, usize> {
    let partition = regex::Regex::new(&format!(r"{}:(\d+)", regex::escape(shuffle))).unwrap();
    let mut changes: Vec<(String, usize, bool, u32)> = Vec::new();
    for (n, host) in hosts.iter_mut() {
        for line in host.drain_log() {
            let (time, rest) = line.split_once(' ').unwrap_or_default();
            let added = match () {
                _ if rest.contains(": assigned ") => true,
                _ if rest.contains(": revoked ") || rest.contains(": lost ") => false,
                _ => continue,
            };
            for found in partition.captures_iter(rest) {
                changes.push((time.to_string(), *n, added, found[1].parse().unwrap()));
            }
        }
    }
    changes.sort();
    let mut owners = BTreeMap::new();
    for (_, n, added, partition) in changes {
        match added {
            true => {
                owners.insert(partition, n);
            }
            false if owners.get(&partition) == Some(&n) => {
                owners.remove(&partition);
            }
            false => {}
        }
    }
    owners
}

/// The state of every key, each from the checkpoint of the host owning its state partition.
fn owned_state(owners: &BTreeMap<u32, usize>, dir: &Path) -> BTreeMap<String, u64> {
    let mut state = BTreeMap::new();
    for n in owners.values().collect::<BTreeSet<_>>() {
        for (key, count) in word_counts(&dir.join(format!("host-{n}"))) {
            let partition = sluice_host::checkpoint::state_partition(key.as_bytes(), STATE_PARTITIONS);
            if owners.get(&partition) == Some(n) {
                state.insert(key, count);
            }
        }
    }
    state
}

/// Each word's highest running total among the outputs; panics on a total above the word's
/// count (a value applied twice).
fn final_totals(brokers: &str, output: &str, expected: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for record in consume(brokers, output) {
        let value = record.value.unwrap();
        let (word, total) = value.trim_matches(|c| c == '(' || c == ')').split_once(',').unwrap();
        let total: u64 = total.parse().unwrap();
        let count = expected.get(word).copied().unwrap_or_default();
        assert!(total <= count, "{word} reached {total} but occurs {count} times: a value was counted twice");
        let best = totals.entry(word.to_string()).or_default();
        *best = (*best).max(total);
    }
    totals
}

#[test]
fn word_count_on_several_hosts_counts_every_word_once_through_joins_kills_and_leaves() {
    let cluster = Cluster::start("counts", "wc");
    let Cluster { broker, topic, output, group, shuffle, dir, seed } = &cluster;
    let (topic, group, seed) = (topic.as_str(), group.as_str(), *seed);
    // A commit refused while the group rebalances under load is given up (fenced) after
    // --broker-timeout: 10 s keeps the many rebalances of this test short.
    let job = |n: usize| {
        let mut command = word_count_host(&broker.brokers, topic, output, group, n, dir.path());
        command.args(["--broker-timeout", "10s"]);
        command
    };
    let inputs = lines(0, 60_000, seed);
    let chunk = |from: usize, until: usize| &inputs[from..until];

    // One host alone: the in-process shuffle, its state in its checkpoint only.
    produce(&broker.brokers, topic, chunk(0, 12_000));
    let mut hosts: BTreeMap<usize, Running> = BTreeMap::from([(1, Running::start(job(1)))]);
    wait_until("host-1 has counted the first lines", || caught_up(&broker.brokers, topic, group));

    // Two more join: host-1 publishes its state and hands partitions over.
    for n in [2, 3] {
        hosts.insert(n, Running::start(job(n)));
    }
    // (The assignor balances partitions over both topics: a host may run one stage only.)
    wait_until("the three hosts share the work", || hosts.values_mut().all(|host| !owned(host).is_empty()));
    produce(&broker.brokers, topic, chunk(12_000, 30_000));

    // One dies mid-run, at a seeded moment; a fresh host joins.
    let victim = 2 + (seed % 2) as usize;
    let counted = records_in(hosts.get_mut(&victim).unwrap());
    let threshold = counted + 500 + (seed as usize * 977) % 3_000;
    wait_until("the victim has counted more", || {
        records_in(hosts.get_mut(&victim).unwrap()) >= threshold || caught_up(&broker.brokers, topic, group)
    });
    let killed = hosts.remove(&victim).unwrap().kill();
    hosts.insert(4, Running::start(job(4)));
    produce(&broker.brokers, topic, chunk(30_000, 45_000));

    // The first host leaves gracefully.
    wait_until("host-4 has joined", || !owned(hosts.get_mut(&4).unwrap()).is_empty());
    let left = hosts.remove(&1).unwrap().stop();
    produce(&broker.brokers, topic, chunk(45_000, 60_000));

    wait_for_hosts(
        &mut hosts,
        "the input and the shuffle are committed to their ends",
        |_| cluster.caught_up(),
        || format!("{:?}\n{:?}", offsets(&broker.brokers, topic, group), offsets(&broker.brokers, shuffle, group)),
    );
    let owners = state_owners(&mut hosts, shuffle);
    assert_eq!(owners.len() as u32, STATE_PARTITIONS, "every state partition has an owner: {owners:?}");
    let mut logs = vec![killed, left];
    for (_, host) in std::mem::take(&mut hosts) {
        logs.push(host.stop());
    }
    let expected = count(&inputs);
    assert!(expected.len() >= VOCABULARY, "{} distinct words", expected.len());
    let state = owned_state(&owners, dir.path());
    let wrong: Vec<_> = expected.iter().filter(|(word, n)| state.get(*word) != Some(n)).take(5).collect();
    assert!(
        wrong.is_empty() && state.len() == expected.len(),
        "state differs from the count ({} keys, {} expected), e.g. {wrong:?}; restores: {:?}",
        state.len(),
        expected.len(),
        logs.iter()
            .flatten()
            .filter(|line| line.contains("restored") || line.contains("published"))
            .collect::<Vec<_>>()
    );
    assert_eq!(final_totals(&broker.brokers, output, &expected), expected, "final totals in the outputs");
    // The hand-overs happened through the changelog.
    let all: Vec<&String> = logs.iter().flatten().collect();
    assert!(all.iter().any(|line| line.contains("published state partitions")), "host-1 published its state");
    assert!(all.iter().any(|line| line.contains("restored state partition")), "someone restored from the changelog");
}

#[test]
fn a_shared_state_job_refuses_topics_it_cannot_use_before_reading() {
    let (topic, group) = (unique("words"), unique("wc"));
    // The mock cluster cannot create topics: the job names what it needs and how to make it.
    let broker = BrokerProcess::start(&[(&topic, 4), (&format!("{group}-shuffle"), 3)]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = word_count_host(&broker.brokers, &topic, "out", &group, 1, dir.path());
    run_host(&mut command, LIMIT).assert_error(&[&format!("{group}-changelog"), "with 3 partitions", "--topic"]);
    // A checkpoint made for another number of state partitions is refused too.
    let other = unique("wc");
    let broker =
        BrokerProcess::start(&[(&topic, 4), (&format!("{other}-shuffle"), 3), (&format!("{other}-changelog"), 5)]);
    let mut command = word_count_host(&broker.brokers, &topic, "out", &other, 1, dir.path());
    run_host(&mut command, LIMIT).assert_error(&[
        &format!("{other}-changelog"),
        "has 5 partitions",
        "3 state partitions",
    ]);
    assert!(offsets(&broker.brokers, &topic, &other).values().all(|o| o.committed.is_none()), "nothing committed");
}

#[test]
fn a_new_state_schema_rolled_across_shared_state_hosts_keeps_every_count_exact() {
    let (topic, output, group) = (unique("words"), unique("counts"), unique("wc"));
    let shuffle = format!("{group}-shuffle");
    let broker = BrokerProcess::start(&[(&topic, 12), (&output, 2), (&shuffle, 6), (&format!("{group}-changelog"), 6)]);
    let dir = tempfile::tempdir().unwrap();
    let job = |n: usize| word_count_host(&broker.brokers, &topic, &output, &group, n, dir.path());
    let inputs = lines(0, 4_000, 7);
    produce(&broker.brokers, &topic, &inputs[..400]);
    let mut hosts: Vec<Running> = (1..=2).map(|n| Running::start(job(n))).collect();
    wait_until("both hosts share the work", || hosts.iter_mut().all(|host| !owned(host).is_empty()));

    // v2 keeps its state as JSON (state schema 2) and migrates v1's keys as it meets them; it
    // is rolled host by host while records flow, each host holding its first batches on
    // probation before they commit.
    let producer = {
        let (brokers, topic, rest) = (broker.brokers.clone(), topic.clone(), inputs[400..].to_vec());
        std::thread::spawn(move || {
            for chunk in rest.chunks(150) {
                produce(&brokers, &topic, chunk);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    for n in 1..=2 {
        let upgraded = upgrade(sluice_plugin_artifacts::WORDCOUNT_V2, &dir.path().join(format!("host-{n}")), &[]);
        upgraded.assert_success();
        assert!(upgraded.stdout().contains("to wordcount 2.0.0"), "{}", upgraded.stdout());
    }
    producer.join().unwrap();
    wait_until("the input and the shuffle are committed to their ends", || {
        caught_up(&broker.brokers, &topic, &group) && caught_up(&broker.brokers, &shuffle, &group)
    });
    let mut hosts: BTreeMap<usize, Running> = (1..).zip(hosts).collect();
    let owners = state_owners(&mut hosts, &shuffle);
    for (_, host) in hosts {
        host.stop();
    }
    assert_eq!(owned_state(&owners, dir.path()), count(&inputs));
}

#[test]
fn on_tansu_a_shared_state_job_creates_its_topics_and_publishes_its_state_when_it_stops() {
    let (topic, output, group) = (unique("words"), unique("counts"), unique("wc"));
    // Tansu answers CreateTopics: the job makes its shuffle and changelog topics itself.
    let broker = TansuBroker::start(&[(&topic, 2), (&output, 1)]);
    let inputs: Vec<Input> =
        (0..60).map(|n| Input { partition: n % 2, key: None, value: format!("w{} w{}", n % 7, n % 3) }).collect();
    produce_one_by_one(&broker.brokers, &topic, &inputs);
    let dir = tempfile::tempdir().unwrap();
    let mut command = word_count_host(&broker.brokers, &topic, &output, &group, 1, dir.path());
    command.args(["--parallelism", "3", "--stop-when-caught-up"]);
    let run = run_host(&mut command, LIMIT);
    run.assert_success();
    let (shuffle, changelog) = (format!("{group}-shuffle"), format!("{group}-changelog"));
    assert!(run.stderr().contains(&format!("created {shuffle} and {changelog} with 3 partitions")), "{}", run.stderr());
    assert!(run.stderr().contains("published state partitions [0, 1, 2]"), "{}", run.stderr());
    assert_eq!(word_counts(&dir.path().join("host-1")), count(&inputs));
    // What it published, read back by another client: the words' states. (Tansu reports a
    // log end that hides the rest of a produce batch, so only a prefix may be visible.)
    let published = consume(&broker.brokers, &changelog);
    let words: BTreeSet<String> =
        published.iter().filter_map(|record| record.key.clone()).filter(|key| !key.starts_with('\0')).collect();
    let expected: BTreeSet<String> = count(&inputs).into_keys().collect();
    assert!(!words.is_empty() && words.is_subset(&expected), "{words:?}");
    assert_eq!(offsets(&broker.brokers, &shuffle, &group).len(), 3, "the shuffle topic has 3 partitions");
    // Where each state partition's copy stands against its changelog.
    let inspect = run_host(
        host().args(["checkpoint", "inspect"]).arg(dir.path().join("host-1")).args([
            "--brokers",
            &broker.brokers,
            "--group",
            &group,
        ]),
        LIMIT,
    );
    inspect.assert_success();
    for partition in 0..3 {
        let line = format!("partition {partition}: changelog offset ");
        let shown = inspect.stdout().lines().find(|l| l.contains(&line)).map(str::to_string).unwrap_or_default();
        assert!(shown.contains(", 0 changelog records behind;"), "{}", inspect.stdout());
    }
}

#[test]
fn a_host_that_ran_alone_and_died_unpublished_is_not_taken_over() {
    let (topic, output, group) = (unique("words"), unique("counts"), unique("wc"));
    let broker = BrokerProcess::start(&[
        (&topic, 12),
        (&output, 1),
        (&format!("{group}-shuffle"), 3),
        (&format!("{group}-changelog"), 3),
    ]);
    let dir = tempfile::tempdir().unwrap();
    produce(&broker.brokers, &topic, &lines(0, 400, 3));
    let mut alone = Running::start(word_count_host(&broker.brokers, &topic, &output, &group, 1, dir.path()));
    wait_until("host-1 counted alone", || caught_up(&broker.brokers, &topic, &group));
    // Its state is in its checkpoint only: killed, it never publishes it.
    alone.drain();
    assert!(!alone.seen.iter().any(|line| line.contains("published")));
    alone.kill();
    let before = offsets(&broker.brokers, &topic, &group);
    let mut command = word_count_host(&broker.brokers, &topic, &output, &group, 2, dir.path());
    run_host(&mut command, LIMIT).assert_error(&["member host-1 processed it alone", "has not published that state"]);
    assert_eq!(offsets(&broker.brokers, &topic, &group), before, "host-2 committed nothing");
}

/// `host run` of the windowed word count (2 s windows every second, 500 ms batches) as member
/// `host-N` of `group`, its panes shared.
fn windowed_host(brokers: &str, topic: &str, output: &str, group: &str, n: usize, dir: &Path) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::WINDOWED_COUNT, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--instance-id", &format!("host-{n}")])
        .args(["--window", "2s", "--slide", "1s", "--batch-interval", "500ms"])
        .args(["--shared-state", "--checkpoint"])
        .arg(dir.join(format!("host-{n}")))
        // As the word count's test: a commit refused while the group rebalances under load is
        // given up (fenced) after --broker-timeout (docs/adr/0007).
        .args(["--admin-address", "127.0.0.1:0", "--session-timeout", "6s", "--broker-timeout", "10s"])
        .args(["--auto-offset-reset", "earliest", "--kafka", "fetch.wait.max.ms=20"])
        .args(["--max-rate-per-partition", "400"]);
    command
}

/// The ranges every batch took, by input partition: `(from, until, batch time)`, from the
/// committed batches the hosts logged and the batch a killed host left in its checkpoint
/// (committed to the group or not: only where no logged batch starts is it the one that
/// counted).
fn batch_ranges(batches: &[LoggedBatch], killed_dir: &Path) -> BTreeMap<i32, Vec<(i64, i64, i64, bool)>> {
    let range = regex::Regex::new(r"[\w.-]+:(\d+) \[(\d+), (\d+)\)").unwrap();
    let mut ranges: BTreeMap<i32, Vec<(i64, i64, i64, bool)>> = BTreeMap::new();
    let mut add = |time: i64, text: &str, logged: bool| {
        for found in range.captures_iter(text) {
            let (partition, from, until) =
                (found[1].parse().unwrap(), found[2].parse().unwrap(), found[3].parse().unwrap());
            ranges.entry(partition).or_default().push((from, until, time, logged));
        }
    };
    for batch in batches.iter().filter(|batch| !batch.abandoned) {
        add(batch.time, &batch.ranges.join(", "), true);
    }
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(killed_dir), LIMIT).stdout();
    let interrupted = regex::Regex::new(r"interrupted batch: (\d+) ms, [^:]*: (.*)").unwrap();
    for found in interrupted.captures_iter(&inspect) {
        add(found[1].parse().unwrap(), &found[2], false);
    }
    ranges
}

/// Sends `inputs` in chunks of 300, a quarter second apart, so batches and windows differ.
fn produce_slowly(brokers: &str, topic: &str, inputs: &[Input]) {
    for chunk in inputs.chunks(300) {
        produce(brokers, topic, chunk);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The cluster of a multi-host test: `topic` with 12 partitions, `output` with 4, and the
/// job's shuffle and changelog over [`STATE_PARTITIONS`]; the hosts' checkpoints under `dir`;
/// the seed (`SLUICE_TEST_SEED`, else 18) of the test's input and moments.
struct Cluster {
    broker: BrokerProcess,
    topic: String,
    output: String,
    group: String,
    shuffle: String,
    dir: tempfile::TempDir,
    seed: u64,
}

impl Cluster {
    fn start(output: &str, group: &str) -> Cluster {
        let (topic, output, group) = (unique("words"), unique(output), unique(group));
        let (shuffle, changelog) = (format!("{group}-shuffle"), format!("{group}-changelog"));
        let partitions = STATE_PARTITIONS as i32;
        let broker =
            BrokerProcess::start(&[(&topic, 12), (&output, 4), (&shuffle, partitions), (&changelog, partitions)]);
        let seed = std::env::var("SLUICE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(18);
        Cluster { broker, topic, output, group, shuffle, dir: tempfile::tempdir().unwrap(), seed }
    }

    fn caught_up(&self) -> bool {
        caught_up(&self.broker.brokers, &self.topic, &self.group)
            && caught_up(&self.broker.brokers, &self.shuffle, &self.group)
    }
}

/// Every `(word, window end) → count` a brute force computes: each record in the pane of the
/// batch that read it, windows of `length` ms ending at every multiple of `slide` ms up to
/// `last_end`.
fn brute_force_windows(
    inputs: &BTreeMap<i32, Vec<String>>,
    ranges: &BTreeMap<i32, Vec<(i64, i64, i64, bool)>>,
    length: i64,
    slide: i64,
    last_end: i64,
) -> BTreeMap<(String, i64), u64> {
    let mut panes: BTreeMap<i64, BTreeMap<String, u64>> = BTreeMap::new();
    for (partition, lines) in inputs {
        let taken = &ranges[partition];
        let mut offset = 0;
        while (offset as usize) < lines.len() {
            // A logged (committed) batch starting here counts; else the killed host's.
            let next = taken
                .iter()
                .filter(|(from, until, _, _)| *from == offset && until > from)
                .max_by_key(|(_, _, _, logged)| *logged)
                .unwrap_or_else(|| panic!("no batch took words:{partition} at offset {offset}: {taken:?}"));
            for line in &lines[next.0 as usize..next.1 as usize] {
                for word in line.split_whitespace() {
                    *panes.entry(next.2).or_default().entry(word.to_string()).or_default() += 1;
                }
            }
            offset = next.1;
        }
    }
    let first = panes.keys().next().copied().unwrap_or_default();
    let mut windows = BTreeMap::new();
    let mut end = (first + slide - 1).div_euclid(slide) * slide;
    while end <= last_end {
        for (_, counts) in panes.range(end - length + 1..=end) {
            for (word, n) in counts {
                *windows.entry((word.clone(), end)).or_default() += n;
            }
        }
        end += slide;
    }
    windows
}

#[test]
fn windowed_counts_on_several_hosts_equal_a_brute_force_computation_through_kills_joins_and_leaves() {
    let cluster = Cluster::start("windows", "wwc");
    let Cluster { broker, topic, output, group, seed, .. } = &cluster;
    let seed = *seed;
    let job = |n: usize| windowed_host(&broker.brokers, topic, output, group, n, cluster.dir.path());
    // Words from a small vocabulary, so every window holds many counts of each.
    let mut random = Seeded(seed);
    let inputs: Vec<Input> = (0..9_000)
        .map(|i| {
            let words: Vec<String> = (0..3).map(|_| format!("v{}", random.next(40))).collect();
            Input { partition: i % 12, key: None, value: words.join(" ") }
        })
        .collect();
    let mut by_partition: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for input in &inputs {
        by_partition.entry(input.partition).or_default().push(input.value.clone());
    }
    let arrive = |from: usize, until: usize| produce_slowly(&broker.brokers, topic, &inputs[from..until]);

    let mut hosts: BTreeMap<usize, Running> = BTreeMap::from([(1, Running::start(job(1)))]);
    arrive(0, 1_500);
    for n in [2, 3] {
        hosts.insert(n, Running::start(job(n)));
    }
    let sharing = |hosts: &mut BTreeMap<usize, Running>| hosts.values_mut().all(|host| !owned(host).is_empty());
    wait_for_hosts(&mut hosts, "the three hosts share the work", sharing, String::new);
    arrive(1_500, 4_500);

    // One dies at a seeded moment under load; a fresh host joins; the first leaves.
    let victim = 2 + (seed % 2) as usize;
    let threshold = records_in(hosts.get_mut(&victim).unwrap()) + 100 + (seed as usize * 977) % 600;
    let producer = {
        let (brokers, topic, rest) = (broker.brokers.clone(), topic.clone(), inputs[4_500..6_000].to_vec());
        std::thread::spawn(move || produce_slowly(&brokers, &topic, &rest))
    };
    wait_until("the victim has counted more", || {
        records_in(hosts.get_mut(&victim).unwrap()) >= threshold || producer.is_finished()
    });
    let killed = hosts.remove(&victim).unwrap().kill();
    producer.join().unwrap();
    hosts.insert(4, Running::start(job(4)));
    wait_until("host-4 has joined", || !owned(hosts.get_mut(&4).unwrap()).is_empty());
    let left = hosts.remove(&1).unwrap().stop();
    arrive(6_000, 9_000);

    wait_for_hosts(
        &mut hosts,
        "the input and the shuffle are committed to their ends",
        |_| cluster.caught_up(),
        || format!("{:?}", offsets(&broker.brokers, topic, group)),
    );
    let mut logs = vec![killed, left];
    let batches = |logs: &[Vec<String>]| logged_batches(&logs.concat());
    let mut running: Vec<Vec<String>> = logs.clone();
    running.extend(hosts.values_mut().map(|host| host.drain_log().to_vec()));
    let last_pane = batches(&running).iter().filter(|b| b.records_in > 0).map(|b| b.time).max().unwrap();
    // The last window that holds the last pane.
    let last_end = (last_pane + 2_000 - 1).div_euclid(1_000) * 1_000;
    let emitted = |output: &str| -> BTreeMap<(String, i64), Vec<u64>> {
        let mut windows: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
        for record in consume(&broker.brokers, output) {
            let end: i64 = record.headers["window-end"].as_deref().unwrap().parse().unwrap();
            let value = record.value.unwrap();
            let (word, n) = value.trim_matches(|c| c == '(' || c == ')').split_once(',').unwrap();
            windows.entry((word.to_string(), end)).or_default().push(n.parse().unwrap());
        }
        windows
    };
    wait_for_hosts(
        &mut hosts,
        "the last windows are emitted",
        |_| emitted(output).keys().any(|(_, end)| *end >= last_end),
        || format!("waiting for window end {last_end}"),
    );
    let killed_dir = cluster.dir.path().join(format!("host-{victim}"));
    for (_, host) in std::mem::take(&mut hosts) {
        logs.push(host.stop());
    }

    let expected =
        brute_force_windows(&by_partition, &batch_ranges(&batches(&logs), &killed_dir), 2_000, 1_000, last_end);
    let mut observed = BTreeMap::new();
    for ((word, end), counts) in emitted(output).into_iter().filter(|((_, end), _)| *end <= last_end) {
        // A slide emitted again after its owner died is the same result again.
        assert!(counts.iter().all(|n| *n == counts[0]), "window {end} of {word} emitted as {counts:?}");
        observed.insert((word, end), counts[0]);
    }
    let missing: Vec<_> = expected.iter().filter(|(k, n)| observed.get(*k) != Some(n)).take(5).collect();
    let extra: Vec<_> = observed.iter().filter(|(k, _)| !expected.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} windows expected, {} emitted; differing: {missing:?} (emitted {:?}); unexpected: {extra:?}",
        expected.len(),
        observed.len(),
        missing.iter().map(|(k, _)| observed.get(*k)).collect::<Vec<_>>()
    );
    assert!(expected.len() > 200, "{} windows", expected.len());
    let all: Vec<&String> = logs.iter().flatten().collect();
    assert!(all.iter().any(|line| line.contains("restored state partition")), "someone restored from the changelog");
}
