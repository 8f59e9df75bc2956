//! Benchmark: what bounding a plugin call's CPU time costs, on the ETL plugin.
//!
//! The same 2,000-record partition tasks go through three runtimes in this process: unbounded
//! (the baseline), epoch interruption (Sluice's default: a thread bumps the epoch every 10 ms
//! and compiled code checks it at loop heads and calls) and fuel (a counter decremented as the
//! code runs). Rounds alternate between the runtimes so drift hits them alike; the report gives
//! records per second and the ratio to the baseline.
//!
//! Run with `cargo bench -p sluice-host --bench sandbox`.

use std::time::{Duration, Instant};

use sluice_host::runtime::{BatchContext, CpuLimit, InputRecord, PluginInstance, PluginRuntime, Sandbox};

const RECORDS_PER_TASK: usize = 2_000;
const TASKS_PER_ROUND: usize = 10;
const ROUNDS: usize = 7;

fn main() {
    let records = etl_records(RECORDS_PER_TASK);
    let ctx = BatchContext {
        topic: "access-log".into(),
        partition: 0,
        from_offset: 0,
        until_offset: RECORDS_PER_TASK as i64,
        batch_time: 0,
    };
    let limits = [
        ("unbounded (baseline)", CpuLimit::Unbounded),
        ("epoch deadline", CpuLimit::Epoch),
        ("fuel", CpuLimit::Fuel(u64::MAX / 2)),
    ];
    let mut instances: Vec<(PluginRuntime, PluginInstance)> = limits
        .iter()
        .map(|(_, cpu)| {
            let sandbox = Sandbox { cpu: *cpu, ..Sandbox::default() };
            PluginRuntime::from_bytes(sluice_plugin_artifacts::ETL_WASM, vec![], sandbox).expect("load the ETL plugin")
        })
        .collect();
    // One warm-up task each, then the measured rounds.
    for (_, instance) in &mut instances {
        instance.process(&ctx, &records).expect("ETL task");
    }
    let mut times = vec![Vec::new(); limits.len()];
    for _ in 0..ROUNDS {
        for (i, (_, instance)) in instances.iter_mut().enumerate() {
            let started = Instant::now();
            for _ in 0..TASKS_PER_ROUND {
                let output = instance.process(&ctx, &records).expect("ETL task");
                assert_eq!(output.outputs.len(), RECORDS_PER_TASK);
            }
            times[i].push(started.elapsed());
        }
    }
    let rate = |times: &mut Vec<Duration>| {
        times.sort();
        (RECORDS_PER_TASK * TASKS_PER_ROUND) as f64 / times[times.len() / 2].as_secs_f64()
    };
    let rates: Vec<f64> = times.iter_mut().map(rate).collect();
    println!("CPU bound            | records/s (median round) | throughput / baseline");
    for ((name, _), rate) in limits.iter().zip(&rates) {
        println!("{name:<20} | {rate:>24.0} | {:.3}", rate / rates[0]);
    }
}

/// Valid ETL input lines: 15 fields, each wrapped in `<<<!>>>`.
fn etl_records(count: usize) -> Vec<InputRecord> {
    (0..count)
        .map(|n| {
            let fields = [
                n.to_string(),
                format!("u{}", n % 13),
                format!("201811{:02}{:02}{:02}{:02}", 10 + n % 18, n % 24, n % 60, (n * 7) % 60),
                format!("10.0.{}.{}", n / 250 % 250, n % 250),
                "192.168.1.1".into(),
                (30000 + n % 30000).to_string(),
                "443".into(),
                "example.com".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!("http://example.com/p/{n}"),
                "17".into(),
            ];
            let value = fields.iter().map(|f| format!("<<<!>>>{f}<<<!>>>")).collect::<Vec<_>>().join(",");
            InputRecord {
                offset: n as i64,
                timestamp: None,
                key: None,
                value: Some(value.into_bytes()),
                headers: vec![],
            }
        })
        .collect()
}
