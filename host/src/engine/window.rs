//! The windowed step of a batch (`reduceByKeyAndWindow`): fold each key's values of the batch
//! into one pane, and at every slide combine each key's panes inside the window into its
//! window result, with the plugin's inverse reduce when it has one.

use std::collections::BTreeMap;

use anyhow::Result;

use super::parallel::run_parallel;
use super::shuffle::{Groups, shuffle};
use crate::checkpoint::{BatchChanges, Panes, StateView, WindowResult, state_partition};
use crate::runtime::{BatchContext, KeyedValue, OutputRecord, PluginInstance, PluginRuntime, TaskError};

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
        changes.panes = panes.into_iter().flatten().collect();
        if self.continuing {
            self.fold_into_earlier_pieces(instances, &mut changes.panes)?;
        }

        if self.batch_time.rem_euclid(self.slide_ms) != 0 || !self.final_piece {
            return Ok(Vec::new());
        }
        let start = self.batch_time - self.length_ms;
        let mut stored = self.state.panes()?;
        for (key, pane) in &changes.panes {
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
            self.slide(instance, task)
        })?;
        let mut outputs = Vec::new();
        for result in results {
            outputs.extend(result.outputs);
            if self.invertible {
                changes.window_results.extend(result.results.into_iter().map(|KeyedValue { key, value }| (key, value)));
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

    /// One state partition's window results: by inverse reduce from the previous slide's
    /// result where there is one, else by reducing every pane in the window.
    fn slide(&self, instance: &mut PluginInstance, task: &SlideTask) -> Result<SlideResult, TaskError> {
        let start = self.batch_time - self.length_ms;
        let previous_end = self.batch_time - self.slide_ms;
        let mut dropped = Vec::new();
        let mut full = Vec::new(); // (key, lists to reduce: the whole window)
        let mut incremental = Vec::new(); // (key, previous, leaving panes, entering panes)
        for window in &task.keys {
            if window.panes.iter().all(|(time, _)| *time <= start) {
                dropped.push(window.key.clone());
                continue;
            }
            let values = |from: i64, to: i64| -> Vec<Vec<u8>> {
                window
                    .panes
                    .iter()
                    .filter(|(time, _)| *time > from && *time <= to)
                    .map(|(_, pane)| pane.clone())
                    .collect()
            };
            match &window.previous {
                Some((end, previous)) if *end == previous_end => incremental.push((
                    window.key.clone(),
                    previous.clone(),
                    values(previous_end - self.length_ms, start),
                    values(previous_end, self.batch_time),
                )),
                _ => full.push((window.key.clone(), values(start, self.batch_time))),
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
