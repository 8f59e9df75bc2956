//! Word count (`updateStateByKey`) as a separate process: exact state and outputs against an
//! independent count, across restarts and across seeded crashes and kill -9s at every phase.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{BrokerProcess, Input, consume, host, offsets, produce, run_host, unique};

const LIMIT: Duration = Duration::from_secs(60);
const PARTITIONS: i32 = 3;

/// A small deterministic generator, so every run of the suite sees the same "random" input
/// and crash schedule, and a failure can be replayed.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next(&mut self, below: u64) -> u64 {
        // Knuth's MMIX LCG; the high bits are the good ones.
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// `count` lines of 1..=4 words from a 40-word vocabulary, spread over the partitions.
pub fn lines(random: &mut Seeded, count: usize) -> Vec<Input> {
    (0..count)
        .map(|_| {
            let words = 1 + random.next(4);
            let value = (0..words).map(|_| format!("w{}", random.next(40))).collect::<Vec<_>>().join(" ");
            Input { partition: random.next(PARTITIONS as u64) as i32, key: None, value }
        })
        .collect()
}

/// The word counts of `inputs`, computed here without the plugin.
pub fn count(inputs: &[Input]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for word in inputs.iter().flat_map(|input| input.value.split_whitespace()) {
        *counts.entry(word.to_string()).or_insert(0) += 1;
    }
    counts
}

/// The checkpoint's state, read with `host checkpoint dump`.
pub fn checkpoint_state(dir: &Path) -> BTreeMap<String, u64> {
    let run = run_host(host().args(["checkpoint", "dump"]).arg(dir), LIMIT);
    run.assert_success();
    run.stdout()
        .lines()
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            (entry["key"].as_str().unwrap().to_string(), entry["state"].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// The latest `(word,total)` output per word. Outputs are keyed by word, so each word's
/// outputs share a partition and its last one is its latest.
fn latest_outputs(brokers: &str, topic: &str) -> BTreeMap<String, u64> {
    let mut records = consume(brokers, topic);
    records.sort_by_key(|record| (record.partition, record.offset));
    let mut latest = BTreeMap::new();
    for record in records {
        let value = record.value.unwrap();
        let (word, total) = value.trim_matches(|c| c == '(' || c == ')').split_once(',').unwrap();
        assert_eq!(record.key.as_deref(), Some(word), "outputs are keyed by their word");
        latest.insert(word.to_string(), total.parse().unwrap());
    }
    latest
}

/// `host run` of a stateful `plugin` from the start of `topic`, in small batches, until caught up.
pub fn stateful_job(plugin: &str, brokers: &str, topic: &str, group: &str, output: &str, checkpoint: &Path) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", plugin, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--auto-offset-reset", "earliest"])
        .args(["--batch-interval", "100ms", "--stop-when-caught-up", "--kafka", "fetch.wait.max.ms=20"])
        // Five records per partition per batch: every run spans several batches.
        .args(["--max-rate-per-partition", "50"])
        .arg("--checkpoint")
        .arg(checkpoint);
    command
}

/// Asserts the checkpoint and the group both say every partition is read to its end.
pub fn assert_everything_read(brokers: &str, topic: &str, group: &str, checkpoint: &Path) {
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(checkpoint), LIMIT);
    for (partition, offsets) in offsets(brokers, topic, group) {
        assert_eq!(offsets.committed, Some(offsets.end), "{topic}:{partition} committed vs log end");
        let line = format!("  {topic}:{partition}  {}\n", offsets.end);
        assert!(inspect.stdout().contains(&line), "checkpoint lacks {line:?}:\n{}", inspect.stdout());
    }
}

#[test]
fn word_counts_over_many_batches_and_a_restart_equal_an_independent_count() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS), (&output, PARTITIONS)]);
    let group = unique("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let mut random = Seeded(7);

    let mut produced = lines(&mut random, 150);
    produce(&broker.brokers, &topic, &produced);
    let first = run_host(
        &mut stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint),
        LIMIT,
    );
    first.assert_success();
    assert!(first.summary().batches >= 5, "rate-limited into several batches:\n{}", first.stderr());
    assert_eq!(checkpoint_state(&checkpoint), count(&produced));

    // A second run resumes from the checkpoint: only the new lines are read, and counted on top.
    let more = lines(&mut random, 90);
    produce(&broker.brokers, &topic, &more);
    produced.extend(more);
    let second = run_host(
        &mut stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint),
        LIMIT,
    );
    second.assert_success();
    assert_eq!(second.summary().records_in, 90);
    assert!(second.stderr().contains("(committed)"), "{}", second.stderr());

    let expected = count(&produced);
    assert_eq!(checkpoint_state(&checkpoint), expected);
    assert_eq!(latest_outputs(&broker.brokers, &output), expected);
    assert_everything_read(&broker.brokers, &topic, &group, &checkpoint);
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(&checkpoint), LIMIT).stdout();
    assert!(inspect.contains(&format!("state: {} keys", expected.len())), "{inspect}");
    assert!(inspect.contains("wordcount 0.1.0 (state schema 1"), "{inspect}");

    // Another plugin cannot take over this state.
    let top3 = stateful_job(sluice_plugin_artifacts::TOP3, &broker.brokers, &topic, &group, &output, &checkpoint);
    let mut top3 = top3;
    run_host(&mut top3, LIMIT).assert_error(&[
        "holds state of plugin wordcount 0.1.0 (state schema 1)",
        "plugin top3 0.1.0 is another plugin",
    ]);
}

