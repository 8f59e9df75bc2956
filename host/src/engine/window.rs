//! The windowed step of a batch (`reduceByKeyAndWindow`): fold each key's values of the batch
//! into one pane, and at every slide combine each key's panes inside the window into its
//! window result, with the plugin's inverse reduce when it has one. In one process the slide
//! due at a batch's time is emitted by that batch ([`WindowStep`]); with `--shared-state`
//! values reach their state partition through the shuffle topic a batch or more later, so a
//! partition emits each slide once its watermark has passed it ([`SharedWindowStep`]).

use std::collections::BTreeMap;

use anyhow::Result;

use super::parallel::run_parallel;
use super::shuffle::{Groups, shuffle};
use crate::checkpoint::{BatchChanges, Panes, StateView, TimedPane, WindowResult, state_partition};
use crate::runtime::{BatchContext, KeyedValue, OutputRecord, PluginInstance, PluginRuntime, TaskError};
use crate::shared_state::{Resolved, Shuffled};

/// A key and its pane at some time.
type KeyedPane = (Vec<u8>, Vec<u8>);

/// What the windowed step needs besides the batch's values.
pub struct WindowStep<'a> {
    pub runtime: &'a PluginRuntime,
    /// The checkpoint, seen through uncommitted probation batches.
    pub state: &'a StateView<'a>,
    pub partitions: u32,
    pub length_ms: i64,
    pub slide_ms: i64,
    /// Whether the plugin has an inverse reduce.
    pub invertible: bool,
    pub batch_time: i64,
    /// An earlier piece of this batch committed panes at its time: fold into them.
    pub continuing: bool,
    /// No piece of this batch follows: a slide due at its time is emitted now.
    pub final_piece: bool,
}

/// One key's panes at a slide, and its previous window result if kept.
struct KeyWindow {
    key: Vec<u8>,
    /// Those in the window and those that just left it.
    panes: Panes,
    previous: Option<WindowResult>,
}

/// One state partition's window state: each key's panes and its kept window result.
#[derive(Default)]
struct PartitionWindows {
    panes: BTreeMap<Vec<u8>, Panes>,
    kept: BTreeMap<Vec<u8>, WindowResult>,
}

/// One state partition's work at a slide.
struct SlideTask {
    context: BatchContext,
    keys: Vec<KeyWindow>,
}

/// What a state partition's slide produced.
struct SlideResult {
    outputs: Vec<OutputRecord>,
    results: Vec<KeyedValue>,
    dropped: Vec<Vec<u8>>,
}

impl WindowStep<'_> {
    /// Adds the batch's panes (and, at a slide, expired panes and kept results) to `changes`
    /// and returns the outputs: the window results when this batch ends a slide, else none.
    pub fn run(
        &self,
        instances: &mut [PluginInstance],
        values: Vec<Vec<KeyedValue>>,
        changes: &mut BatchChanges,
    ) -> Result<Vec<OutputRecord>> {
        let shuffled: Vec<Groups> =
            shuffle(values, self.partitions).into_iter().filter(|groups| !groups.is_empty()).collect();
        let panes = run_parallel(self.runtime, instances, &shuffled, |instance, groups| {
            let lists: Vec<Vec<Vec<u8>>> = groups.values().cloned().collect();
            let panes = reduce_each(instance, lists)?;
            Ok(groups.keys().cloned().zip(panes).collect::<Vec<_>>())
        })?;
        let mut panes: Vec<KeyedPane> = panes.into_iter().flatten().collect();
        if self.continuing {
            // An earlier piece of this batch committed panes at its time: fold into them.
            fold_into_stored(self.state, &mut instances[0], self.batch_time, &mut panes)?;
        }
        changes.panes = panes.into_iter().map(|(key, pane)| (key, self.batch_time, pane)).collect();

        if self.batch_time.rem_euclid(self.slide_ms) != 0 || !self.final_piece {
            return Ok(Vec::new());
        }
        let mut windows = load_windows(self.state, self.partitions, self.invertible, |_| true)?;
        for (key, time, pane) in &changes.panes {
            windows.entry(state_partition(key, self.partitions)).or_default().put(key, *time, pane);
        }
        let end = self.batch_time;
        let tasks: Vec<SlideTask> = windows
            .iter()
            .map(|(&partition, windows)| windows.task(partition, end, self.length_ms, self.slide_ms))
            .filter(|task| !task.keys.is_empty())
            .collect();
        let results = run_parallel(self.runtime, instances, &tasks, |instance, task| {
            let _work = crate::panics::working_on(|| {
                format!("sliding the window of state partition {}", task.context.partition)
            });
            slide(instance, task, self.length_ms, self.slide_ms, end)
        })?;
        let mut kept = BTreeMap::new();
        let mut outputs = Vec::new();
        for (task, result) in tasks.iter().zip(results) {
            let windows = windows.get_mut(&(task.context.partition as u32)).expect("a task per partition");
            outputs.extend(windows.apply(result, end, self.invertible, &mut kept));
        }
        for windows in windows.values_mut() {
            windows.expire(end - self.length_ms, &mut changes.expired_panes);
        }
        record_kept(kept, changes);
        Ok(outputs)
    }
}

