//! Helpers for unit-testing plugin logic natively with `cargo test`.
//!
//! They drive a [`Transform`] exactly as the host does — configuration through the same
//! `KEY=VALUE` parsing, one `process_batch` call per partition task — without Wasm.

use crate::{BatchContext, BatchOutput, Header, PluginError, Record, Transform};

/// Builds a plugin from `KEY=VALUE` pairs, as the host's `init` call does.
pub fn init<T: Transform>(config: &[(&str, &str)]) -> Result<T, PluginError> {
    let pairs: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    T::init(crate::config::from_pairs(&pairs)?)
}

/// A batch context for `topic` and `partition`, with batch time 0 and an empty range.
pub fn context(topic: &str, partition: i32) -> BatchContext {
    BatchContext { topic: topic.into(), partition, from_offset: 0, until_offset: 0, batch_time: 0 }
}

/// A keyless record at `offset` with the given value.
pub fn record(offset: i64, value: impl Into<Vec<u8>>) -> Record {
    Record { offset, timestamp: None, key: None, value: Some(value.into()), headers: Vec::<Header>::new() }
}

/// Runs one partition task. The context's offset range is widened to cover `records`, as the
/// host's would be.
pub fn run<T: Transform>(plugin: &mut T, ctx: &BatchContext, records: Vec<Record>) -> Result<BatchOutput, PluginError> {
    let mut ctx = ctx.clone();
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        ctx.from_offset = ctx.from_offset.min(first.offset);
        ctx.until_offset = ctx.until_offset.max(last.offset + 1);
    }
    plugin.process_batch(&ctx, records)
}