/// The phases a crash point can stop a batch at, in batch order.
const PHASES: [&str; 5] = ["fetch", "plugin", "deliver", "commit", "checkpoint"];
/// The phases after the group commit: a crash there leaves a batch whose outputs and offsets
/// Kafka holds, and the next run replays it only to rebuild its state.
const AFTER_GROUP_COMMIT: [&str; 2] = ["commit", "checkpoint"];

#[test]
fn crashes_at_every_phase_neither_lose_nor_double_count() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS), (&output, PARTITIONS)]);
    let group = unique("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let mut random = Seeded(2026);
    let mut produced = Vec::new();
    let mut crashes: BTreeMap<&str, u32> = BTreeMap::new();

    // 25 runs that end abruptly: 20 at crash points (each phase four times, in seeded order
    // and at the 1st to 3rd batch of the run), 5 by kill -9 after a seeded delay. New input
    // arrives before each, so there is always work in flight when the process dies.
    let mut schedule: Vec<Option<&str>> = PHASES.iter().flat_map(|phase| [Some(*phase); 4]).collect();
    schedule.extend([None; 5]);
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, random.next(i as u64 + 1) as usize);
    }
    let mut replays_checked = 0;
    let mut previous: Option<&str> = None;
    let mut previous_log = String::new();
    for crash in schedule {
        let chunk = lines(&mut random, 60);
        produce(&broker.brokers, &topic, &chunk);
        produced.extend(chunk);
        let interrupted = interrupted_batch(&checkpoint);
        // The group holds the interrupted batch (it committed, the checkpoint did not): only its
        // state is rebuilt. A crash after the group commit always leaves that.
        let silently = interrupted.as_ref().is_some_and(|(_, ranges)| group_holds(&broker.brokers, &group, ranges));
        if interrupted.is_some() && previous.is_some_and(|phase| AFTER_GROUP_COMMIT.contains(&phase)) {
            assert!(silently, "a crash at {previous:?} comes after the group commit\n{previous_log}");
        }
        let mut command =
            stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint);
        match crash {
            Some(phase) => {
                let nth = 1 + random.next(3);
                command.env(sluice_host::failpoint::VARIABLE, format!("{phase}:{nth}"));
                let run = run_host(&mut command, LIMIT);
                assert!(!run.success(), "crash at {phase}:{nth} did not happen:\n{}", run.stderr());
                assert!(run.stderr().contains(&format!("crashing at {phase} #{nth}")), "{}", run.stderr());
                if let Some((time, ranges)) = &interrupted {
                    assert_replayed_exactly(&run.stderr(), *time, ranges, silently);
                    replays_checked += 1;
                }
                previous_log = run.stderr();
            }
            None => {
                let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
                let started = Instant::now();
                let delay = Duration::from_millis(150 + random.next(600));
                while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
            }
        }
        *crashes.entry(crash.unwrap_or("kill -9")).or_default() += 1;
        previous = crash;
    }
    assert!(replays_checked >= 10, "most crashes interrupt a planned batch: {replays_checked} replays checked");
    assert_eq!(crashes.values().sum::<u32>(), 25);

    let last = run_host(
        &mut stateful_job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &group, &output, &checkpoint),
        LIMIT,
    );
    last.assert_success();
    let expected = count(&produced);
    assert_eq!(checkpoint_state(&checkpoint), expected, "state after {crashes:?}");
    // Outputs are at-least-once (a crash after delivery repeats them), but the latest total
    // per word is exact.
    assert_eq!(latest_outputs(&broker.brokers, &output), expected);
    assert_everything_read(&broker.brokers, &topic, &group, &checkpoint);
}

/// The batch the checkpoint says was planned but not committed: its time and ranges, as
/// `host checkpoint inspect` shows them.
fn interrupted_batch(checkpoint: &Path) -> Option<(i64, String)> {
    if !checkpoint.exists() {
        return None;
    }
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(checkpoint), LIMIT);
    let pattern =
        regex::Regex::new(r"interrupted batch: (\d+) ms, replayed with the same ranges on the next start: (.*)")
            .unwrap();
    let stdout = inspect.stdout();
    let captures = pattern.captures(&stdout)?;
    Some((captures[1].parse().unwrap(), captures[2].to_string()))
}