/// The windowed step of a batch for the state partitions this host owns (`--shared-state`).
pub struct SharedWindowStep<'a> {
    /// The checkpoint, seen through uncommitted probation batches.
    pub state: &'a StateView<'a>,
    pub partitions: u32,
    pub length_ms: i64,
    pub slide_ms: i64,
    /// Whether the plugin has an inverse reduce.
    pub invertible: bool,
}

impl SharedWindowStep<'_> {
    /// Folds each owned partition's resolved values into the panes of the batches that read
    /// them, then emits every slide its watermark has passed, oldest first. Adds the panes,
    /// expiries and kept results to `changes`, moves each partition's `windows_to` in its
    /// resolved meta, and returns the slides' outputs.
    pub fn run(
        &self,
        instance: &mut PluginInstance,
        resolved: &mut BTreeMap<u32, Resolved>,
        changes: &mut BatchChanges,
    ) -> Result<Vec<OutputRecord>> {
        let values: Vec<Shuffled> = resolved.values_mut().flat_map(|r| std::mem::take(&mut r.values)).collect();
        changes.panes = self.fold(instance, resolved, values)?;
        if resolved.values().all(|r| r.watermark.is_none()) {
            return Ok(Vec::new());
        }
        let mut windows = load_windows(self.state, self.partitions, self.invertible, |p| resolved.contains_key(&p))?;
        for (key, time, pane) in &changes.panes {
            windows.entry(state_partition(key, self.partitions)).or_default().put(key, *time, pane);
        }
        let mut kept = BTreeMap::new();
        let mut outputs = Vec::new();
        for (&partition, resolved) in resolved.iter_mut() {
            let Some(watermark) = resolved.watermark else { continue };
            let windows = windows.entry(partition).or_default();
            let mut end = match resolved.meta.windows_to {
                // None emitted yet: the first slide whose window holds the oldest pane.
                0 => match windows.panes.values().filter_map(|panes| panes.first()).map(|(time, _)| *time).min() {
                    Some(oldest) => (oldest + self.slide_ms - 1).div_euclid(self.slide_ms) * self.slide_ms,
                    None => continue,
                },
                emitted => emitted + self.slide_ms,
            };
            while end < watermark {
                let task = windows.task(partition, end, self.length_ms, self.slide_ms);
                if !task.keys.is_empty() {
                    let result = slide(instance, &task, self.length_ms, self.slide_ms, end)?;
                    outputs.extend(windows.apply(result, end, self.invertible, &mut kept));
                }
                windows.expire(end - self.length_ms, &mut changes.expired_panes);
                resolved.meta.windows_to = end;
                end += self.slide_ms;
            }
        }
        record_kept(kept, changes);
        Ok(outputs)
    }

    /// The new values as panes: reduced per key and batch time in one plugin call, then into
    /// the pane the key already has at that time. A value for a slide its partition emitted
    /// already counts in later windows only, and is said so.
    fn fold(
        &self,
        instance: &mut PluginInstance,
        resolved: &BTreeMap<u32, Resolved>,
        values: Vec<Shuffled>,
    ) -> Result<Vec<TimedPane>> {
        let mut groups: BTreeMap<(i64, Vec<u8>), Vec<Vec<u8>>> = BTreeMap::new();
        for Shuffled { key, value, batch_time } in values {
            groups.entry((batch_time, key)).or_default().push(value);
        }
        let mut late = BTreeMap::new();
        for (time, key) in groups.keys() {
            let partition = state_partition(key, self.partitions);
            let emitted = resolved.get(&partition).map_or(0, |r| r.meta.windows_to);
            if *time <= emitted {
                late.insert(partition, (*time, emitted));
            }
        }
        for (partition, (time, emitted)) in late {
            tracing::warn!(
                "state partition {partition}: values of batch {time} ms arrived after its window slide {emitted} ms \
                 was emitted; they count in later windows only"
            );
        }
        let (mut keys, mut lists) = (Vec::with_capacity(groups.len()), Vec::with_capacity(groups.len()));
        for (key, values) in groups {
            keys.push(key);
            lists.push(values);
        }
        let reduced = reduce_each(instance, lists)?;
        let mut by_time: BTreeMap<i64, Vec<KeyedPane>> = BTreeMap::new();
        for ((time, key), pane) in keys.into_iter().zip(reduced) {
            by_time.entry(time).or_default().push((key, pane));
        }
        let mut panes = Vec::new();
        for (time, mut at_time) in by_time {
            fold_into_stored(self.state, instance, time, &mut at_time)?;
            panes.extend(at_time.into_iter().map(|(key, pane)| (key, time, pane)));
        }
        Ok(panes)
    }
}

