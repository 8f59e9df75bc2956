//! The stateful step of a batch (`updateStateByKey` / `mapWithState`): shuffle the keyed values
//! of every partition task into state partitions, load the prior state of exactly the keys
//! that have new values (plus those timing out), call `update` once per state partition, and
//! turn the answers into checkpoint writes and outputs.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::parallel::run_parallel;
use super::shuffle::shuffle;
use crate::checkpoint::{BatchChanges, StateView, StateWrite, StoredState, state_partition};
use crate::runtime::{BatchContext, KeyGroup, KeyedValue, OutputRecord, PluginInstance, PluginRuntime, StateChange};

/// What the stateful step needs besides the batch's values.
pub struct StateStep<'a> {
    pub runtime: &'a PluginRuntime,
    /// The checkpoint, seen through uncommitted probation batches.
    pub state: &'a StateView<'a>,
    pub partitions: u32,
    /// The state partitions this host owns (`--shared-state` with other hosts); `None`: all.
    pub owned: Option<&'a std::collections::BTreeSet<u32>>,
    /// `--state-timeout`, in milliseconds.
    pub timeout_ms: Option<i64>,
    pub batch_time: i64,
}

/// One key on its way to `update`: its new values, its prior state, whether it is timing out.
struct Entry {
    key: Vec<u8>,
    values: Vec<Vec<u8>>,
    stored: Option<StoredState>,
    timing_out: bool,
}

/// One state partition's call: its groups and, per group, when the key was last updated.
struct StateTask {
    context: BatchContext,
    groups: Vec<KeyGroup>,
    previous_touched: Vec<Option<i64>>,
}

impl StateStep<'_> {
    /// Migrates the `states` written under an older state schema version to the plugin's,
    /// with one `migrate` call per old version: lazily, as keys are touched.
    fn migrate<'s>(
        &self,
        instances: &mut [PluginInstance],
        states: impl Iterator<Item = &'s mut StoredState>,
    ) -> Result<()> {
        let current = self.runtime.identity().info.state_schema_version;
        let mut outdated: BTreeMap<u32, Vec<&mut StoredState>> = BTreeMap::new();
        for stored in states.filter(|stored| stored.schema != current) {
            outdated.entry(stored.schema).or_default().push(stored);
        }
        for (from, states) in outdated {
            let bytes: Vec<Vec<u8>> = states.iter().map(|stored| stored.bytes.clone()).collect();
            let migrated = instances[0].migrate(from, &bytes).with_context(|| {
                format!(
                    "batch {} ms: cannot migrate {} keys from state schema v{from} to v{current}",
                    self.batch_time,
                    bytes.len()
                )
            })?;
            tracing::info!("migrated {} keys from state schema v{from} to v{current}", migrated.len());
            for (stored, bytes) in states.into_iter().zip(migrated) {
                stored.bytes = bytes;
                stored.schema = current;
            }
        }
        Ok(())
    }

    /// Runs `update` over `values` (each partition task's keyed values, in task order), adds
    /// the state writes to `changes` and returns the outputs, in state partition order.
    pub fn run(
        &self,
        instances: &mut [PluginInstance],
        values: Vec<Vec<KeyedValue>>,
        changes: &mut BatchChanges,
    ) -> Result<Vec<OutputRecord>> {
        let started = std::time::Instant::now();
        let shuffled = shuffle(values, self.partitions);
        let shuffled_at = started.elapsed();
        let keys: Vec<&[u8]> = shuffled.iter().flat_map(|groups| groups.keys().map(Vec::as_slice)).collect();
        // In the order of `keys`: the groups' own order, so no lookup by key is needed.
        let mut stored = self.state.read_state(&keys)?.into_iter();
        let mut idle: Vec<Vec<(Vec<u8>, StoredState)>> = vec![Vec::new(); self.partitions as usize];
        if let Some(timeout) = self.timeout_ms {
            for (key, state) in self.state.idle_keys(self.batch_time - timeout)? {
                let partition = state_partition(&key, self.partitions) as usize;
                if self.owned.is_some_and(|owned| !owned.contains(&(partition as u32))) {
                    continue;
                }
                if !shuffled[partition].contains_key(&key) {
                    idle[partition].push((key, state));
                }
            }
        }
        // Per state partition: the groups in key order, then the keys timing out.
        let mut entries: Vec<Vec<Entry>> = shuffled
            .into_iter()
            .zip(idle)
            .map(|(groups, idle)| {
                let groups = groups.into_iter().map(|(key, values)| Entry {
                    key,
                    values,
                    stored: stored.next().flatten(),
                    timing_out: false,
                });
                let idle = idle.into_iter().map(|(key, state)| Entry {
                    key,
                    values: Vec::new(),
                    stored: Some(state),
                    timing_out: true,
                });
                groups.chain(idle).collect()
            })
            .collect();
        let read_at = started.elapsed();
        self.migrate(instances, entries.iter_mut().flatten().filter_map(|entry| entry.stored.as_mut()))?;

        let mut tasks = Vec::new();
        for (partition, entries) in entries.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            let mut task = StateTask {
                context: BatchContext {
                    topic: String::new(),
                    partition: partition as i32,
                    from_offset: 0,
                    until_offset: 0,
                    batch_time: self.batch_time,
                },
                groups: Vec::with_capacity(entries.len()),
                previous_touched: Vec::with_capacity(entries.len()),
            };
            for Entry { key, values, stored, timing_out } in entries {
                task.previous_touched.push(stored.as_ref().map(|stored| stored.touched));
                task.groups.push(KeyGroup { key, values, state: stored.map(|stored| stored.bytes), timing_out });
            }
            tasks.push(task);
        }

        let prepared_at = started.elapsed();
        let answers = run_parallel(self.runtime, instances, &tasks, |instance, task| {
            let _work = crate::panics::working_on(|| format!("updating state partition {}", task.context.partition));
            instance.update(&task.context, &task.groups)
        })?;
        tracing::debug!(
            "state step of {} keys: shuffle {:?}, state read {:?}, migration and grouping {:?}, update {:?}",
            keys_count(&tasks),
            shuffled_at,
            read_at - shuffled_at,
            prepared_at - read_at,
            started.elapsed() - prepared_at
        );
        let mut outputs = Vec::new();
        for (task, updates) in tasks.into_iter().zip(answers) {
            for ((group, previous_touched), update) in task.groups.into_iter().zip(task.previous_touched).zip(updates) {
                outputs.extend(update.outputs);
                let key = group.key;
                let change = if group.timing_out { StateChange::Remove } else { update.change };
                let write = match (change, group.state, previous_touched) {
                    // Kept state is rewritten too: the key was active, which resets its timeout.
                    (StateChange::Keep, Some(bytes), previous_touched) => {
                        Some(StateWrite::Put { key, bytes, previous_touched })
                    }
                    (StateChange::Keep, None, _) => None,
                    (StateChange::Set(bytes), _, previous_touched) => {
                        Some(StateWrite::Put { key, bytes, previous_touched })
                    }
                    (StateChange::Remove, _, Some(previous_touched)) => {
                        Some(StateWrite::Remove { key, previous_touched })
                    }
                    (StateChange::Remove, _, None) => None,
                };
                changes.state.extend(write);
            }
        }
        Ok(outputs)
    }
}

fn keys_count(tasks: &[StateTask]) -> usize {
    tasks.iter().map(|task| task.groups.len()).sum()
}
