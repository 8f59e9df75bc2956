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
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ORDERS, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--auto-offset-reset", "earliest", "--stop-when-caught-up"])
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
