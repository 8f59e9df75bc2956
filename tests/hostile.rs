//! Plugins written to hurt the host, as components assembled here from WebAssembly text (a
//! Rust guest cannot make these shapes): several memories grown together, 50,000 outputs
//! aliasing one 1 MiB buffer (50 GB once copied), a million-element list, and `describe` or
//! `init` that never return. Each fails its task as `memory` (or is refused before the job
//! touches Kafka), the job goes on under `dead-letter`, and the host's peak memory, read from
//! /proc, stays small. (The contract's types are not recursive, so a "deeply nested" result
//! cannot be expressed: the component's types are checked against the contract's.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{self, BrokerProcess, Running, host, run_host, unique};

/// A component of the `transformer` world: `memories` extra memory declarations, and WAT
/// bodies for `process` (which must leave a result pointer on the stack), `describe` and
/// `init` (which run before answering a valid plugin-info and `ok`).
pub fn component(dir: &Path, name: &str, memories: &str, process: &str, describe: &str, init: &str) -> PathBuf {
    let text = format!(
        r#"(module
  (memory (export "memory") 80)
  {memories}
  (global $next (mut i32) (i32.const 0x500000))
  ;; A bump allocator for what the host lowers into the plugin (its records).
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (i32.and (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.xor (i32.sub (local.get $align) (i32.const 1)) (i32.const -1))))
    (global.set $next (i32.add (local.get $ptr) (local.get $size)))
    (block $enough
      (br_if $enough (i32.le_u (global.get $next) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.add (i32.div_u (i32.sub (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
                                             (i32.const 65536)) (i32.const 1)))))
    (local.get $ptr))
  (data (i32.const 0x80) "hostile")
  (data (i32.const 0x90) "1.0.0")
  ;; plugin-info {{ name, version, state-schema-version }}
  (func (export "describe") (result i32)
    {describe}
    (i32.store (i32.const 0x40) (i32.const 0x80)) (i32.store (i32.const 0x44) (i32.const 7))
    (i32.store (i32.const 0x48) (i32.const 0x90)) (i32.store (i32.const 0x4c) (i32.const 5))
    (i32.store (i32.const 0x50) (i32.const 0))
    (i32.const 0x40))
  ;; result<_, plugin-error>: ok
  (func (export "init") (param i32 i32) (result i32)
    {init}
    (i32.store8 (i32.const 0x60) (i32.const 0))
    (i32.const 0x60))
  ;; result<batch-output, plugin-error> at 0x100: ok, outputs (ptr, len), rejections (ptr, len)
  (func (export "sluice:plugin/transform@0.1.0#process")
        (param i32 i32 i32 i64 i64 i64 i32 i32) (result i32)
    (local $i i32) (local $rec i32)
    {process}))"#
    );
    let mut module = wat::parse_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../wit")).unwrap();
    let world = resolve.select_world(&[package], Some("transformer")).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    let component =
        wit_component::ComponentEncoder::default().module(&module).unwrap().validate(true).encode().unwrap();
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, component).unwrap();
    path
}

/// An ok result with `count` outputs at 0x800000 (whatever memory holds there).
pub fn outputs_result(count: u32) -> String {
    format!(
        "(i32.store8 (i32.const 0x100) (i32.const 0))
         (i32.store (i32.const 0x104) (i32.const 0x800000)) (i32.store (i32.const 0x108) (i32.const {count}))
         (i32.store (i32.const 0x10c) (i32.const 0)) (i32.store (i32.const 0x110) (i32.const 0))
         (i32.const 0x100)"
    )
}

/// 50,000 output records at 0x800000, each (44 bytes: topic, key, value, headers) with a
/// value of the same 1 MiB at 0x10000.
fn aliasing() -> String {
    let fill = "(drop (memory.grow (i32.const 100)))
        (block $done (loop $fill
          (br_if $done (i32.ge_u (local.get $i) (i32.const 50000)))
          (local.set $rec (i32.add (i32.const 0x800000) (i32.mul (local.get $i) (i32.const 44))))
          (i32.store8 (local.get $rec) (i32.const 0))
          (i32.store8 (i32.add (local.get $rec) (i32.const 12)) (i32.const 0))
          (i32.store8 (i32.add (local.get $rec) (i32.const 24)) (i32.const 1))
          (i32.store (i32.add (local.get $rec) (i32.const 28)) (i32.const 0x10000))
          (i32.store (i32.add (local.get $rec) (i32.const 32)) (i32.const 0x100000))
          (i32.store (i32.add (local.get $rec) (i32.const 36)) (i32.const 0))
          (i32.store (i32.add (local.get $rec) (i32.const 40)) (i32.const 0))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $fill)))";
    format!("{fill}\n{}", outputs_result(50_000))
}

