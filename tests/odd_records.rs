//! Records as foreign producers write them: header names that are not UTF-8 (legal in Kafka,
//! written by Go, C and Java clients), empty and huge keys, tombstones, no timestamp, headers
//! without values — seeded random ones and a fixed set. Each reaches the plugin unaltered, or,
//! when the plugin contract cannot carry it, becomes a rejection with its offset that the job's
//! policy dead-letters with the original bytes. And a panic on the batch path ends the job with
//! one error line naming the batch and the partition, committing nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_host::config::Topics;

use crate::harness::{self, BrokerProcess, host, run_host, unique};
use crate::mock_kafka::{MockKafka, RawRecord, run};
use crate::stateful::Seeded;

fn bytes(random: &mut Seeded, max: u64) -> Vec<u8> {
    (0..random.next(max + 1)).map(|_| random.next(256) as u8).collect()
}

/// A header name: mostly text, sometimes any bytes (NUL excepted: librdkafka keeps header
/// names NUL-terminated), sometimes non-ASCII text.
fn header_name(random: &mut Seeded) -> Vec<u8> {
    match random.next(10) {
        0..=6 => format!("h{}", random.next(1000)).into_bytes(),
        7 | 8 => (0..1 + random.next(8)).map(|_| 1 + random.next(255) as u8).collect(),
        _ => "名字".as_bytes().to_vec(),
    }
}

fn random_record(random: &mut Seeded) -> RawRecord {
    let key = match random.next(20) {
        0..=3 => None,
        4 | 5 => Some(Vec::new()),
        6 => Some(vec![b'k'; 100_000]),
        _ => Some(bytes(random, 32)),
    };
    let value = match random.next(20) {
        0..=2 => None,
        3 | 4 => Some(Vec::new()),
        _ => Some(bytes(random, 200)),
    };
    let headers = (0..random.next(5))
        .map(|_| {
            let name = header_name(random);
            let value = if random.next(5) == 0 { None } else { Some(bytes(random, 16)) };
            (name, value)
        })
        .collect();
    RawRecord { key, value, headers }
}

/// The cases named in the issue, whatever the seed produces.
fn fixed_records() -> Vec<RawRecord> {
    let record = |key: Option<&[u8]>, value: Option<&[u8]>, headers: Vec<(&[u8], Option<&[u8]>)>| RawRecord {
        key: key.map(<[u8]>::to_vec),
        value: value.map(<[u8]>::to_vec),
        headers: headers.into_iter().map(|(n, v)| (n.to_vec(), v.map(<[u8]>::to_vec))).collect(),
    };
    vec![
        record(Some(b"k"), Some(b"latin-1 header name"), vec![(b"caf\xe9", Some(b"v"))]),
        record(Some(b"k"), Some(b"invalid continuation"), vec![(b"ok", None), (b"\xc3\x28", Some(b""))]),
        record(Some(b""), Some(b"empty key"), vec![]),
        record(Some(&[b'x'; 250_000]), Some(b"huge key"), vec![]),
        record(Some(b"deleted"), None, vec![]),
        record(Some(b"k"), Some(b"valueless headers"), vec![(b"a", None), (b"a", Some(b"repeated"))]),
    ]
}

