//! Benchmark: the checkpoint's per-batch cost as keyed state grows.
//!
//! Each measured batch does what the engine does for a stateful plugin: read the prior state
//! of the keys it touched, then commit offsets, state changes and plugin identity in one
//! transaction. Batches touch 1,000 keys (900 existing, 100 new), as a busy word count
//! would. State sizes are 1k (the baseline, in this same process), 100k and 1M keys; the
//! report gives each size's median and p95 batch time and its ratio to the baseline, and, for
//! comparison, the time of one pass over every key (what a batch would cost if it visited the
//! whole state, as Spark's `updateStateByKey` does).
//!
//! Run with `cargo bench -p sluice-host --bench checkpoint`.

use std::time::{Duration, Instant};

use sluice_host::checkpoint::{BatchChanges, BatchCommit, Checkpoint, CheckpointView, PendingBatch, StateWrite};
use sluice_host::offsets::{OffsetRange, TopicPartition};
use sluice_host::runtime::{PluginIdentity, PluginInfo};

const TOUCHED_PER_BATCH: usize = 1_000;
const NEW_PER_BATCH: usize = 100;
const MEASURED_BATCHES: usize = 60;
/// Keys per filling transaction: big transactions fill faster but are not what is measured.
const FILL_CHUNK: usize = 50_000;

fn main() {
    let plugin = PluginIdentity {
        info: PluginInfo { name: "bench".into(), version: "1".into(), state_schema_version: 1 },
        digest: "0".repeat(64),
    };
    let mut baseline = None;
    println!("keys in state | median batch | p95 batch | median / baseline | one pass over every key");
    for keys in [1_000usize, 100_000, 1_000_000] {
        let (median, p95, full_pass) = measure(keys, &plugin);
        let base = *baseline.get_or_insert(median);
        println!(
            "{keys:>13} | {:>9.2} ms | {:>6.2} ms | {:>16.2}x | {:>10.2} ms",
            ms(median),
            ms(p95),
            median.as_secs_f64() / base.as_secs_f64(),
            ms(full_pass)
        );
    }
    println!("plan write before each batch (time and ranges of 8 partitions): median {:.2} ms", ms(plan_write()));
}

/// The median time of the durable plan write a batch makes before fetching.
fn plan_write() -> Duration {
    let dir = tempfile::tempdir().expect("temporary directory");
    let checkpoint = Checkpoint::open(dir.path(), 4).expect("open checkpoint");
    let ranges: Vec<OffsetRange> = (0..8)
        .map(|partition| OffsetRange { partition: TopicPartition::new("in", partition), from: 1_000, until: 2_000 })
        .collect();
    let mut times: Vec<Duration> = (0..MEASURED_BATCHES as i64)
        .map(|batch_time| {
            let started = Instant::now();
            checkpoint
                .begin_batch(&[PendingBatch { batch_time, ranges: ranges.clone(), build: None, shared: false }])
                .expect("plan write");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn measure(keys: usize, plugin: &PluginIdentity) -> (Duration, Duration, Duration) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let checkpoint = Checkpoint::open(dir.path(), 4).expect("open checkpoint");
    let key = |n: usize| format!("key-{n:09}").into_bytes();
    let mut batch_time = 1_000;
    for start in (0..keys).step_by(FILL_CHUNK) {
        let state = (start..keys.min(start + FILL_CHUNK))
            .map(|n| StateWrite::Put { key: key(n), bytes: n.to_string().into_bytes(), previous_touched: None })
            .collect();
        commit(&checkpoint, batch_time, BatchChanges { state, ..BatchChanges::default() }, plugin);
        batch_time += 1_000;
    }

    let mut next_new = keys;
    let mut random = 0x2545_f491_4f6c_dd1du64;
    let mut times = Vec::with_capacity(MEASURED_BATCHES);
    for _ in 0..MEASURED_BATCHES {
        let mut touched: Vec<Vec<u8>> = (0..TOUCHED_PER_BATCH - NEW_PER_BATCH)
            .map(|_| {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                key(random as usize % keys)
            })
            .collect();
        touched.extend((next_new..next_new + NEW_PER_BATCH).map(key));
        next_new += NEW_PER_BATCH;
        touched.sort();
        touched.dedup();

        let started = Instant::now();
        let slices: Vec<&[u8]> = touched.iter().map(Vec::as_slice).collect();
        let prior = checkpoint.read_state(&slices).expect("read state");
        let state = touched
            .iter()
            .zip(prior)
            .map(|(key, prior)| {
                let count = prior.as_ref().map_or(0, |p| String::from_utf8_lossy(&p.bytes).parse::<u64>().unwrap_or(0));
                StateWrite::Put {
                    key: key.clone(),
                    bytes: (count + 1).to_string().into_bytes(),
                    previous_touched: prior.map(|p| p.touched),
                }
            })
            .collect();
        commit(&checkpoint, batch_time, BatchChanges { state, ..BatchChanges::default() }, plugin);
        times.push(started.elapsed());
        batch_time += 1_000;
    }
    times.sort();
    drop(checkpoint);
    let view = CheckpointView::open(dir.path()).expect("open checkpoint read-only");
    let started = Instant::now();
    let state = view.state().expect("read every key");
    let full_pass = started.elapsed();
    assert_eq!(state.len(), next_new);
    (times[times.len() / 2], times[times.len() * 95 / 100], full_pass)
}

fn commit(checkpoint: &Checkpoint, batch_time: i64, changes: BatchChanges, plugin: &PluginIdentity) {
    let ranges = [OffsetRange { partition: TopicPartition::new("in", 0), from: batch_time, until: batch_time + 1 }];
    let commit = BatchCommit {
        batch_time,
        ranges: &ranges,
        changes: &changes,
        plugin,
        config: &[],
        member: "bench",
        applied_starts: &[],
    };
    checkpoint.commit(&[commit], &[]).expect("commit");
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
