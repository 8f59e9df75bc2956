//! The state as the next batch sees it: what the checkpoint holds, plus the changes of batches
//! a new plugin build ran on probation that are not committed yet (they commit together when
//! probation passes, or not at all when it is rolled back, so the old build never meets state
//! only the new one can read).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;

use super::{BatchChanges, Checkpoint, Panes, StateWrite, StoredState, WindowResult};

/// One uncommitted batch's changes, with what the checkpoint would record for them.
#[derive(Debug)]
pub struct HeldChanges {
    pub batch_time: i64,
    /// The state schema version its state is written in (the new build's).
    pub schema: u32,
    pub changes: BatchChanges,
}

/// The checkpoint seen through uncommitted batches, oldest first.
pub struct StateView<'a> {
    pub checkpoint: &'a Checkpoint,
    pub held: &'a [HeldChanges],
}

impl StateView<'_> {
    /// The latest held write of every key a held batch wrote: its state, or `None` if removed.
    fn held_state(&self) -> HashMap<&[u8], Option<StoredState>> {
        let mut written = HashMap::new();
        for held in self.held {
            for write in &held.changes.state {
                match write {
                    StateWrite::Put { key, bytes, .. } => {
                        let stored =
                            StoredState { touched: held.batch_time, schema: held.schema, bytes: bytes.clone() };
                        written.insert(key.as_slice(), Some(stored));
                    }
                    StateWrite::Remove { key, .. } => {
                        written.insert(key.as_slice(), None);
                    }
                }
            }
        }
        written
    }

    /// The stored state of each of `keys`, in order.
    pub fn read_state(&self, keys: &[&[u8]]) -> Result<Vec<Option<StoredState>>> {
        let mut stored = self.checkpoint.read_state(keys)?;
        if self.held.is_empty() {
            return Ok(stored);
        }
        let written = self.held_state();
        for (key, stored) in keys.iter().zip(&mut stored) {
            if let Some(held) = written.get(key) {
                stored.clone_from(held);
            }
        }
        Ok(stored)
    }

    /// Every key whose last update was at or before `idle_since`, with its state.
    pub fn idle_keys(&self, idle_since: i64) -> Result<Vec<(Vec<u8>, StoredState)>> {
        let mut idle = self.checkpoint.idle_keys(idle_since)?;
        if self.held.is_empty() {
            return Ok(idle);
        }
        let written = self.held_state();
        idle.retain(|(key, _)| !written.contains_key(key.as_slice()));
        for (key, stored) in written {
            if let Some(stored) = stored.filter(|stored| stored.touched <= idle_since) {
                idle.push((key.to_vec(), stored));
            }
        }
        Ok(idle)
    }

    /// Every window pane, by key, in pane time order.
    pub fn panes(&self) -> Result<BTreeMap<Vec<u8>, Panes>> {
        let mut panes = self.checkpoint.panes()?;
        for held in self.held {
            for (key, time, pane) in &held.changes.panes {
                let key_panes = panes.entry(key.clone()).or_default();
                key_panes.retain(|(pane_time, _)| pane_time != time);
                key_panes.push((*time, pane.clone()));
                key_panes.sort_by_key(|(time, _)| *time);
            }
            for (key, time) in &held.changes.expired_panes {
                if let Some(key_panes) = panes.get_mut(key) {
                    key_panes.retain(|(pane_time, _)| pane_time != time);
                }
            }
        }
        panes.retain(|_, key_panes| !key_panes.is_empty());
        Ok(panes)
    }

    /// The kept window result of each key that has one.
    pub fn window_results(&self) -> Result<BTreeMap<Vec<u8>, WindowResult>> {
        let mut results = self.checkpoint.window_results()?;
        for held in self.held {
            for (key, end, value) in &held.changes.window_results {
                results.insert(key.clone(), (*end, value.clone()));
            }
            for key in &held.changes.dropped_windows {
                results.remove(key);
            }
        }
        Ok(results)
    }

    /// The pane of each of `keys` at `batch_time`, in order.
    pub fn panes_at(&self, keys: &[&[u8]], batch_time: i64) -> Result<Vec<Option<Vec<u8>>>> {
        match self.held.iter().rev().find(|held| held.batch_time == batch_time) {
            Some(held) => {
                let panes: HashMap<&[u8], &Vec<u8>> = held
                    .changes
                    .panes
                    .iter()
                    .filter(|(_, time, _)| *time == batch_time)
                    .map(|(key, _, pane)| (key.as_slice(), pane))
                    .collect();
                Ok(keys.iter().map(|key| panes.get(key).map(|pane| (*pane).clone())).collect())
            }
            None => self.checkpoint.panes_at(keys, batch_time),
        }
    }

    /// The state partitions the checkpoint splits keys into.
    pub fn state_partitions(&self) -> Result<u32> {
        self.checkpoint.state_partitions()
    }
}
