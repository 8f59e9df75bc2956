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

/// A key with its values.
type KeyValues = (Vec<u8>, Vec<Vec<u8>>);

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
        let mut panes: Vec<(Vec<u8>, Vec<u8>)> = panes.into_iter().flatten().collect();
        if self.continuing {
            self.fold_into_earlier_pieces(instances, &mut panes)?;
        }
        changes.panes = panes.into_iter().map(|(key, pane)| (key, self.batch_time, pane)).collect();

        if self.batch_time.rem_euclid(self.slide_ms) != 0 || !self.final_piece {
            return Ok(Vec::new());
        }
        let start = self.batch_time - self.length_ms;
        let mut stored = self.state.panes()?;
        for (key, _, pane) in &changes.panes {
            let panes = stored.entry(key.clone()).or_default();
            // An earlier piece's pane of this batch is replaced by the folded one.
            panes.retain(|(time, _)| *time != self.batch_time);
            panes.push((self.batch_time, pane.clone()));
        }
        let mut previous = if self.invertible { self.state.window_results()? } else { BTreeMap::new() };
        let mut tasks: Vec<SlideTask> = (0..self.partitions)
            .map(|partition| SlideTask {
                context: BatchContext {
                    topic: String::new(),
                    partition: partition as i32,
                    from_offset: start,
                    until_offset: self.batch_time,
                    batch_time: self.batch_time,
                },
                keys: Vec::new(),
            })
            .collect();
        for (key, mut panes) in stored {
            // Panes at or before the window's start are in no later window either.
            changes
                .expired_panes
                .extend(panes.iter().filter(|(time, _)| *time <= start).map(|(time, _)| (key.clone(), *time)));
            let previous = previous.remove(&key);
            if previous.is_none() && panes.iter().all(|(time, _)| *time <= start) {
                continue;
            }
            // Panes already past the window stay in the task: an inverse reduce removes them.
            panes.retain(|(time, _)| *time > start - self.slide_ms);
            let partition = state_partition(&key, self.partitions) as usize;
            tasks[partition].keys.push(KeyWindow { key, panes, previous });
        }
        // Kept results of keys that have no panes left at all.
        for (key, _) in previous {
            changes.dropped_windows.push(key);
        }
        tasks.retain(|task| !task.keys.is_empty());

        let results = run_parallel(self.runtime, instances, &tasks, |instance, task| {
            let _work = crate::panics::working_on(|| {
                format!("sliding the window of state partition {}", task.context.partition)
            });
            slide(instance, task, self.length_ms, self.slide_ms, self.batch_time)
        })?;
        let mut outputs = Vec::new();
        for result in results {
            outputs.extend(result.outputs);
            if self.invertible {
                let results = result.results.into_iter().map(|KeyedValue { key, value }| (key, self.batch_time, value));
                changes.window_results.extend(results);
            }
            changes.dropped_windows.extend(result.dropped);
        }
        Ok(outputs)
    }

    /// Folds this piece's panes into the panes earlier pieces of the same batch committed.
    fn fold_into_earlier_pieces(
        &self,
        instances: &mut [PluginInstance],
        panes: &mut [(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let keys: Vec<&[u8]> = panes.iter().map(|(key, _)| key.as_slice()).collect();
        let earlier = self.state.panes_at(&keys, self.batch_time)?;
        let mut folded = Vec::new();
        let lists: Vec<Vec<Vec<u8>>> = panes
            .iter()
            .zip(earlier)
            .enumerate()
            .filter_map(|(index, ((_, pane), earlier))| {
                earlier.map(|earlier| {
                    folded.push(index);
                    vec![earlier, pane.clone()]
                })
            })
            .collect();
        let reduced = reduce_each(&mut instances[0], lists)?;
        for (index, pane) in folded.into_iter().zip(reduced) {
            panes[index].1 = pane;
        }
        Ok(())
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

/// A state partition's slides to emit this batch: after `from` (0: none emitted yet) and
/// before its watermark.
struct Due {
    partition: u32,
    from: i64,
    watermark: i64,
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
        for (partition, resolved) in resolved.iter() {
            let late = values.iter().filter(|v| state_partition(&v.key, self.partitions) == *partition);
            if let Some(value) = late.clone().find(|v| v.batch_time <= resolved.meta.windows_to) {
                tracing::warn!(
                    "state partition {partition}: values of batch {} ms arrived after its window slide {} ms was \
                     emitted; they count in later windows only",
                    value.batch_time,
                    resolved.meta.windows_to
                );
            }
        }
        changes.panes = self.fold(instance, values)?;

        let due: Vec<Due> = resolved
            .iter()
            .filter_map(|(&partition, r)| {
                r.watermark.map(|watermark| Due { partition, from: r.meta.windows_to, watermark })
            })
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let owned = |key: &[u8]| resolved.contains_key(&state_partition(key, self.partitions));
        let mut panes = self.state.panes()?;
        panes.retain(|key, _| owned(key));
        for (key, time, pane) in &changes.panes {
            let key_panes = panes.entry(key.clone()).or_default();
            key_panes.retain(|(pane_time, _)| pane_time != time);
            key_panes.push((*time, pane.clone()));
            key_panes.sort_by_key(|(time, _)| *time);
        }
        let mut previous = if self.invertible { self.state.window_results()? } else { BTreeMap::new() };
        previous.retain(|key, _| owned(key));

        let mut outputs = Vec::new();
        let mut kept: BTreeMap<Vec<u8>, Option<WindowResult>> = BTreeMap::new();
        for Due { partition, from, watermark } in due {
            let mut end = match from {
                0 => {
                    // The first slide whose window holds the partition's oldest pane.
                    let oldest = panes
                        .iter()
                        .filter(|(key, _)| state_partition(key, self.partitions) == partition)
                        .filter_map(|(_, key_panes)| key_panes.first().map(|(time, _)| *time))
                        .min();
                    match oldest {
                        Some(oldest) => (oldest + self.slide_ms - 1).div_euclid(self.slide_ms) * self.slide_ms,
                        None => watermark,
                    }
                }
                from => from + self.slide_ms,
            };
            let mut emitted = from;
            while end < watermark {
                let task = self.slide_task(partition, end, &panes, &previous);
                if !task.keys.is_empty() {
                    let result = slide(instance, &task, self.length_ms, self.slide_ms, end)?;
                    outputs.extend(result.outputs);
                    for key in result.dropped {
                        previous.remove(&key);
                        kept.insert(key, None);
                    }
                    if self.invertible {
                        for KeyedValue { key, value } in result.results {
                            previous.insert(key.clone(), (end, value.clone()));
                            kept.insert(key, Some((end, value)));
                        }
                    }
                }
                // Panes at or before the window's start are in no later window either.
                let start = end - self.length_ms;
                for (key, key_panes) in panes.iter_mut() {
                    if state_partition(key, self.partitions) == partition {
                        for (time, _) in key_panes.iter().filter(|(time, _)| *time <= start) {
                            changes.expired_panes.push((key.clone(), *time));
                        }
                        key_panes.retain(|(time, _)| *time > start);
                    }
                }
                emitted = end;
                end += self.slide_ms;
            }
            if let Some(r) = resolved.get_mut(&partition) {
                r.meta.windows_to = emitted;
            }
        }
        for (key, result) in kept {
            match result {
                Some((end, value)) => changes.window_results.push((key, end, value)),
                None => changes.dropped_windows.push(key),
            }
        }
        Ok(outputs)
    }

    /// The new values as panes: reduced per key and batch time, and into the pane the key
    /// already has at that time.
    fn fold(&self, instance: &mut PluginInstance, values: Vec<Shuffled>) -> Result<Vec<TimedPane>> {
        let mut groups: BTreeMap<(i64, Vec<u8>), Vec<Vec<u8>>> = BTreeMap::new();
        for Shuffled { key, value, batch_time } in values {
            groups.entry((batch_time, key)).or_default().push(value);
        }
        let mut by_time: BTreeMap<i64, Vec<KeyValues>> = BTreeMap::new();
        for ((time, key), values) in groups {
            by_time.entry(time).or_default().push((key, values));
        }
        let mut panes = Vec::new();
        for (time, groups) in by_time {
            let keys: Vec<&[u8]> = groups.iter().map(|(key, _)| key.as_slice()).collect();
            let earlier = self.state.panes_at(&keys, time)?;
            let lists: Vec<Vec<Vec<u8>>> = groups
                .iter()
                .zip(earlier)
                .map(|((_, values), earlier)| earlier.into_iter().chain(values.iter().cloned()).collect())
                .collect();
            let reduced = reduce_each(instance, lists)?;
            panes.extend(groups.into_iter().zip(reduced).map(|((key, _), pane)| (key, time, pane)));
        }
        Ok(panes)
    }

    /// State partition `partition`'s keys with panes in the window ending at `end` (or one
    /// just left), or a kept result.
    fn slide_task(
        &self,
        partition: u32,
        end: i64,
        panes: &BTreeMap<Vec<u8>, Panes>,
        previous: &BTreeMap<Vec<u8>, WindowResult>,
    ) -> SlideTask {
        let start = end - self.length_ms;
        let mut keys = Vec::new();
        let in_partition = |key: &[u8]| state_partition(key, self.partitions) == partition;
        for (key, key_panes) in panes.iter().filter(|(key, _)| in_partition(key)) {
            let kept = previous.get(key).cloned();
            if kept.is_none() && key_panes.iter().all(|(time, _)| *time <= start || *time > end) {
                continue;
            }
            // Panes just past the window stay: an inverse reduce removes them.
            let window: Panes =
                key_panes.iter().filter(|(time, _)| *time > start - self.slide_ms && *time <= end).cloned().collect();
            keys.push(KeyWindow { key: key.clone(), panes: window, previous: kept });
        }
        for (key, kept) in previous.iter().filter(|(key, _)| in_partition(key) && !panes.contains_key(*key)) {
            keys.push(KeyWindow { key: key.clone(), panes: Vec::new(), previous: Some(kept.clone()) });
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