/// Whether the group's committed offsets are the ends of `ranges` (as `inspect` prints them).
fn group_holds(brokers: &str, group: &str, ranges: &str) -> bool {
    let pattern = regex::Regex::new(r"([^ ,]+):(\d+) \[(\d+), (\d+)\)").unwrap();
    pattern.captures_iter(ranges).all(|range| {
        let (partition, until): (i32, i64) = (range[2].parse().unwrap(), range[4].parse().unwrap());
        offsets(brokers, &range[1], group)[&partition].committed == Some(until)
    })
}

/// Asserts a run started by replaying the interrupted batch with its time and ranges — only to
/// rebuild its state if the group had committed it (`silently`) — and, if it got as far as
/// finishing it, logged it with those ranges.
fn assert_replayed_exactly(stderr: &str, time: i64, ranges: &str, silently: bool) {
    let full = format!("replaying batch {time} ms, interrupted before its commit: {ranges}");
    let silent = format!(
        "replaying batch {time} ms, interrupted before its commit to rebuild its state (its outputs are in Kafka \
         already): {ranges}"
    );
    let expected = if silently { silent } else { full };
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    let finished = format!("batch {time} ms on ");
    if let Some(line) = stderr.lines().find(|line| line.contains(&finished)) {
        assert!(line.ends_with(&format!("; {ranges}")), "batch {time} ms replayed with other ranges: {line}");
    }
}

