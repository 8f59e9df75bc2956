//! Broker faults a real deployment sees every week, injected through librdkafka's mock
//! cluster fault API while a job runs under load: a rolling restart of a three-broker
//! cluster, every broker away for five seconds, leaders moving mid-batch, failing fetch,
//! produce and commit requests, and (against a `host dev-broker` process) connections closed
//! from outside as a broker restart would. Each run must end with every input transformed
//! exactly once — at-least-once mode, no crash, so no duplicate either — and the group's
//! offsets at the log ends, read with confluent-kafka.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use sluice_host::broker::{Api, DevBroker};
use sluice_host::config::{DeliveryGuarantee, JobConfig, Topics};
use sluice_host::engine::{Ending, Engine, Shutdown};

use crate::harness::{self, BrokerProcess, Running, host};
use crate::mock_kafka::MockKafka;

const PARTITIONS: i32 = 12;
const RECORDS: usize = 2400;

/// Produces `RECORDS` numbered values over the partitions in small waves, idempotently (the
/// test's own producer rides out the same faults), and says when it is done.
fn produce_in_waves(brokers: String, topic: String, done: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "60000")
            .create()
            .unwrap();
        for wave in 0..RECORDS / 120 {
            for n in wave * 120..(wave + 1) * 120 {
                let value = format!("record-{n:05}");
                let record = BaseRecord::<(), _>::to(&topic).payload(&value).partition(n as i32 % PARTITIONS);
                producer.send(record).map_err(|(error, _)| error).unwrap();
            }
            std::thread::sleep(Duration::from_millis(80));
        }
        producer.flush(Duration::from_secs(60)).unwrap();
        done.store(true, Ordering::SeqCst);
    })
}

/// A pass-through job over `topic` into `output`, rate-limited so the run spans many batches.
fn job(kafka: &MockKafka, topic: &str, output: &str, group: &str) -> JobConfig {
    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic.into()]), group);
    job.output_topic = Some(output.into());
    job.stop_when_caught_up = false;
    job.broker_timeout = Duration::from_secs(20);
    // Longer than the outages: a member whose brokers were away for a few seconds keeps its
    // partitions (the job's default, not the short one the other tests use).
    job.session_timeout = Duration::from_secs(10);
    job.rate.max_rate_per_partition = Some(300.0);
    job.kafka = vec![("fetch.wait.max.ms".into(), "20".into()), ("socket.timeout.ms".into(), "5000".into())];
    job
}

/// Runs `job` until the producer is done and a batch found every partition caught up, with
/// `faults` injected on another thread meanwhile; then checks the outcome.
async fn survive(kafka: &MockKafka, name: &str, faults: impl FnOnce(&DevBroker, &str) + Send + 'static) {
    survive_with(kafka, name, DeliveryGuarantee::AtLeastOnce, faults).await;
}

