//! The PostgreSQL sink against a real server (Debian's PostgreSQL, started by the harness),
//! checked with psql: transactional rows + offsets across crashes, idempotent upserts across
//! replays, and bad databases.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{BrokerProcess, Input, PgServer, host, offsets, produce, run_host, unique};
use crate::stateful::Seeded;

const LIMIT: Duration = Duration::from_secs(60);
const PARTITIONS: i32 = 2;

/// `count` orders numbered from `first`, spread over the partitions.
fn orders(first: usize, count: usize) -> Vec<Input> {
    (first..first + count)
        .map(|n| Input {
            partition: (n % PARTITIONS as usize) as i32,
            key: None,
            value: format!("customer{},{n}", n % 7),
        })
        .collect()
}

/// The `(name, orderid)` rows `inputs` must become.
fn expected_rows(inputs: &[Input]) -> Vec<String> {
    let mut rows: Vec<String> = inputs.iter().map(|i| i.value.replace(',', "|")).collect();
    rows.sort();
    rows
}

fn table_rows(pg: &PgServer) -> Vec<String> {
    let mut rows = pg.psql("SELECT name || '|' || orderid FROM orders");
    rows.sort();
    rows
}

/// `host run` of the orders plugin into table `orders`, in small batches, until caught up.
fn orders_job(pg: &PgServer, brokers: &str, topic: &str, group: &str, mode: &str) -> Command {
    let mut command = orders_running(pg, brokers, topic, group, mode);
    command.arg("--stop-when-caught-up");
    command
}

/// As [`orders_job`], running until stopped.
fn orders_running(pg: &PgServer, brokers: &str, topic: &str, group: &str, mode: &str) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ORDERS, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--auto-offset-reset", "earliest"])
        .args(["--batch-interval", "100ms", "--max-rate-per-partition", "50", "--kafka", "fetch.wait.max.ms=20"])
        .args(["--postgres", &pg.url(), "--postgres-table", "orders", "--postgres-mode", mode]);
    if mode == "upsert" {
        command.args(["--postgres-key", "orderid"]);
    }
    command
}

#[test]
fn transactional_rows_and_offsets_survive_crashes_exactly_once() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint NOT NULL)");
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS)]);
    let group = unique("orders");
    let mut random = Seeded(42);
    let mut produced = Vec::new();
    // 20 runs that end abruptly: crash points around the database commit and elsewhere, and
    // kill -9 at seeded moments; new orders arrive before each.
    let phases = ["fetch", "plugin", "deliver", "database"];
    for run in 0..22 {
        let chunk = orders(produced.len(), 40);
        produce(&broker.brokers, &topic, &chunk);
        produced.extend(chunk);
        let mut command = orders_job(&pg, &broker.brokers, &topic, &group, "transactional");
        if run % 4 == 3 {
            let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            let started = Instant::now();
            let delay = Duration::from_millis(200 + random.next(500));
            while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            child.kill().unwrap();
            child.wait().unwrap();
        } else {
            let phase = phases[random.next(phases.len() as u64) as usize];
            let nth = 1 + random.next(3);
            command.env(sluice_host::failpoint::VARIABLE, format!("{phase}:{nth}"));
            let run = run_host(&mut command, LIMIT);
            assert!(run.stderr().contains(&format!("crashing at {phase} #{nth}")), "{}", run.stderr());
        }
    }
    run_host(&mut orders_job(&pg, &broker.brokers, &topic, &group, "transactional"), LIMIT).assert_success();

    assert_eq!(table_rows(&pg), expected_rows(&produced), "every order exactly once");
    let stored = pg.psql(&format!(
        "SELECT partition || '=' || until_offset FROM sluice_offsets WHERE job = '{group}' ORDER BY partition"
    ));
    let ends: Vec<String> =
        offsets(&broker.brokers, &topic, &group).iter().map(|(p, o)| format!("{p}={}", o.end)).collect();
    assert_eq!(stored, ends, "the offsets table holds the consumed ranges' ends");
}

#[test]
fn upserts_make_replayed_batches_change_nothing() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint PRIMARY KEY)");
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS)]);
    let produced = orders(0, 120);
    produce(&broker.brokers, &topic, &produced);
    let group = unique("orders");
    run_host(&mut orders_job(&pg, &broker.brokers, &topic, &group, "upsert"), LIMIT).assert_success();
    assert_eq!(table_rows(&pg), expected_rows(&produced));

    // Replay everything from the start: the same rows again, as upserts.
    let mut replay = orders_job(&pg, &broker.brokers, &topic, &group, "upsert");
    for partition in 0..PARTITIONS {
        replay.args(["--start", &format!("{topic}:{partition}=0")]);
    }
    let replayed = run_host(&mut replay, LIMIT);
    replayed.assert_success();
    assert_eq!(replayed.summary().records_in, 120);
    assert_eq!(table_rows(&pg), expected_rows(&produced), "replayed batches leave the table as it was");
}

