//! Tansu, a Kafka-compatible broker nobody here wrote (not librdkafka's mock): transactions as
//! its record batches show them, and several `host` processes sharing a topic through its group
//! coordinator.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};

use crate::harness::{
    Consumed, Input, Running, TansuBroker, assert_committed_at_end, assert_delivered_once, committed_values,
    committed_view, etl_case, host, offsets, owned, produce_one_by_one, records_in, run_host, unique, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn the_committed_view_of_tansu_drops_aborted_transactions() {
    let topic = unique("transactions");
    let broker = TansuBroker::start(&[(&topic, 2)]);
    produce_one_by_one(&broker.brokers, &topic, &[Input { partition: 0, key: None, value: "plain".into() }]);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("transactional.id", unique("writer"))
        .set("linger.ms", "20")
        .create()
        .unwrap();
    producer.init_transactions(TIMEOUT).unwrap();
    let send = |partition: i32, key: &str, value: &str| {
        let headers = OwnedHeaders::new().insert(Header { key: "kind", value: Some(key) });
        let record = BaseRecord::to(&topic).partition(partition).key(key).payload(value).headers(headers);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    };
    producer.begin_transaction().unwrap();
    for n in 0..4 {
        send(n % 2, "aborted", &format!("a{n}"));
    }
    // Written before the abort (an abort drops what is still queued).
    producer.flush(TIMEOUT).unwrap();
    producer.abort_transaction(TIMEOUT).unwrap();
    producer.begin_transaction().unwrap();
    for n in 0..3 {
        send(n % 2, "committed", &format!("c{n}"));
    }
    producer.commit_transaction(TIMEOUT).unwrap();
    producer.begin_transaction().unwrap();
    send(1, "open", "o0");
    producer.flush(TIMEOUT).unwrap();

    let view = committed_view(&broker.brokers, &topic);
    let record = |partition, offset, key: Option<&str>, value: &str| Consumed {
        partition,
        offset,
        key: key.map(str::to_string),
        value: Some(value.to_string()),
        headers: key.map(|key| ("kind".to_string(), Some(key.to_string()))).into_iter().collect(),
    };
    // Each transaction's marker takes an offset after its records.
    let expected = vec![
        record(0, 0, None, "plain"),
        record(0, 4, Some("committed"), "c0"),
        record(0, 5, Some("committed"), "c2"),
        record(1, 3, Some("committed"), "c1"),
    ];
    assert_eq!(view.records, expected, "only the plain record and the committed transaction");
    assert_eq!((view.aborted, view.open), (4, 1), "records of the aborted and of the open transaction");
}

/// `host run` of the ETL plugin as member `host-N` of `group`.
fn etl_host(brokers: &str, topic: &str, output: &str, group: &str, n: usize) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::ETL, "--brokers", brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--instance-id", &format!("host-{n}")])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "200ms", "--kafka", "fetch.wait.max.ms=20"]);
    command
}

#[test]
fn three_hosts_on_tansu_share_the_partitions_and_deliver_every_record_once() {
    let started = Instant::now();
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    // Six partitions, two a host: Tansu answers each partition's fetches and commits on its
    // own, so fewer partitions than the mock cluster's twelve keep it quick.
    let broker = TansuBroker::start(&[(&topic, 6), (&output, 3)]);
    let case = etl_case(0, 600, 6);
    produce_one_by_one(&broker.brokers, &topic, &case.lines[..120]);
    // Started together, the three join the group's first generation (Tansu holds the first
    // JoinGroup for half a session timeout) and get two partitions each in one round.
    let mut hosts: Vec<Running> =
        (1..=3).map(|n| Running::start(etl_host(&broker.brokers, &topic, &output, &group, n))).collect();
    let settling = Instant::now();
    while !hosts.iter_mut().all(|host| owned(host).len() == 2) {
        if settling.elapsed() > LIMIT {
            let logs: Vec<String> = hosts.iter().map(|host| host.seen.join("\n")).collect();
            panic!("the hosts did not settle on two partitions each:\n{}", logs.join("\n\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let all: BTreeSet<String> = hosts.iter_mut().flat_map(owned).collect();
    assert_eq!(all.len(), 6, "the three shares cover the topic: {all:?}");
    let settled = started.elapsed();
    // The coordinator's view (DescribeGroups): three live members. Tansu reports no client ids
    // or assignments, so only their number is checked here.
    let status = run_host(
        host().args(["status", "--json", "--brokers", &broker.brokers, "--group", &group, "--topic", &topic]),
        LIMIT,
    );
    let view: serde_json::Value = serde_json::from_str(&status.assert_success().stdout()).unwrap();
    assert_eq!(view["live"].as_array().map(Vec::len), Some(3), "{view}");
    produce_one_by_one(&broker.brokers, &topic, &case.lines[120..]);
    wait_until("the group has committed every partition to its end", || {
        offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed == Some(o.end))
    });

    let mut logs = Vec::new();
    for (n, mut running) in hosts.into_iter().enumerate() {
        assert!(records_in(&mut running) > 0, "host-{} did part of the work:\n{}", n + 1, running.seen.join("\n"));
        logs.push(running.stop());
    }
    // Read from the record batches: the hosts' producer writes several records a batch, which
    // makes Tansu's high watermark (the last batch's base offset + 1) short for a consumer.
    assert_delivered_once(committed_values(&broker.brokers, &output), &case.expected, &logs);
    assert_committed_at_end(&broker.brokers, &topic, &group);
    eprintln!("three hosts on Tansu: settled after {settled:?}, done after {:?}", started.elapsed());
}

#[test]
fn hosts_joining_one_by_one_while_records_flow_take_over_without_stalling() {
    let (topic, output, group) = (unique("access-log"), unique("clean"), unique("etl"));
    let broker = TansuBroker::start(&[(&topic, 6), (&output, 3)]);
    let case = etl_case(0, 600, 6);
    // Records keep arriving while members join: librdkafka pauses every fetcher of a member
    // during a cooperative rebalance, so a batch waiting for records must end instead of
    // waiting out --broker-timeout.
    let producing = {
        let (brokers, topic, lines) = (broker.brokers.clone(), topic.clone(), case.lines.clone());
        std::thread::spawn(move || {
            for chunk in lines.chunks(20) {
                produce_one_by_one(&brokers, &topic, chunk);
            }
        })
    };
    let mut hosts = vec![Running::start(etl_host(&broker.brokers, &topic, &output, &group, 1))];
    wait_until("host-1 processed records", || records_in(&mut hosts[0]) > 0);
    for n in 2..=3 {
        hosts.push(Running::start(etl_host(&broker.brokers, &topic, &output, &group, n)));
        let joined = hosts.last_mut().unwrap();
        wait_until(&format!("host-{n} owns partitions"), || !owned(joined).is_empty());
    }
    producing.join().unwrap();
    wait_until("the group has committed every partition to its end", || {
        offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed == Some(o.end))
    });
    let logs: Vec<Vec<String>> = hosts.into_iter().map(Running::stop).collect();
    assert_delivered_once(committed_values(&broker.brokers, &output), &case.expected, &logs);
}