impl PartitionWindows {
    /// Sets `key`'s pane at `time`, replacing one there.
    fn put(&mut self, key: &[u8], time: i64, pane: &[u8]) {
        let panes = self.panes.entry(key.to_vec()).or_default();
        panes.retain(|(pane_time, _)| *pane_time != time);
        panes.push((time, pane.to_vec()));
        panes.sort_by_key(|(time, _)| *time);
    }

    /// The slide ending at `end`: every key with a pane in the window or one that just left
    /// it (an inverse reduce takes it out), and every key with a kept result.
    fn task(&self, partition: u32, end: i64, length_ms: i64, slide_ms: i64) -> SlideTask {
        let start = end - length_ms;
        let mut keys = Vec::new();
        for (key, panes) in &self.panes {
            let previous = self.kept.get(key).cloned();
            if previous.is_none() && panes.iter().all(|(time, _)| *time <= start || *time > end) {
                continue;
            }
            let panes: Panes =
                panes.iter().filter(|(time, _)| *time > start - slide_ms && *time <= end).cloned().collect();
            keys.push(KeyWindow { key: key.clone(), panes, previous });
        }
        // Kept results of keys without panes: the slide drops them.
        for (key, previous) in self.kept.iter().filter(|(key, _)| !self.panes.contains_key(*key)) {
            keys.push(KeyWindow { key: key.clone(), panes: Vec::new(), previous: Some(previous.clone()) });
        }
        let context = BatchContext {
            topic: String::new(),
            partition: partition as i32,
            from_offset: start,
            until_offset: end,
            batch_time: end,
        };
        SlideTask { context, keys }
    }

    /// Takes in a slide's results: kept for an inverse reduce at the next slide (`invertible`)
    /// or dropped, as `changes` records them; returns its outputs.
    fn apply(
        &mut self,
        result: SlideResult,
        end: i64,
        invertible: bool,
        changes: &mut BTreeMap<Vec<u8>, Option<WindowResult>>,
    ) -> Vec<OutputRecord> {
        for key in result.dropped {
            self.kept.remove(&key);
            changes.insert(key, None);
        }
        for KeyedValue { key, value } in result.results.into_iter().filter(|_| invertible) {
            self.kept.insert(key.clone(), (end, value.clone()));
            changes.insert(key, Some((end, value)));
        }
        result.outputs
    }

    /// Drops the panes at or before `start` (a window's start): they are in no later window.
    fn expire(&mut self, start: i64, expired: &mut Vec<(Vec<u8>, i64)>) {
        for (key, panes) in &mut self.panes {
            expired.extend(panes.iter().filter(|(time, _)| *time <= start).map(|(time, _)| (key.clone(), *time)));
            panes.retain(|(time, _)| *time > start);
        }
        self.panes.retain(|_, panes| !panes.is_empty());
    }
}

/// The panes, and with an inverse reduce the kept results, of the state partitions `owned`
/// says, by partition (each key's partition computed once).
fn load_windows(
    state: &StateView<'_>,
    partitions: u32,
    invertible: bool,
    owned: impl Fn(u32) -> bool,
) -> Result<BTreeMap<u32, PartitionWindows>> {
    let mut windows: BTreeMap<u32, PartitionWindows> = BTreeMap::new();
    for (key, panes) in state.panes()? {
        let partition = state_partition(&key, partitions);
        if owned(partition) {
            windows.entry(partition).or_default().panes.insert(key, panes);
        }
    }
    if invertible {
        for (key, kept) in state.window_results()? {
            let partition = state_partition(&key, partitions);
            if owned(partition) {
                windows.entry(partition).or_default().kept.insert(key, kept);
            }
        }
    }
    Ok(windows)
}

/// Writes the kept results a batch's slides set or dropped into `changes`.
fn record_kept(kept: BTreeMap<Vec<u8>, Option<WindowResult>>, changes: &mut BatchChanges) {
    for (key, result) in kept {
        match result {
            Some((end, value)) => changes.window_results.push((key, end, value)),
            None => changes.dropped_windows.push(key),
        }
    }
}

