//! `host demo`, as a new user runs it from the README.

use std::time::Duration;

use crate::harness::{self, run_host};

#[test]
fn the_demo_runs_the_etl_and_shows_committed_offsets() {
    let run = run_host(
        harness::host().args(["demo", "--batches", "2", "--batch-interval", "300ms"]),
        Duration::from_secs(120),
    );
    run.assert_success();
    let stdout = run.stdout();
    assert_eq!(stdout.matches("Time: ").count(), 2, "two printed batches:\n{stdout}");
    assert!(stdout.contains("committed offsets of consumer group sluice-demo"), "{stdout}");
    // 20 lines per batch, every seventh malformed: lines 3, 10, 17, 24, 31 and 38.
    assert!(stdout.contains("2 batches: 40 records in, 34 outputs to etl-output, 6 rejected"), "{stdout}");
    for line in stdout.lines().filter(|line| line.trim_start().starts_with("etl-input:")) {
        assert!(line.trim_end().ends_with(" 0"), "lag must be 0: {line}");
    }
}