#[test]
fn an_unreachable_database_is_retried_then_the_job_exits_and_nothing_is_committed() {
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS)]);
    produce(&broker.brokers, &topic, &orders(0, 3));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let group = unique("orders");
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ORDERS, "--brokers", &broker.brokers, "--topic", &topic])
        .args([
            "--group",
            &group,
            "--auto-offset-reset",
            "earliest",
            "--broker-timeout",
            "2s",
            "--postgres-table",
            "orders",
        ])
        .args(["--postgres", &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=1")]);
    let run = run_host(&mut command, LIMIT);
    run.assert_error(&["PostgreSQL unreachable: gave up after 2s", "cannot connect to PostgreSQL"]);
    assert!(run.stderr().contains("(PostgreSQL, attempt 1)"), "{}", run.stderr());
    assert!(offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed.is_none()));
}

#[test]
fn a_row_that_breaks_a_constraint_halts_by_default_naming_the_constraint() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint NOT NULL CONSTRAINT positive_orderid CHECK (orderid > 0))");
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS)]);
    let mut inputs = orders(1, 5);
    inputs.push(Input { partition: 0, key: None, value: "mallory,-5".into() });
    produce(&broker.brokers, &topic, &inputs);
    let group = unique("orders");
    let run = run_host(&mut orders_job(&pg, &broker.brokers, &topic, &group, "transactional"), LIMIT);
    run.assert_error(&["for table orders was refused", "positive_orderid", "--on-failure halt"]);
    assert!(table_rows(&pg).is_empty(), "the failed batch wrote nothing");
    assert!(pg.psql("SELECT * FROM sluice_offsets").is_empty(), "and committed no offsets");
    assert!(offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed.is_none()));
}

/// The misbehave fixture echoes each line, so JSON lines become rows exactly as written.
fn echo_rows_job(pg: &PgServer, brokers: &str, topic: &str, group: &str, mode: &str, dead: &str) -> Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::MISBEHAVE, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--auto-offset-reset", "earliest", "--stop-when-caught-up", "--task-retries", "0"])
        .args(["--postgres", &pg.url(), "--postgres-table", "orders", "--postgres-mode", mode])
        .args(["--on-failure", "dead-letter", "--dead-letter-topic", dead]);
    if mode == "upsert" {
        command.args(["--postgres-key", "orderid"]);
    }
    command
}

fn json_lines(lines: &[&str]) -> Vec<Input> {
    lines
        .iter()
        .enumerate()
        .map(|(n, line)| Input { partition: (n % 2) as i32, key: None, value: line.to_string() })
        .collect()
}

#[test]
fn rows_the_database_refuses_are_dead_lettered_and_the_rest_written_once_in_both_modes() {
    for mode in ["transactional", "upsert"] {
        let pg = PgServer::start();
        pg.psql(
            "CREATE TABLE orders (name text NOT NULL, orderid bigint PRIMARY KEY CONSTRAINT positive_orderid CHECK (orderid > 0))",
        );
        let (topic, dead) = (unique("rows"), unique("rows-dlq"));
        let broker = BrokerProcess::start(&[(&topic, PARTITIONS), (&dead, 1)]);
        produce(
            &broker.brokers,
            &topic,
            &json_lines(&[
                r#"{"name":"a","orderid":1}"#,
                r#"{"name":"mallory","orderid":-5}"#,
                r#"{"name":"b","orderid":2}"#,
                r#"{"name":"c","orderid":"three"}"#,
                r#"{"name":"d","orderid":4}"#,
                "not json at all",
            ]),
        );
        let group = unique("rows");
        run_host(&mut echo_rows_job(&pg, &broker.brokers, &topic, &group, mode, &dead), LIMIT).assert_success();
        assert_eq!(table_rows(&pg), ["a|1", "b|2", "d|4"], "{mode}: the good rows, once");
        let letters: Vec<(String, String)> = crate::harness::consume(&broker.brokers, &dead)
            .into_iter()
            .map(|r| (r.value.unwrap_or_default(), r.headers["sluice-error"].clone().unwrap_or_default()))
            .collect();
        assert_eq!(letters.len(), 3, "{mode}: {letters:?}");
        let reason = |value: &str| letters.iter().find(|(v, _)| v.contains(value)).map(|(_, r)| r.as_str()).unwrap();
        assert!(reason("not json").contains("not a JSON object"), "{letters:?}");
        assert!(reason("mallory").contains("positive_orderid"), "{mode}: the constraint is named: {letters:?}");
        assert!(reason("three").contains("invalid input syntax for type bigint"), "{mode}: {letters:?}");
        crate::harness::assert_committed_at_end(&broker.brokers, &topic, &group);
        if mode == "transactional" {
            let stored: i64 = pg.psql("SELECT sum(until_offset) FROM sluice_offsets")[0].parse().unwrap();
            assert_eq!(stored, 6, "the offsets moved with the rows");
        }
    }
}