/// Folds `panes` (key, pane at `time`) into the panes the keys already have at `time`.
fn fold_into_stored(
    state: &StateView<'_>,
    instance: &mut PluginInstance,
    time: i64,
    panes: &mut [KeyedPane],
) -> Result<()> {
    let keys: Vec<&[u8]> = panes.iter().map(|(key, _)| key.as_slice()).collect();
    let stored = state.panes_at(&keys, time)?;
    let mut folded = Vec::new();
    let lists: Vec<Vec<Vec<u8>>> = panes
        .iter()
        .zip(stored)
        .enumerate()
        .filter_map(|(index, ((_, pane), stored))| {
            stored.map(|stored| {
                folded.push(index);
                vec![stored, pane.clone()]
            })
        })
        .collect();
    let reduced = reduce_each(instance, lists)?;
    for (index, pane) in folded.into_iter().zip(reduced) {
        panes[index].1 = pane;
    }
    Ok(())
}

/// One state partition's window results at the slide ending at `window_end`: by inverse reduce from
/// the previous slide's result where there is one, else by reducing every pane in the window.
fn slide(
    instance: &mut PluginInstance,
    task: &SlideTask,
    length_ms: i64,
    slide_ms: i64,
    window_end: i64,
) -> Result<SlideResult, TaskError> {
    let start = window_end - length_ms;
    let previous_end = window_end - slide_ms;
    let mut dropped = Vec::new();
    let mut full = Vec::new(); // (key, lists to reduce: the whole window)
    let mut incremental = Vec::new(); // (key, previous, leaving panes, entering panes)
    for window in &task.keys {
        if window.panes.iter().all(|(time, _)| *time <= start) {
            dropped.push(window.key.clone());
            continue;
        }
        let values = |from: i64, to: i64| -> Vec<Vec<u8>> {
            window.panes.iter().filter(|(time, _)| *time > from && *time <= to).map(|(_, pane)| pane.clone()).collect()
        };
        match &window.previous {
            Some((end, previous)) if *end == previous_end => incremental.push((
                window.key.clone(),
                previous.clone(),
                values(previous_end - length_ms, start),
                values(previous_end, window_end),
            )),
            _ => full.push((window.key.clone(), values(start, window_end))),
        }
    }

    // Every list the slide reduces, in one call: whole windows, then leaving and entering
    // panes of the incremental keys (empty lists are skipped by `reduce_each`).
    let mut lists: Vec<Vec<Vec<u8>>> = full.iter().map(|(_, panes)| panes.clone()).collect();
    for (_, _, leaving, entering) in &incremental {
        lists.push(leaving.clone());
        lists.push(entering.clone());
    }
    let mut reduced = reduce_each(instance, lists)?.into_iter();
    let mut results: Vec<KeyedValue> =
        full.into_iter().map(|(key, _)| KeyedValue { key, value: reduced.next().expect("one per list") }).collect();

    let mut pairs = Vec::new(); // (previous, leaving) for keys with panes leaving
    let mut parts = Vec::new(); // (key, has leaving, entering)
    for (key, previous, leaving, entering) in incremental {
        let (leaving_total, entering_total) = (reduced.next().expect("leaving"), reduced.next().expect("entering"));
        if !leaving.is_empty() {
            pairs.push((previous.clone(), leaving_total));
        }
        parts.push((key, previous, !leaving.is_empty(), (!entering.is_empty()).then_some(entering_total)));
    }
    let mut removed = match instance.inverse_reduce(&pairs)? {
        Some(values) => values.into_iter(),
        None => Vec::new().into_iter(),
    };
    let mut to_add = Vec::new();
    for (key, previous, had_leaving, entering) in parts {
        let base = if had_leaving { removed.next().expect("one per pair") } else { previous };
        match entering {
            Some(entering) => to_add.push((key, vec![base, entering])),
            None => results.push(KeyedValue { key, value: base }),
        }
    }
    let added = reduce_each(instance, to_add.iter().map(|(_, list)| list.clone()).collect())?;
    results.extend(to_add.into_iter().zip(added).map(|((key, _), value)| KeyedValue { key, value }));
    results.sort_by(|a, b| a.key.cmp(&b.key));

    let outputs = instance.present(&task.context, &results)?;
    Ok(SlideResult { outputs, results, dropped })
}

/// Reduces each list to one value in one plugin call; a single value is its own result and
/// an empty list yields an empty value (callers do not use it).
fn reduce_each(instance: &mut PluginInstance, lists: Vec<Vec<Vec<u8>>>) -> Result<Vec<Vec<u8>>, TaskError> {
    let needed: Vec<Vec<Vec<u8>>> = lists.iter().filter(|list| list.len() > 1).cloned().collect();
    let mut reduced = if needed.is_empty() { Vec::new() } else { instance.reduce(&needed)? }.into_iter();
    Ok(lists
        .into_iter()
        .map(|mut list| match list.len() {
            0 => Vec::new(),
            1 => list.pop().expect("one value"),
            _ => reduced.next().expect("one result per list"),
        })
        .collect())
}