fn readable(record: &RawRecord) -> bool {
    record.headers.iter().all(|(name, _)| std::str::from_utf8(name).is_ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_records_reach_the_plugin_unaltered_or_the_dead_letter_topic_with_their_offset() {
    let kafka = MockKafka::new();
    let (topic, output, dead) = (kafka.topic("odd", 2), kafka.topic("odd-out", 2), kafka.topic("odd-dlq", 1));
    let mut random = Seeded(1414);
    let mut inputs: BTreeMap<(i32, i64), RawRecord> = BTreeMap::new();
    let fixed = fixed_records();
    let seeded: Vec<RawRecord> = (0..300).map(|_| random_record(&mut random)).collect();
    kafka.produce_raw(&topic, 0, &fixed);
    kafka.produce_raw(&topic, 1, &seeded);
    // No timestamp (Kafka's -1): written with kafka-python, which can.
    harness::produce_without_timestamps(&kafka.brokers(), &topic, 0, &["no timestamp", "none either"]);
    let mut timeless = 0;
    for (partition, offset, record, timestamp) in kafka.raw_records(&topic) {
        match (partition, offset as usize) {
            (0, offset) if offset < fixed.len() => assert_eq!(record, fixed[offset]),
            (0, _) => {
                assert_eq!(timestamp, None, "{partition}:{offset} has no timestamp (Kafka's -1)");
                timeless += 1;
            }
            (_, offset) => assert_eq!(record, seeded[offset], "the broker kept {partition}:{offset} as produced"),
        }
        inputs.insert((partition, offset), record);
    }
    assert_eq!(timeless, 2);
    let unreadable = inputs.values().filter(|record| !readable(record)).count();
    assert!(unreadable >= 10, "the seed writes enough non-UTF-8 header names: {unreadable}");

    let mut job = kafka.job(sluice_plugin_artifacts::BUSY, Topics::Named(vec![topic.clone()]), "odd");
    job.output_topic = Some(output.clone());
    job.failure.dead_letter_topic = Some(dead.clone());
    let summary = run(job).await;
    assert_eq!(summary.records_in, inputs.len() as u64);
    assert_eq!(summary.rejected, unreadable as u64, "each unreadable record is one rejection");

    // Every readable record comes out exactly once, byte for byte (the plugin passes records
    // through: key, value, headers in order).
    let mut expected: Vec<RawRecord> = inputs.values().filter(|record| readable(record)).cloned().collect();
    let mut outputs: Vec<RawRecord> = kafka.raw_records(&output).into_iter().map(|(_, _, record, _)| record).collect();
    expected.sort();
    outputs.sort();
    assert_eq!(outputs.len(), expected.len());
    assert!(outputs == expected, "outputs differ from the readable inputs");

    // Every unreadable one is dead-lettered once, with its original bytes and its offset.
    let letters = kafka.raw_records(&dead);
    assert_eq!(letters.len(), unreadable);
    for (_, _, letter, _) in letters {
        let header = |name: &str| {
            let found = letter.headers.iter().find(|(n, _)| n == name.as_bytes());
            String::from_utf8(found.and_then(|(_, v)| v.clone()).unwrap_or_default()).unwrap()
        };
        assert_eq!(header("sluice-error-kind"), "unreadable");
        assert!(header("sluice-error").contains("not UTF-8"), "{}", header("sluice-error"));
        let at = (header("sluice-source-partition").parse().unwrap(), header("sluice-source-offset").parse().unwrap());
        let original = &inputs[&at];
        assert_eq!((&letter.key, &letter.value), (&original.key, &original.value), "{at:?}");
        assert_eq!(&letter.headers[..original.headers.len()], &original.headers[..], "{at:?} keeps its headers first");
    }
    let committed = kafka.committed("odd", &topic, 2);
    assert_eq!(committed, BTreeMap::from([(0, Some(fixed.len() as i64 + 2)), (1, Some(seeded.len() as i64))]));
}

#[test]
fn a_panic_on_the_batch_path_names_the_batch_and_the_partition_and_commits_nothing() {
    let topic = unique("panicky");
    let broker = BrokerProcess::start(&[(&topic, 2)]);
    let inputs: Vec<harness::Input> =
        (0..10).map(|n| harness::Input { partition: n % 2, key: None, value: format!("v{n}") }).collect();
    harness::produce(&broker.brokers, &topic, &inputs);
    let group = unique("panicky");
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::BUSY, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", &group, "--auto-offset-reset", "earliest", "--stop-when-caught-up"])
        .env(sluice_host::failpoint::VARIABLE, "record:2:panic");
    let run = run_host(&mut command, Duration::from_secs(60));
    run.assert_error(&[
        "ms: internal error",
        &format!("while reading the records of {topic}:1 [0, 5)"),
        "panicking at record #2",
    ]);
    assert!(harness::offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed.is_none()));
}
