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

/// Runs one batch of a [`Stateful`](crate::Stateful) plugin natively, as the host does with a
/// single state partition: `process` over `records`, values grouped by key, `update` per key
/// with the prior state from `state`, which is then updated. Returns the outputs.
pub fn run_stateful<T: crate::Stateful>(
    plugin: &mut T,
    state: &mut std::collections::BTreeMap<T::Key, T::State>,
    records: Vec<Record>,
) -> Result<Vec<crate::Output>, PluginError> {
    use crate::Codec;
    use crate::wit::updater::exports::sluice::plugin::stateful::{KeyGroup, StateChange};

    let keyed = crate::__private::process_keyed(&context("test", 0), records, |ctx, record, out| {
        plugin.process(ctx, record, out)
    })?;
    let mut groups: Vec<KeyGroup> = Vec::new();
    for value in keyed.values {
        match groups.iter_mut().find(|group| group.key == value.key) {
            Some(group) => group.values.push(value.value),
            None => {
                let key = T::Key::decode(&value.key).map_err(PluginError::failed)?;
                let prior = state.get(&key).map(Codec::encode);
                groups.push(KeyGroup { key: value.key, values: vec![value.value], state: prior, timing_out: false });
            }
        }
    }
    let keys: Vec<Vec<u8>> = groups.iter().map(|group| group.key.clone()).collect();
    let mut outputs = keyed.outputs;
    for (key, update) in keys.iter().zip(crate::__private::update_groups(plugin, groups)?) {
        let key = T::Key::decode(key).map_err(PluginError::failed)?;
        match update.change {
            StateChange::Keep => {}
            StateChange::Set(bytes) => {
                state.insert(key, T::State::decode(&bytes).map_err(PluginError::failed)?);
            }
            StateChange::Remove => {
                state.remove(&key);
            }
        }
        outputs.extend(update.outputs);
    }
    Ok(outputs)
}

/// Reduces `records` as one window of a [`Windowed`](crate::Windowed) plugin natively: `process`
/// over the records, then `reduce` per key, left to right. Returns each key's window result.
pub fn run_window<T: crate::Windowed>(
    plugin: &mut T,
    records: Vec<Record>,
) -> Result<std::collections::BTreeMap<T::Key, T::Value>, PluginError> {
    use crate::Codec;

    let keyed = crate::__private::process_windowed(plugin, &context("test", 0), records)?;
    let mut window = std::collections::BTreeMap::new();
    for value in keyed.values {
        let key = T::Key::decode(&value.key).map_err(PluginError::failed)?;
        let value = T::Value::decode(&value.value).map_err(PluginError::failed)?;
        let total = match window.remove(&key) {
            Some(total) => plugin.reduce(total, value),
            None => value,
        };
        window.insert(key, total);
    }
    Ok(window)
}