#[test]
fn upsert_keys_equal_after_the_databases_conversion_are_one_key() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint PRIMARY KEY)");
    let (topic, dead) = (unique("keys"), unique("keys-dlq"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&dead, 1)]);
    let lines =
        [r#"{"name":"first","orderid":1}"#, r#"{"name":"second","orderid":"1"}"#, r#"{"name":"x","orderid":2}"#];
    let inputs: Vec<Input> =
        lines.iter().map(|line| Input { partition: 0, key: None, value: line.to_string() }).collect();
    produce(&broker.brokers, &topic, &inputs);
    let group = unique("keys");
    run_host(&mut echo_rows_job(&pg, &broker.brokers, &topic, &group, "upsert", &dead), LIMIT).assert_success();
    assert_eq!(table_rows(&pg), ["second|1", "x|2"], "1 and \"1\" are one key; the later row wins");
    assert!(crate::harness::consume(&broker.brokers, &dead).is_empty());
}

/// Orders keep arriving while the database restarts, and later stops for a while: the job
/// reconnects (each attempt logged), and every order is in the table exactly once.
#[test]
fn the_database_restarting_or_away_for_a_while_loses_and_duplicates_nothing() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint NOT NULL)");
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, PARTITIONS)]);
    let group = unique("orders");
    let mut command = orders_running(&pg, &broker.brokers, &topic, &group, "transactional");
    command.args(["--postgres-timeout", "30s"]);
    let mut job = crate::harness::Running::start(command);
    let mut produced = Vec::new();
    let wave = |produced: &mut Vec<Input>| {
        let chunk = orders(produced.len(), 30);
        produce(&broker.brokers, &topic, &chunk);
        produced.extend(chunk);
    };
    wave(&mut produced);
    job.wait_for(" in, ");
    pg.restart();
    wave(&mut produced);
    job.wait_for("PostgreSQL");
    pg.stop();
    wave(&mut produced);
    job.wait_for("(PostgreSQL, attempt 2)");
    pg.resume();
    wave(&mut produced);
    // Wait (on the table, not the clock) until every order is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    while table_rows(&pg).len() < produced.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    job.signal();
    let code = job.exit_code();
    assert_eq!(code, Some(0));
    assert_eq!(table_rows(&pg), expected_rows(&produced), "every order exactly once");
}

/// A stale replay — here a `--start` behind what another writer already recorded in
/// `sluice_offsets` — is refused by the offsets' compare-and-set: the batch is abandoned
/// instead of writing rows twice, and the job continues from where the table says.
#[test]
fn a_stale_replay_behind_another_writers_offsets_is_abandoned_instead_of_writing_rows_twice() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE orders (name text NOT NULL, orderid bigint NOT NULL)");
    let topic = unique("orders");
    let broker = BrokerProcess::start(&[(&topic, 1)]);
    let group = unique("orders");
    let on_zero = |inputs: Vec<Input>| inputs.into_iter().map(|o| Input { partition: 0, ..o }).collect::<Vec<_>>();
    let first = on_zero(orders(0, 10));
    produce(&broker.brokers, &topic, &first);
    let job = || {
        let mut command = host();
        command
            .args(["run", "--plugin", sluice_plugin_artifacts::ORDERS, "--brokers", &broker.brokers, "--topic", &topic])
            .args(["--group", &group, "--auto-offset-reset", "earliest", "--stop-when-caught-up"])
            .args(["--postgres", &pg.url(), "--postgres-table", "orders", "--kafka", "fetch.wait.max.ms=20"]);
        command
    };
    run_host(&mut job(), LIMIT).assert_success();
    // Another writer recorded offsets 10..15 of the partition (and wrote those rows itself).
    pg.psql(&format!("UPDATE sluice_offsets SET until_offset = 15 WHERE job = '{group}'"));
    let later = on_zero(orders(10, 10));
    produce(&broker.brokers, &topic, &later);
    let mut stale = job();
    stale.args(["--start", &format!("{topic}:0=10")]);
    let run = run_host(&mut stale, LIMIT);
    run.assert_success();
    let log = run.stderr();
    assert!(log.contains("abandoned uncommitted: sluice_offsets has"), "{log}");
    assert!(log.contains(&format!("{topic}:0 continues at 15")), "{log}");
    let mut expected = first;
    expected.extend(later.into_iter().skip(5));
    assert_eq!(table_rows(&pg), expected_rows(&expected), "no order twice; 10..15 were the other writer's");
    assert_eq!(pg.psql("SELECT until_offset FROM sluice_offsets"), ["20"]);
}
