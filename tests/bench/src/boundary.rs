//! Plugins without Kafka: the same partition tasks through the sandbox and through the
//! plugin's own crate compiled natively. With the pass-through fixture (`busy` with no work)
//! the difference is the cost of the Wasm boundary alone; with the ETL plugin it is what one
//! core does with the plugin step.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use sluice_host::runtime::{BatchContext, InputRecord, PluginRuntime, Sandbox};
use sluice_sdk::Transform;

use crate::input::etl_line;

/// Records per partition task.
pub const TASK: usize = 10_000;

/// Records per second through each side: the median of alternating rounds.
pub struct Compared {
    pub wasm: f64,
    pub native: f64,
}

impl Compared {
    /// Nanoseconds the sandbox adds to each record.
    pub fn cost_per_record(&self) -> f64 {
        1e9 / self.wasm - 1e9 / self.native
    }
}

/// Runs `rounds` partition tasks of ETL lines through `wasm` (with the default sandbox, so
/// the epoch deadline is armed) and through `native`, alternating, after one warm-up each.
pub fn compare<T: Transform>(wasm: &[u8], mut native: T, expected_outputs: usize, rounds: usize) -> Result<Compared> {
    let records: Vec<InputRecord> = (0..TASK as u64)
        .map(|n| InputRecord {
            offset: n as i64,
            timestamp: Some(0),
            key: None,
            value: Some(etl_line(n).into_bytes()),
            headers: Vec::new(),
        })
        .collect();
    let context =
        BatchContext { topic: "bench".into(), partition: 0, from_offset: 0, until_offset: TASK as i64, batch_time: 0 };
    let native_context = sluice_sdk::BatchContext {
        topic: context.topic.clone(),
        partition: 0,
        from_offset: 0,
        until_offset: TASK as i64,
        batch_time: 0,
    };
    let (_runtime, mut instance) = PluginRuntime::from_bytes(wasm, vec![], Sandbox::default())?;

    let (mut wasm_times, mut native_times) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) + 1 {
        let started = Instant::now();
        let output = instance.process(&context, &records)?;
        wasm_times.push(started.elapsed());
        ensure!(output.outputs.len() == expected_outputs, "the plugin gave {} outputs", output.outputs.len());

        // The native side gets its records the way the host holds them: the host keeps its
        // input (for retries and dead letters), so the plugin works on a copy.
        let started = Instant::now();
        let copy: Vec<sluice_sdk::Record> = records
            .iter()
            .map(|r| sluice_sdk::Record {
                offset: r.offset,
                timestamp: r.timestamp,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: Vec::new(),
            })
            .collect();
        let output = native.process_batch(&native_context, copy).map_err(|e| anyhow!("{e:?}"))?;
        native_times.push(started.elapsed());
        ensure!(output.outputs.len() == expected_outputs, "the native plugin gave {} outputs", output.outputs.len());
    }
    // The first round of each warms caches and allocators.
    let rate = |times: &mut Vec<Duration>| {
        times.remove(0);
        times.sort();
        TASK as f64 / times[times.len() / 2].as_secs_f64()
    };
    Ok(Compared { wasm: rate(&mut wasm_times), native: rate(&mut native_times) })
}