/// A million empty outputs (zeroed memory reads as none, none, none, no headers).
fn huge_list() -> String {
    format!("(drop (memory.grow (i32.const 800)))\n{}", outputs_result(1_000_000))
}

/// Three more memories, each grown by 100 MiB: each alone is within --max-memory, together
/// they are not.
fn memories() -> String {
    let grow = |memory: &str| format!("(drop (memory.grow {memory} (i32.const 1600)))");
    format!("{}\n{}\n{}\n{}", grow("$m1"), grow("$m2"), grow("$m3"), outputs_result(0))
}

pub const SPIN: &str = "(loop $spin (br $spin))";

/// `host run` of `plugin` with dead letters, running until stopped.
fn job(plugin: &Path, broker: &BrokerProcess, topic: &str, dead: &str, limits: &[&str]) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin"])
        .arg(plugin)
        .args(["--brokers", &broker.brokers, "--topic", topic, "--group", &unique("hostile")])
        .args(["--auto-offset-reset", "earliest", "--batch-interval", "200ms", "--kafka", "fetch.wait.max.ms=20"])
        .args(["--on-failure", "dead-letter", "--dead-letter-topic", dead, "--task-retries", "0"])
        .args(limits);
    command
}

/// The peak resident memory of process `pid`, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Runs the hostile `plugin` over three records: every record is dead-lettered as `memory`
/// with `reason` in its error, the job keeps running, and the host's peak RSS stays under
/// `rss_mib`. Returns the peak.
fn contained(plugin: &Path, limits: &[&str], reason: &str, rss_mib: u64) -> u64 {
    let (topic, dead) = (unique("hostile-in"), unique("hostile-dlq"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&dead, 1)]);
    let inputs: Vec<harness::Input> =
        (0..3).map(|n| harness::Input { partition: 0, key: None, value: format!("r{n}") }).collect();
    harness::produce(&broker.brokers, &topic, &inputs);
    let mut running = Running::start(job(plugin, &broker, &topic, &dead, limits));
    running.wait_for("3 dead letters");
    // The job goes on: another batch after the failures.
    running.wait_for("0 in, 0 out");
    let peak = peak_rss_mib(running.pid());
    running.signal();
    let code = running.exit_code();
    assert_eq!(code, Some(0));
    let letters = harness::consume(&broker.brokers, &dead);
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.headers["sluice-error-kind"].as_deref(), Some("memory"), "{letter:?}");
        let error = letter.headers["sluice-error"].clone().unwrap();
        assert!(error.contains(reason), "{error}");
    }
    assert!(peak < rss_mib, "the host's peak RSS was {peak} MiB (bound {rss_mib} MiB)");
    peak
}

#[test]
fn fifty_thousand_outputs_aliasing_one_buffer_are_refused_before_they_are_copied() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = component(dir.path(), "aliasing", "", &aliasing(), "", "");
    let peak = contained(&plugin, &["--max-output-bytes", "64MiB"], "--max-output-bytes", 400);
    eprintln!("aliasing outputs: peak RSS {peak} MiB");
}

#[test]
fn a_million_element_result_is_refused_before_its_vector_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = component(dir.path(), "huge", "", &huge_list(), "", "");
    let peak = contained(&plugin, &["--max-output-bytes", "64MiB"], "--max-output-bytes", 400);
    eprintln!("huge list: peak RSS {peak} MiB");
}

#[test]
fn several_memories_count_together_against_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "(memory $m1 1) (memory $m2 1) (memory $m3 1)";
    let plugin = component(dir.path(), "memories", extra, &memories(), "", "");
    let peak = contained(&plugin, &[], "exceeded its memory limit", 400);
    eprintln!("several memories: peak RSS {peak} MiB");
}

#[test]
fn describe_or_init_that_never_return_are_refused_before_kafka_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    for (name, describe, init, function) in [("describe", SPIN, "", "describe"), ("init", "", SPIN, "init")] {
        let plugin = component(dir.path(), name, "", &outputs_result(0), describe, init);
        let mut command = host();
        command
            .args(["run", "--plugin"])
            .arg(&plugin)
            // No broker at all: the plugin is refused first.
            .args(["--brokers", "127.0.0.1:1", "--topic", "t", "--group", "g", "--task-deadline", "1s"]);
        let run = run_host(&mut command, Duration::from_secs(60));
        run.assert_error(&[&format!("in {function}"), "ran past its deadline of 1s"]);
    }
}
