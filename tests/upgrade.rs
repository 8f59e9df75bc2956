//! Hot upgrades of a running `host` through its admin endpoint (`host upgrade`), while records
//! keep arriving: exactly-once switch at a batch boundary, rollback of a failing new version,
//! and refusals that leave the running version undisturbed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{
    BrokerProcess, Input, Running, consume, etl_case, host, offsets, produce, run_host, unique, upgrade,
    upgrade_in_background,
};
use crate::stateful::{Seeded, count, lines, word_counts};

const LIMIT: Duration = Duration::from_secs(60);

/// `host run` of `plugin` over `topic` with a checkpoint in `dir`, until stopped.
fn job(plugin: &str, brokers: &str, topic: &str, output: &str, dir: &Path) -> Command {
    job_every("200ms", plugin, brokers, topic, output, dir)
}

/// As [`job`], with batches every `interval`.
fn job_every(interval: &str, plugin: &str, brokers: &str, topic: &str, output: &str, dir: &Path) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", plugin, "--brokers", brokers, "--topic", topic, "--group", "upgrade"])
        .args(["--output-topic", output, "--auto-offset-reset", "earliest", "--batch-interval", interval])
        .args(["--kafka", "fetch.wait.max.ms=20"])
        .arg("--checkpoint")
        .arg(dir);
    command
}

