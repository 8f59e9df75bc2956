//! Bad input refused up front: each case gives one `error:` line naming the thing and the
//! problem, exits non-zero, and leaves the consumer group without a committed offset.

use std::path::Path;
use std::time::Duration;

use crate::harness::{self, BrokerProcess, Run, run_host};

/// Runs `host run` for a fresh group over a topic with records in it, with `args` added, and
/// checks that the group committed nothing.
fn run_refused(plugin: &Path, args: &[&str]) -> Run {
    let topic = harness::unique("bad-in");
    let broker = BrokerProcess::start(&[(&topic, 2)]);
    harness::produce(&broker.brokers, &topic, &harness::etl_case(0, 6, 2).lines);
    let group = harness::unique("bad");
    let run = run_host(
        harness::host()
            .args(["run", "--brokers", &broker.brokers, "--topic", &topic, "--group", &group])
            .args(["--auto-offset-reset", "earliest", "--max-batches", "1", "--batch-interval", "100ms", "--plugin"])
            .arg(plugin)
            .args(args),
        Duration::from_secs(60),
    );
    for (partition, offsets) in harness::offsets(&broker.brokers, &topic, &group) {
        assert_eq!(offsets.committed, None, "partition {partition} was committed by a refused job");
    }
    run
}

fn etl() -> &'static Path {
    Path::new(sluice_plugin_artifacts::ETL)
}

#[test]
fn a_missing_plugin_is_named() {
    run_refused(Path::new("/nonexistent/etl.wasm"), &[]).assert_error(&["/nonexistent/etl.wasm", "No such file"]);
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etl.wasm");
    std::fs::write(&path, "#!/bin/sh\necho not wasm\n").unwrap();
    run_refused(&path, &[]).assert_error(&["etl.wasm", "is not a WebAssembly file"]);
}

#[test]
fn a_core_module_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("core.wasm");
    // The smallest valid core module: magic number and version 1, no sections.
    std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
    run_refused(&path, &[]).assert_error(&["core.wasm", "core Wasm module, not a component", "wasm32-wasip2"]);
}

#[test]
fn a_component_of_another_world_is_refused() {
    run_refused(Path::new(sluice_plugin_artifacts::WASI_COMMAND), &[]).assert_error(&[
        "wasi-command.wasm",
        "is not a component of any Sluice world",
        "sluice:plugin/updater@0.1.0",
        "wasi:cli/run",
    ]);
}

#[test]
fn a_failing_init_is_reported_with_the_plugins_reason() {
    run_refused(etl(), &["--plugin-config", "timezone=Mars/Olympus"]).assert_error(&[
        "etl.wasm",
        "refused its configuration",
        "Mars/Olympus",
    ]);
}

#[test]
fn an_unknown_plugin_config_key_is_named() {
    run_refused(etl(), &["--plugin-config", "time-zone=UTC"]).assert_error(&["refused its configuration", "time-zone"]);
}

#[test]
fn an_unknown_job_file_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, "batch-interval = \"1s\"\nbatch-intervall = \"2s\"\n").unwrap();
    run_refused(etl(), &["--config", path.to_str().unwrap()])
        .assert_error(&["job.toml", "unknown field `batch-intervall`"]);
}

#[test]
fn an_unknown_topic_is_named() {
    run_refused(etl(), &["--topic", "no-such-topic"]).assert_error(&["topic"]);
}

#[test]
fn an_unreachable_broker_is_retried_then_reported() {
    let run = run_host(
        harness::host().args(["run", "--plugin", sluice_plugin_artifacts::ETL]).args([
            "--brokers",
            "127.0.0.1:9",
            "--topic",
            "t",
            "--group",
            "g",
            "--broker-timeout",
            "2s",
        ]),
        Duration::from_secs(60),
    );
    run.assert_error(&["Kafka at 127.0.0.1:9", "gave up after 2s"]);
    assert!(run.stderr().contains("(attempt 1)") && run.stderr().contains("retrying"), "{}", run.stderr());
}