#[test]
fn a_corrupt_or_foreign_checkpoint_is_refused_naming_the_file() {
    let topic = unique("words");
    let broker = BrokerProcess::start(&[(&topic, 1)]);
    produce(&broker.brokers, &topic, &[Input { partition: 0, key: None, value: "a b".into() }]);
    let group = unique("wordcount");
    let dir = tempfile::tempdir().unwrap();

    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("checkpoint.redb"), vec![0x5a; 8192]).unwrap();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    {
        let db = redb::Database::create(foreign.join("checkpoint.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("orders")).unwrap().insert("x", 1).unwrap();
        txn.commit().unwrap();
    }
    for checkpoint in [&corrupt, &foreign] {
        let run = run_host(
            &mut stateful_job(
                sluice_plugin_artifacts::WORDCOUNT,
                &broker.brokers,
                &topic,
                &group,
                &unique("out"),
                checkpoint,
            ),
            LIMIT,
        );
        let file = checkpoint.join("checkpoint.redb").display().to_string();
        run.assert_error(&[&file, "refusing to start over it"]);
    }
    let before = std::fs::read(corrupt.join("checkpoint.redb")).unwrap();
    assert_eq!(before, vec![0x5a; 8192], "a refused checkpoint is left as it was");
    assert_eq!(offsets(&broker.brokers, &topic, &group)[&0].committed, None, "no offset moved");
}

#[test]
fn stateful_and_windowed_jobs_without_their_options_are_refused() {
    let topic = unique("words");
    let broker = BrokerProcess::start(&[(&topic, 1)]);
    let run = |plugin: &str, extra: &[&str]| {
        let mut command = host();
        command.args(["run", "--plugin", plugin, "--brokers", &broker.brokers, "--topic", &topic, "--group", "g"]);
        run_host(command.args(extra), LIMIT)
    };
    run(sluice_plugin_artifacts::WORDCOUNT, &[])
        .assert_error(&["plugin wordcount is a stateful plugin", "pass --checkpoint DIR"]);
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().to_str().unwrap();
    run(sluice_plugin_artifacts::WINDOWED_COUNT, &["--checkpoint", checkpoint])
        .assert_error(&["windowed plugin", "pass --window DURATION"]);
    run(
        sluice_plugin_artifacts::WINDOWED_COUNT,
        &["--checkpoint", checkpoint, "--batch-interval", "1s", "--window", "2500ms"],
    )
    .assert_error(&["--window 2s 500ms is not a multiple of --batch-interval 1s"]);
    run(sluice_plugin_artifacts::WORDCOUNT, &["--checkpoint", checkpoint, "--window", "4s"])
        .assert_error(&["--window is for windowed plugins; plugin wordcount is a stateful plugin"]);
}

#[test]
fn top3_brands_per_category_equal_an_independent_ranking() {
    let (topic, output) = (unique("sales"), unique("top3"));
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let mut random = Seeded(3);
    let (brands, categories) = (["apple", "huawei", "xiaomi", "oppo", "vivo"], ["phone", "pc", "watch"]);
    let sales: Vec<Input> = (0..300)
        .map(|id| {
            // Skewed, so rankings are not ties: brand i sells about (i + 1) times as often.
            let brand = brands[(random.next(15) as f64).sqrt() as usize % brands.len()];
            let category = categories[random.next(3) as usize];
            Input {
                partition: random.next(PARTITIONS as u64) as i32,
                key: None,
                value: format!("{id} {brand} {category}"),
            }
        })
        .collect();
    produce(&broker.brokers, &topic, &sales);
    let checkpoint = dir.path().join("checkpoint");
    let mut command =
        stateful_job(sluice_plugin_artifacts::TOP3, &broker.brokers, &topic, &unique("top3"), &output, &checkpoint);
    run_host(&mut command, LIMIT).assert_success();

    let mut counts: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for sale in &sales {
        let fields: Vec<&str> = sale.value.split(' ').collect();
        *counts.entry(fields[2]).or_default().entry(fields[1]).or_insert(0) += 1;
    }
    let expected: BTreeMap<String, String> = counts
        .into_iter()
        .map(|(category, brands)| {
            let mut ranking: Vec<(&str, u64)> = brands.into_iter().collect();
            ranking.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = ranking.iter().take(3).map(|(brand, n)| format!("{brand}={n}")).collect();
            (category.to_string(), format!("{category}:{}", top.join(",")))
        })
        .collect();
    let mut latest = BTreeMap::new();
    for record in consume(&broker.brokers, &output) {
        latest.insert(record.key.unwrap(), record.value.unwrap());
    }
    assert_eq!(latest, expected);
}

#[test]
fn restarting_with_word_count_v2_migrates_state_lazily_and_counts_continue_exactly() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS), (&output, PARTITIONS)]);
    let group = unique("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let mut random = Seeded(11);
    let job = |plugin: &str| stateful_job(plugin, &broker.brokers, &topic, &group, &output, &checkpoint);

    let mut produced = lines(&mut random, 120);
    produce(&broker.brokers, &topic, &produced);
    run_host(&mut job(sluice_plugin_artifacts::WORDCOUNT), LIMIT).assert_success();

    // v2 sees only some of the words again: those keys are migrated, the others stay at v1.
    let more: Vec<Input> =
        (0..30).map(|n| input_line(n % PARTITIONS, &format!("w{} w{}", n % 7, 40 + n % 3))).collect();
    produce(&broker.brokers, &topic, &more);
    produced.extend(more);
    let v2 = run_host(&mut job(sluice_plugin_artifacts::WORDCOUNT_V2), LIMIT);
    v2.assert_success();
    assert!(v2.stderr().contains("keys from state schema v1 to v2"), "{}", v2.stderr());

    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(&checkpoint), LIMIT).stdout();
    assert!(inspect.contains("wordcount 0.1.0 (state schema 1"), "{inspect}");
    assert!(inspect.contains("wordcount 2.0.0 (state schema 2"), "{inspect}");
    let expected = count(&produced);
    let touched_by_v2 = (0..7).map(|n| format!("w{n}")).chain((40..43).map(|n| format!("w{n}"))).count();
    let untouched = expected.len() - touched_by_v2;
    assert!(inspect.contains(&format!("{untouched} keys at v1, {touched_by_v2} keys at v2")), "{inspect}");

    // Every key's count is exact, whichever encoding it is in now.
    let state = word_counts(&checkpoint);
    assert_eq!(state, expected);
    // The words v2 saw got their latest totals from v2, marked as such and exact.
    let mut records = consume(&broker.brokers, &output);
    records.sort_by_key(|record| (record.partition, record.offset));
    let mut latest = BTreeMap::new();
    for record in records {
        latest.insert(record.key.unwrap(), record.value.unwrap());
    }
    for word in (0..7).map(|n| format!("w{n}")).chain((40..43).map(|n| format!("w{n}"))) {
        assert_eq!(latest[&word], format!("({word},{},v2)", expected[&word]));
    }

    // Going back to v1 would misread v2's encoding.
    run_host(&mut job(sluice_plugin_artifacts::WORDCOUNT), LIMIT)
        .assert_error(&["holds state of plugin wordcount 2.0.0 (state schema 2)", "has the older state schema 1"]);
}

/// The word counts in a checkpoint, whether a key is still in v1's encoding (decimal text) or
/// already in v2's (`{"count": n}`).
pub fn word_counts(checkpoint: &Path) -> BTreeMap<String, u64> {
    let run = run_host(host().args(["checkpoint", "dump"]).arg(checkpoint), LIMIT);
    run.assert_success();
    run.stdout()
        .lines()
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            let state = entry["state"].as_str().unwrap();
            let count = match serde_json::from_str::<serde_json::Value>(state) {
                Ok(serde_json::Value::Object(tally)) => tally["count"].as_u64().unwrap(),
                _ => state.parse().unwrap(),
            };
            (entry["key"].as_str().unwrap().to_string(), count)
        })
        .collect()
}

fn input_line(partition: i32, value: &str) -> Input {
    Input { partition, key: None, value: value.to_string() }
}
