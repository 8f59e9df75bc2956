//! The seeds' ETL end to end, every part a separate process: `host dev-broker`, `host run`,
//! and Python clients producing the input and checking the output and committed offsets.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::harness::{self, BrokerProcess, etl_case, run_host};

const PARTITIONS: i32 = 3;

struct Job {
    broker: BrokerProcess,
    input: String,
    output: String,
    group: String,
}

impl Job {
    fn new() -> Job {
        let (input, output) = (harness::unique("etl-in"), harness::unique("etl-out"));
        let broker = BrokerProcess::start(&[(&input, PARTITIONS), (&output, PARTITIONS)]);
        Job { broker, input, output, group: harness::unique("etl") }
    }

    /// `host run` over everything available, as a backfill would.
    fn run(&self) -> harness::Run {
        let mut command: Command = harness::host();
        command.args(["run", "--plugin", sluice_plugin_artifacts::ETL]).args([
            "--brokers",
            &self.broker.brokers,
            "--topic",
            &self.input,
            "--group",
            &self.group,
            "--output-topic",
            &self.output,
            "--batch-interval",
            "200ms",
            "--auto-offset-reset",
            "earliest",
            "--stop-when-caught-up",
            "--print",
            "3",
        ]);
        run_host(&mut command, Duration::from_secs(120))
    }

    fn output_values(&self) -> Vec<String> {
        let mut values: Vec<String> =
            harness::consume(&self.broker.brokers, &self.output).into_iter().filter_map(|r| r.value).collect();
        values.sort();
        values
    }
}

fn sorted(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values
}

#[test]
fn every_valid_record_comes_out_exactly_once_and_offsets_follow_the_output() {
    let job = Job::new();
    let first = etl_case(0, 60, PARTITIONS);
    harness::produce(&job.broker.brokers, &job.input, &first.lines);

    let run = job.run();
    run.assert_success();
    assert_eq!(job.output_values(), sorted(first.expected.clone()));
    let summary = run.summary();
    assert_eq!((summary.records_in, summary.outputs, summary.rejected), (60, 48, first.malformed as u64));
    // Every malformed line is reported with its partition and offset.
    assert_eq!(run.rejections(), first.malformed_positions);
    assert!(run.stdout().contains("Time: "), "the print sink shows batches:\n{}", run.stdout());
    harness::assert_committed_at_end(&job.broker.brokers, &job.input, &job.group);

    // Nothing new: a second run reads nothing and writes nothing.
    let again = job.run();
    again.assert_success();
    assert_eq!(again.summary().records_in, 0);
    assert_eq!(job.output_values().len(), first.expected.len());

    // More input: only the new records come out.
    let second = etl_case(60, 15, PARTITIONS);
    harness::produce(&job.broker.brokers, &job.input, &second.lines);
    let third = job.run();
    third.assert_success();
    assert_eq!(third.summary().records_in, 15);
    assert_eq!(third.summary().rejected, second.malformed as u64);
    assert_eq!(job.output_values(), sorted([first.expected, second.expected].concat()));
    harness::assert_committed_at_end(&job.broker.brokers, &job.input, &job.group);
}

#[test]
fn outputs_keep_their_input_key_and_per_key_order() {
    let job = Job::new();
    let case = etl_case(0, 30, PARTITIONS);
    harness::produce(&job.broker.brokers, &job.input, &case.lines);
    job.run().assert_success();

    let outputs = harness::consume(&job.broker.brokers, &job.output);
    // The output key is the input key (the user id, first field of the value), and a key's
    // records keep their input order (their line numbers increase).
    let mut last_seen: BTreeMap<String, i64> = BTreeMap::new();
    for record in &outputs {
        let value = record.value.as_deref().unwrap();
        let key = record.key.clone().unwrap();
        assert_eq!(Some(key.as_str()), value.split('|').next(), "{record:?}");
        let number: i64 = value.rsplit('/').next().unwrap().split('?').next().unwrap().parse().unwrap();
        if let Some(previous) = last_seen.insert(key.clone(), number) {
            assert!(previous < number, "key {key} out of order: {previous} then {number}");
        }
    }
    assert_eq!(outputs.len(), case.expected.len());
}
