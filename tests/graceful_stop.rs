//! Stopping a running job with signals, `host` as a process: the first SIGTERM finishes the
//! batch in flight and commits it; a second exits at once, and the next run replays the batch.

use std::process::Command;
use std::time::Duration;

use crate::harness::{self, BrokerProcess, Running, run_host};

const RECORDS: usize = 400;

struct Job {
    broker: BrokerProcess,
    input: String,
    output: String,
    group: String,
}

impl Job {
    /// A topic of records that each take a few milliseconds to process.
    fn new() -> Job {
        let (input, output) = (harness::unique("stop-in"), harness::unique("stop-out"));
        let broker = BrokerProcess::start(&[(&input, 2), (&output, 2)]);
        let lines: Vec<harness::Input> = (0..RECORDS)
            .map(|n| harness::Input { partition: (n % 2) as i32, key: None, value: format!("record-{n:04}") })
            .collect();
        harness::produce(&broker.brokers, &input, &lines);
        Job { broker, input, output, group: harness::unique("stop") }
    }

    fn command(&self) -> Command {
        let mut command = harness::host();
        command.args(["run", "--plugin", sluice_plugin_artifacts::BUSY, "--plugin-config", "work-per-record=4000000"]);
        command.args(["--brokers", &self.broker.brokers, "--topic", &self.input, "--group", &self.group]);
        command.args(["--output-topic", &self.output, "--auto-offset-reset", "earliest", "--batch-interval", "100ms"]);
        // 250 records/s × 0.1 s = 25 records a partition per batch: batches long enough to
        // signal while one is in flight.
        command.args(["--max-rate-per-partition", "250", "--parallelism", "1"]);
        command.env("SLUICE_LOG", "debug");
        command
    }

    /// Every output value, sorted.
    fn outputs(&self) -> Vec<String> {
        let mut values: Vec<String> =
            harness::consume(&self.broker.brokers, &self.output).into_iter().filter_map(|r| r.value).collect();
        values.sort();
        values
    }

    fn assert_every_record_exactly_once(&self) {
        let expected: Vec<String> = (0..RECORDS).map(|n| format!("record-{n:04}")).collect();
        assert_eq!(self.outputs(), expected);
        harness::assert_committed_at_end(&self.broker.brokers, &self.input, &self.group);
    }

    /// Finishes what a stopped run left.
    fn catch_up(&self) {
        let mut command = self.command();
        command.arg("--stop-when-caught-up");
        run_host(&mut command, Duration::from_secs(120)).assert_success();
    }
}

#[test]
fn sigterm_finishes_the_batch_in_flight_and_loses_nothing() {
    let job = Job::new();
    let mut running = Running::start(job.command());
    running.wait_for("started batch");
    running.signal();
    let code = running.exit_code();
    assert_eq!(code, Some(0), "a graceful stop exits 0");
    // The batch in flight was committed: the group is past the start, not at the end yet.
    let committed: i64 =
        harness::offsets(&job.broker.brokers, &job.input, &job.group).values().map(|o| o.committed.unwrap_or(0)).sum();
    assert!(committed > 0 && committed < RECORDS as i64, "committed {committed}");
    job.catch_up();
    job.assert_every_record_exactly_once();
}

#[test]
fn a_second_signal_exits_at_once_and_the_batch_is_replayed() {
    let job = Job::new();
    let mut running = Running::start(job.command());
    // Let one batch complete, then stop twice while the next is being processed.
    running.wait_for("started batch");
    running.wait_for("started batch");
    running.signal();
    running.wait_for("stop requested");
    running.signal();
    let code = running.exit_code();
    assert_eq!(code, Some(130), "an immediate exit is not a success");
    let offsets = harness::offsets(&job.broker.brokers, &job.input, &job.group);
    let committed: i64 = offsets.values().map(|o| o.committed.unwrap_or(0)).sum();
    assert!(committed < RECORDS as i64, "the batch in flight must not be committed");
    job.catch_up();
    job.assert_every_record_exactly_once();
}
