//! The cost of the Wasm boundary alone: a pass-through plugin (the `busy` fixture with no
//! work) over partition tasks of ETL-sized records, through the sandbox and natively, no Kafka.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use sluice_host::runtime::{BatchContext, InputRecord, PluginRuntime, Sandbox};
use sluice_sdk::Transform as _;

use crate::input::etl_line;

/// Records per partition task.
pub const TASK: usize = 10_000;

/// Records per second through each side, over `rounds` alternating rounds (the median).
pub struct Boundary {
    pub wasm: f64,
    pub native: f64,
}

impl Boundary {
    /// Nanoseconds the boundary adds to each record.
    pub fn cost_per_record(&self) -> f64 {
        1e9 / self.wasm - 1e9 / self.native
    }
}

pub fn measure(rounds: usize) -> Result<Boundary> {
    let lines: Vec<Vec<u8>> = (0..TASK as u64).map(|n| etl_line(n).into_bytes()).collect();
    let context = BatchContext {
        topic: "boundary".into(),
        partition: 0,
        from_offset: 0,
        until_offset: TASK as i64,
        batch_time: 0,
    };
    let records: Vec<InputRecord> = lines
        .iter()
        .enumerate()
        .map(|(offset, line)| InputRecord {
            offset: offset as i64,
            timestamp: Some(0),
            key: None,
            value: Some(line.clone()),
            headers: Vec::new(),
        })
        .collect();
    let (_runtime, mut wasm) =
        PluginRuntime::from_bytes(sluice_plugin_artifacts::BUSY_WASM, vec![], Sandbox::default())?;
    let mut native = busy::Busy::init(busy::Config { work_per_record: 0 }).map_err(|e| anyhow!("{e:?}"))?;
    let native_context = sluice_sdk::BatchContext {
        topic: context.topic.clone(),
        partition: 0,
        from_offset: 0,
        until_offset: TASK as i64,
        batch_time: 0,
    };

    let (mut wasm_times, mut native_times) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) + 1 {
        let started = Instant::now();
        let output = wasm.process(&context, &records)?;
        wasm_times.push(started.elapsed());
        ensure!(output.outputs.len() == TASK, "the pass-through plugin lost records");

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
        ensure!(output.outputs.len() == TASK, "the native pass-through lost records");
    }
    // The first round of each warms caches and allocators.
    let rate = |times: &mut Vec<Duration>| {
        times.remove(0);
        times.sort();
        TASK as f64 / times[times.len() / 2].as_secs_f64()
    };
    Ok(Boundary { wasm: rate(&mut wasm_times), native: rate(&mut native_times) })
}