/// [`survive`] with a delivery guarantee. With exactly-once, an aborted transaction's records
/// stay in the log and the mock cluster's consumers do not filter them, so duplicates are
/// allowed here; what read_committed readers see is checked on Tansu (tests/exactly_once.rs).
async fn survive_with(
    kafka: &MockKafka,
    name: &str,
    delivery: DeliveryGuarantee,
    faults: impl FnOnce(&DevBroker, &str) + Send + 'static,
) -> usize {
    let (topic, output) = (kafka.topic(name, PARTITIONS), kafka.topic(&format!("{name}-out"), PARTITIONS));
    let group = harness::unique(name);
    let done = Arc::new(AtomicBool::new(false));
    let producer = produce_in_waves(kafka.brokers(), topic.clone(), done.clone());
    let faulted = {
        let (broker, topic) = (kafka.cluster.clone(), topic.clone());
        std::thread::spawn(move || faults(&broker, &topic))
    };
    let mut job = job(kafka, &topic, &output, &group);
    job.delivery = delivery;
    let engine = tokio::task::block_in_place(|| Engine::start(job)).unwrap();
    let (shutdown, stop) = Shutdown::manual();
    let mut abandoned = 0;
    let summary = engine
        .run_observed(shutdown, |report| {
            abandoned += usize::from(report.ending == Ending::Fenced);
            if done.load(Ordering::SeqCst) && faulted.is_finished() && report.caught_up {
                let _ = stop.send(true);
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|error| panic!("the job did not survive {name}: {error:#}"));
    producer.join().unwrap();
    // The job ran until the faults were over (its stop condition), over several batches.
    assert!(summary.batches >= 3, "{summary:?}");

    let inputs = kafka.values(&topic);
    assert_eq!(inputs.len(), RECORDS, "the producer wrote each input once");
    let outputs = kafka.values(&output);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for value in &outputs {
        *counts.entry(value.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = inputs.iter().filter(|value| !counts.contains_key(value.as_str())).collect();
    let doubled: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "{name}: {} inputs lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    if delivery == DeliveryGuarantee::ExactlyOnce {
        // The mock cluster acknowledges offsets sent in a transaction without storing them (the
        // group has none after the run); Tansu's are checked in tests/exactly_once.rs.
        return abandoned;
    }
    harness::assert_committed_at_end(&kafka.brokers(), &topic, &group);
    assert!(
        doubled.is_empty(),
        "{name}: {} outputs doubled without a crash, e.g. {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(5)]
    );
    assert_eq!(outputs.len(), RECORDS);
    abandoned
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_the_cluster_goes_unnoticed() {
    let kafka = MockKafka::with_brokers(3);
    survive(&kafka, "rolling", |broker, topic| {
        std::thread::sleep(Duration::from_millis(800));
        for restarting in 1..=3 {
            // As a controlled shutdown does: leadership moves away first, then the broker goes.
            let successor = restarting % 3 + 1;
            for partition in 0..PARTITIONS {
                broker.set_leader(topic, partition, successor).unwrap();
            }
            broker.broker_down(restarting).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            broker.broker_up(restarting).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_broker_away_for_five_seconds_is_waited_out() {
    let kafka = MockKafka::with_brokers(3);
    survive(&kafka, "outage", |broker, _| {
        std::thread::sleep(Duration::from_millis(800));
        broker.broker_down(-1).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        broker.broker_up(-1).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leaders_moving_mid_batch_are_followed() {
    let kafka = MockKafka::with_brokers(3);
    survive(&kafka, "leaders", |broker, topic| {
        for round in 0..12 {
            std::thread::sleep(Duration::from_millis(250));
            for partition in 0..PARTITIONS {
                broker.set_leader(topic, partition, (partition + round) % 3 + 1).unwrap();
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_fetch_produce_and_commit_requests_are_retried() {
    let kafka = MockKafka::with_brokers(3);
    survive(&kafka, "requests", |broker, _| {
        use RDKafkaErrorCode::*;
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(300));
            broker.push_request_errors(Api::Fetch, &[NotLeaderForPartition, RequestTimedOut, LeaderNotAvailable]);
            broker.push_request_errors(Api::Produce, &[NotEnoughReplicas, RequestTimedOut, LeaderNotAvailable]);
            broker.push_request_errors(Api::OffsetCommit, &[RequestTimedOut, CoordinatorLoadInProgress]);
            broker.push_request_errors(Api::ListOffsets, &[NotLeaderForPartition, RequestTimedOut]);
            broker.push_request_errors(Api::Metadata, &[RequestTimedOut]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_transaction_requests_are_retried_or_aborted_and_run_again() {
    let kafka = MockKafka::with_brokers(3);
    let aborted = survive_with(&kafka, "transactions", DeliveryGuarantee::ExactlyOnce, |broker, _| {
        use RDKafkaErrorCode::*;
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(300));
            // Retriable: the same call goes again.
            broker.push_request_errors(Api::AddPartitionsToTxn, &[ConcurrentTransactions, CoordinatorNotAvailable]);
            broker.push_request_errors(Api::AddOffsetsToTxn, &[CoordinatorLoadInProgress]);
            broker.push_request_errors(Api::EndTxn, &[NotCoordinator, ConcurrentTransactions]);
            broker.push_request_errors(Api::Produce, &[NotEnoughReplicas, RequestTimedOut]);
        }
        // Abortable: the group commit inside the transaction is refused.
        broker.push_request_errors(Api::TxnOffsetCommit, &[IllegalGeneration]);
    })
    .await;
    assert!(aborted >= 1, "the refused offset commit aborted a transaction, and its batch ran again");
}

/// From outside, as an operator sees it: `ss -K` closes the job's TCP connections to a healthy
/// `host dev-broker`, as a broker restart would, several times while the job runs.
#[test]
fn connections_closed_from_outside_are_reconnected() {
    let (topic, output) = (harness::unique("killed"), harness::unique("killed-out"));
    let broker = BrokerProcess::start(&[(&topic, 4), (&output, 4)]);
    let port = broker.brokers.rsplit(':').next().unwrap().to_string();
    let inputs: Vec<harness::Input> =
        (0..400).map(|n| harness::Input { partition: n % 4, key: None, value: format!("line-{n:04}") }).collect();
    let group = harness::unique("killed");
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::BUSY, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", &group, "--output-topic", &output, "--auto-offset-reset", "earliest"])
        .args(["--batch-interval", "100ms", "--max-rate-per-partition", "100", "--kafka", "fetch.wait.max.ms=20"]);
    let produced = Mutex::new(0);
    let mut job = Running::start(command);
    for wave in inputs.chunks(100) {
        harness::produce(&broker.brokers, &topic, wave);
        *produced.lock().unwrap() += wave.len();
        job.wait_for(" in, ");
        // Closes every TCP connection to the broker's port, the job's included.
        let killed =
            Command::new("ss").args(["-K", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")]).output().unwrap();
        assert!(killed.status.success(), "ss -K failed: {}", String::from_utf8_lossy(&killed.stderr));
        job.wait_for("batch ");
    }
    // Every input is read and committed, with the job still running.
    let wanted = *produced.lock().unwrap() as i64;
    let mut committed = 0;
    for _ in 0..200 {
        committed = harness::offsets(&broker.brokers, &topic, &group).values().filter_map(|o| o.committed).sum::<i64>();
        if committed == wanted {
            break;
        }
        job.wait_for("batch ");
    }
    assert_eq!(committed, wanted, "every input committed:\n{}", job.seen.join("\n"));
    job.signal();
    let code = job.exit_code();
    assert_eq!(code, Some(0), "the job survived its connections being closed");
    let mut outputs: Vec<String> =
        harness::consume(&broker.brokers, &output).into_iter().filter_map(|r| r.value).collect();
    outputs.sort();
    let mut expected: Vec<String> = inputs.into_iter().map(|i| i.value).collect();
    expected.sort();
    assert_eq!(outputs, expected);
}