/// Waits until the group has committed every partition of `topic` to its end.
fn wait_caught_up(brokers: &str, topic: &str) {
    let started = Instant::now();
    while !offsets(brokers, topic, "upgrade").values().all(|o| o.committed == Some(o.end)) {
        assert!(started.elapsed() < LIMIT, "the job did not catch up with {topic}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Produces `inputs` in chunks of ten from a thread, so records keep arriving across batches.
fn produce_steadily(brokers: String, topic: String, inputs: Vec<Input>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for chunk in inputs.chunks(10) {
            produce(&brokers, &topic, chunk);
        }
    })
}

#[test]
fn etl_v1_to_v2_under_load_delivers_every_record_once_v1_before_the_switch_and_v2_after() {
    let (topic, output) = (unique("access-log"), unique("clean"));
    let broker = BrokerProcess::start(&[(&topic, 2), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let case = etl_case(0, 240, 2);
    produce(&broker.brokers, &topic, &case.lines[..20]);
    let running = Running::start(job(sluice_plugin_artifacts::ETL, &broker.brokers, &topic, &output, dir.path()));
    // v1 has processed the first lines before the upgrade is asked for.
    wait_caught_up(&broker.brokers, &topic);
    let producer = produce_steadily(broker.brokers.clone(), topic.clone(), case.lines[20..].to_vec());

    let upgraded = upgrade(sluice_plugin_artifacts::ETL_V2, dir.path(), &[]);
    upgraded.assert_success();
    assert!(upgraded.stdout().starts_with("upgraded from etl 0.1.0"), "{}", upgraded.stdout());
    assert!(upgraded.stdout().contains("to etl 2.0.0"), "{}", upgraded.stdout());
    producer.join().unwrap();
    wait_caught_up(&broker.brokers, &topic);
    running.stop();

    let records = consume(&broker.brokers, &output);
    let versions: Vec<bool> = records.iter().map(|r| r.headers.contains_key("etl-version")).collect();
    let switch = versions.iter().position(|v2| *v2).expect("v2 produced outputs after the switch");
    assert!(switch > 0, "v1 produced outputs before the switch");
    assert!(versions[switch..].iter().all(|v2| *v2), "after the switch every output is v2's");
    let mut delivered: Vec<String> = records.into_iter().map(|r| r.value.unwrap()).collect();
    delivered.sort();
    let mut expected = case.expected.clone();
    expected.sort();
    assert_eq!(delivered, expected, "every valid input line exactly once, no gap");

    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(dir.path()), LIMIT).stdout();
    assert!(
        inspect.contains("etl 0.1.0 (state schema 0") && inspect.contains("etl 2.0.0 (state schema 0"),
        "{inspect}"
    );
}

#[test]
fn a_new_version_that_traps_is_rolled_back_and_the_old_one_reprocesses_its_batch() {
    let (topic, output) = (unique("events"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    // busy passes every value through; misbehave traps on "trap".
    let values: Vec<Input> = (0..60)
        .map(|n| Input { partition: 0, key: None, value: if n % 2 == 0 { "trap".into() } else { format!("ok-{n}") } })
        .collect();
    produce(&broker.brokers, &topic, &values[..10]);
    let mut running = Running::start(job(sluice_plugin_artifacts::BUSY, &broker.brokers, &topic, &output, dir.path()));
    running.wait_for("admin endpoint on");
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::MISBEHAVE, dir.path(), &["--force"]);
    // The rest of the input arrives once misbehave is in: its first batch with records traps.
    running.wait_for("switching from busy");
    let producer = produce_steadily(broker.brokers.clone(), topic.clone(), values[10..].to_vec());
    upgrading.join().unwrap().assert_error(&["rolled back from misbehave 0.1.0", "to busy 0.1.0", "(trap)"]);
    producer.join().unwrap();
    wait_caught_up(&broker.brokers, &topic);
    let status = run_host(host().args(["status", "--json"]).arg("--checkpoint").arg(dir.path()), LIMIT);
    assert!(status.stdout().contains(r#""name": "busy""#), "busy runs again:\n{}", status.stdout());
    running.stop();

    let mut delivered: Vec<String> = consume(&broker.brokers, &output).into_iter().map(|r| r.value.unwrap()).collect();
    delivered.sort();
    let mut expected: Vec<String> = values.into_iter().map(|i| i.value).collect();
    expected.sort();
    assert_eq!(delivered, expected, "nothing lost, nothing twice");
}

#[test]
fn bad_upgrades_are_refused_while_the_running_version_keeps_processing() {
    let (topic, output) = (unique("sales"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let sale = |n: usize| Input { partition: 0, key: None, value: format!("{n} brand{} category{}", n % 3, n % 2) };
    produce(&broker.brokers, &topic, &(0..20).map(sale).collect::<Vec<_>>());
    let mut running = Running::start(job(sluice_plugin_artifacts::TOP3, &broker.brokers, &topic, &output, dir.path()));
    running.wait_for("admin endpoint on");
    wait_caught_up(&broker.brokers, &topic);

    let not_wasm = dir.path().join("notes.txt");
    std::fs::write(&not_wasm, "not a plugin").unwrap();
    let not_wasm = not_wasm.to_str().unwrap();
    let refusals: [(&str, &[&str], &str); 5] = [
        (not_wasm, &[], "is not a WebAssembly file"),
        (sluice_plugin_artifacts::WASI_COMMAND, &[], "is not a component of any Sluice world"),
        (sluice_plugin_artifacts::ETL, &["--force"], "is a transform plugin; the job runs a stateful plugin"),
        (sluice_plugin_artifacts::WORDCOUNT, &[], "is not top3 (another plugin name); pass --force"),
        // Forced onto word count v2, whose migration cannot read top3's state: the dry run says so.
        (sluice_plugin_artifacts::WORDCOUNT_V2, &["--force"], "dry run: cannot migrate a sample of"),
    ];
    for (plugin, extra, reason) in refusals {
        upgrade(plugin, dir.path(), extra).assert_error(&["upgrade refused", reason]);
    }
    // A wrong token is refused before anything else.
    let admin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("admin.json")).unwrap()).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let forged = serde_json::json!({ "address": admin["address"], "token": "0".repeat(64) });
    std::fs::write(elsewhere.path().join("admin.json"), forged.to_string()).unwrap();
    upgrade(sluice_plugin_artifacts::TOP3, elsewhere.path(), &[]).assert_error(&["missing or wrong token"]);

    // Still top3, still processing.
    produce(&broker.brokers, &topic, &(20..30).map(sale).collect::<Vec<_>>());
    wait_caught_up(&broker.brokers, &topic);
    let status = run_host(host().args(["status", "--json"]).arg("--checkpoint").arg(dir.path()), LIMIT);
    assert!(status.stdout().contains(r#""name": "top3""#), "{}", status.stdout());
    running.stop();
}

#[test]
fn an_upgrade_whose_init_refuses_the_jobs_configuration_is_refused() {
    let (topic, output) = (unique("events"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    produce(&broker.brokers, &topic, &[Input { partition: 0, key: None, value: "x".into() }]);
    let mut command = job(sluice_plugin_artifacts::BUSY, &broker.brokers, &topic, &output, dir.path());
    command.args(["--plugin-config", "work-per-record=10"]);
    let mut running = Running::start(command);
    running.wait_for("admin endpoint on");
    // print has no `work-per-record` setting: its init refuses the job's configuration.
    upgrade(sluice_plugin_artifacts::PRINT, dir.path(), &["--force"]).assert_error(&[
        "upgrade refused",
        "refused its configuration",
        "work-per-record",
    ]);
    running.stop();
}

#[test]
fn word_count_v1_to_v2_live_changes_the_state_encoding_and_counts_stay_exact() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, 3), (&output, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let mut random = Seeded(5);
    let produced = lines(&mut random, 200);
    produce(&broker.brokers, &topic, &produced[..40]);
    let running = Running::start(job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &output, dir.path()));
    wait_caught_up(&broker.brokers, &topic);
    let producer = produce_steadily(broker.brokers.clone(), topic.clone(), produced[40..].to_vec());
    let upgraded = upgrade(sluice_plugin_artifacts::WORDCOUNT_V2, dir.path(), &[]);
    upgraded.assert_success();
    assert!(upgraded.stdout().contains("to wordcount 2.0.0"), "{}", upgraded.stdout());
    producer.join().unwrap();
    wait_caught_up(&broker.brokers, &topic);
    running.stop();
    assert_eq!(word_counts(dir.path()), count(&produced));
}

/// Waits until a batch with records was held by a build on probation.
fn wait_held_with_records(running: &mut Running) {
    loop {
        running.wait_for("(held: probation)");
        if !running.seen.last().unwrap().contains("(held: probation): 0 in") {
            return;
        }
    }
}

/// `host run` of the job in `dir` without `--plugin`: the build the checkpoint ran last.
fn job_without_plugin(brokers: &str, topic: &str, output: &str, dir: &Path) -> Command {
    let mut command = host();
    command
        .args(["run", "--brokers", brokers, "--topic", topic, "--group", "upgrade", "--output-topic", output])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "200ms", "--kafka", "fetch.wait.max.ms=20"])
        .arg("--checkpoint")
        .arg(dir);
    command
}

#[test]
fn word_count_v2_failing_its_second_probation_batch_is_rolled_back_and_counts_stay_exact() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, 3), (&output, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let mut random = Seeded(11);
    let produced = lines(&mut random, 120);
    produce(&broker.brokers, &topic, &produced[..40]);
    let mut running =
        Running::start(job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &output, dir.path()));
    wait_caught_up(&broker.brokers, &topic);
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::WORDCOUNT_V2, dir.path(), &[]);
    running.wait_for("switching from wordcount");
    // v2's first probation batch: counted, its state written under schema 2, held.
    produce(&broker.brokers, &topic, &produced[40..41]);
    wait_held_with_records(&mut running);
    // Its second: a word v2 cannot count.
    let crash = Input { partition: 0, key: None, value: "w1 v2-crash w2".into() };
    produce(&broker.brokers, &topic, std::slice::from_ref(&crash));
    let answer = upgrading.join().unwrap();
    answer.assert_error(&["rolled back from wordcount 2.0.0", "to wordcount 0.1.0", "cannot count this word"]);
    assert!(!answer.stderr().contains("halting"), "the job rolls back, it does not halt: {}", answer.stderr());

    // v1 goes on, from state it can read: the held batch and the failed one counted once, by v1.
    produce(&broker.brokers, &topic, &produced[41..]);
    wait_caught_up(&broker.brokers, &topic);
    let status = run_host(host().args(["status", "--json"]).arg("--checkpoint").arg(dir.path()), LIMIT);
    assert!(status.stdout().contains(r#""version": "0.1.0""#), "v1 runs again:\n{}", status.stdout());
    running.stop();
    let mut all = produced;
    all.push(crash);
    assert_eq!(word_counts(dir.path()), count(&all));
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(dir.path()), LIMIT).stdout();
    assert!(!inspect.contains("wordcount 2.0.0"), "nothing of v2 was committed:\n{inspect}");
}

#[test]
fn an_upgraded_build_survives_restarts_and_going_back_to_the_old_file_needs_force() {
    let (topic, output) = (unique("access-log"), unique("clean"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let case = etl_case(0, 90, 1);
    produce(&broker.brokers, &topic, &case.lines[..30]);
    let mut running = Running::start(job(sluice_plugin_artifacts::ETL, &broker.brokers, &topic, &output, dir.path()));
    wait_caught_up(&broker.brokers, &topic);
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::ETL_V2, dir.path(), &[]);
    running.wait_for("switching from etl");
    produce(&broker.brokers, &topic, &case.lines[30..40]);
    wait_held_with_records(&mut running);
    produce(&broker.brokers, &topic, &case.lines[40..50]);
    upgrading.join().unwrap().assert_success();
    wait_caught_up(&broker.brokers, &topic);
    running.stop();
    let upgraded_outputs = consume(&broker.brokers, &output).len();

    // The original file again: refused, both builds named.
    let mut old = job(sluice_plugin_artifacts::ETL, &broker.brokers, &topic, &output, dir.path());
    run_host(old.arg("--stop-when-caught-up"), LIMIT).assert_error(&[
        "runs etl 2.0.0",
        "plugin etl 0.1.0",
        "Leave out --plugin to continue with etl 2.0.0",
        "--force to go back to etl 0.1.0",
    ]);
    // No --plugin: the upgraded build goes on.
    produce(&broker.brokers, &topic, &case.lines[50..70]);
    let mut current = job_without_plugin(&broker.brokers, &topic, &output, dir.path());
    let run = run_host(current.arg("--stop-when-caught-up"), LIMIT);
    run.assert_success();
    assert!(run.stderr().contains("no --plugin: continuing with etl 2.0.0"), "{}", run.stderr());
    let continued = consume(&broker.brokers, &output);
    assert!(continued[upgraded_outputs..].iter().all(|r| r.headers.contains_key("etl-version")), "v2's outputs");
    // --force: back to the old build, on purpose.
    produce(&broker.brokers, &topic, &case.lines[70..]);
    let mut forced = job(sluice_plugin_artifacts::ETL, &broker.brokers, &topic, &output, dir.path());
    let run = run_host(forced.args(["--stop-when-caught-up", "--force"]), LIMIT);
    run.assert_success();
    let records = consume(&broker.brokers, &output);
    assert!(records[continued.len()..].iter().all(|r| !r.headers.contains_key("etl-version")), "v1's outputs");
    let mut delivered: Vec<String> = records.into_iter().map(|r| r.value.unwrap()).collect();
    delivered.sort();
    let mut expected = case.expected.clone();
    expected.sort();
    assert_eq!(delivered, expected, "every valid line once across the upgrade and both restarts");
    let inspect = run_host(host().args(["checkpoint", "inspect"]).arg(dir.path()), LIMIT).stdout();
    assert!(inspect.contains("active build: etl 0.1.0"), "{inspect}");
}

/// Stops `running` with SIGTERM and checks it exits with status 0 within ten seconds.
fn stops_promptly(running: Running) {
    let asked = Instant::now();
    running.stop();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(10), "the host took {took:?} to stop");
}

#[test]
fn stopping_with_an_upgrade_waiting_for_its_batch_boundary_answers_it_and_exits() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    // A long interval: the validated upgrade waits for a boundary that does not come.
    let command = job_every("1h", sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &output, dir.path());
    let mut running = Running::start(command);
    running.wait_for("admin endpoint on");
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::WORDCOUNT_V2, dir.path(), &[]);
    running.wait_for("validated; switching at the next batch");
    stops_promptly(running);
    upgrading.join().unwrap().assert_error(&["upgrade not done", "the job is stopping"]);
}

#[test]
fn stopping_with_an_upgrade_on_probation_commits_nothing_of_it_and_the_restart_replays_its_batches() {
    let (topic, output) = (unique("words"), unique("counts"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let mut random = Seeded(3);
    let produced: Vec<Input> = lines(&mut random, 30).into_iter().map(|line| Input { partition: 0, ..line }).collect();
    produce(&broker.brokers, &topic, &produced[..20]);
    let mut running =
        Running::start(job(sluice_plugin_artifacts::WORDCOUNT, &broker.brokers, &topic, &output, dir.path()));
    wait_caught_up(&broker.brokers, &topic);
    let upgrading = upgrade_in_background(sluice_plugin_artifacts::WORDCOUNT_V2, dir.path(), &[]);
    running.wait_for("switching from wordcount");
    // One batch with records on probation (it needs two), then an idle topic.
    produce(&broker.brokers, &topic, &produced[20..]);
    wait_held_with_records(&mut running);
    stops_promptly(running);
    upgrading.join().unwrap().assert_error(&["upgrade not done", "the job is stopping"]);
    assert_eq!(offsets(&broker.brokers, &topic, "upgrade")[&0].committed, Some(20), "nothing of v2 committed");

    // The next start replays the held batch with the active build, v1.
    let mut restart = job_without_plugin(&broker.brokers, &topic, &output, dir.path());
    let run = run_host(restart.arg("--stop-when-caught-up"), LIMIT);
    run.assert_success();
    assert!(run.stderr().contains("continuing with wordcount 0.1.0"), "{}", run.stderr());
    assert!(run.stderr().contains("(replayed)"), "{}", run.stderr());
    assert_eq!(word_counts(dir.path()), count(&produced));
}

#[test]
fn stopping_while_an_upgrade_is_being_validated_answers_it_and_exits() {
    let (topic, output) = (unique("events"), unique("out"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1)]);
    let dir = tempfile::tempdir().unwrap();
    // A candidate whose `init` spins: validation takes the whole task deadline.
    let slow = crate::hostile::component(
        dir.path(),
        "slow-init",
        "",
        &crate::hostile::outputs_result(0),
        "",
        crate::hostile::SPIN,
    );
    let mut command = job(sluice_plugin_artifacts::BUSY, &broker.brokers, &topic, &output, dir.path());
    command.args(["--task-deadline", "2min"]);
    let mut running = Running::start(command);
    running.wait_for("admin endpoint on");
    let upgrading = {
        let (slow, checkpoint) = (slow.to_str().unwrap().to_string(), dir.path().to_path_buf());
        std::thread::spawn(move || upgrade(&slow, &checkpoint, &["--force"]))
    };
    running.wait_for("validating the upgrade to");
    stops_promptly(running);
    upgrading.join().unwrap().assert_error(&["upgrade not done", "the job is stopping"]);
}
