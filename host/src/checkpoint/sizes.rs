//! How big each state partition is — keys (for windowed jobs: key panes) and bytes — counted
//! once when asked for, then kept current by every write from the values the writes replace,
//! so the metrics never scan the state.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::Result;
use redb::{ReadTransaction, ReadableTable as _};

use super::{PANES, PartitionStats, STATE, state_partition};

/// The bytes a pane costs besides its key and value: its time.
const PANE_TIME_BYTES: usize = 8;

/// Sizes per state partition, once [`Sizes::track`] was called.
#[derive(Default)]
pub(super) struct Sizes(Mutex<Option<Vec<PartitionStats>>>);

/// What one transaction changes in the sizes, applied when it commits; nothing is counted
/// (no key hashed) while the sizes are not tracked.
#[derive(Default)]
pub(super) struct SizeChanges {
    counting: bool,
    changes: BTreeMap<u32, (i64, i64)>,
}

impl SizeChanges {
    /// A state entry of `key` whose stored bytes go from `before` to `after` (`None`: absent).
    pub fn entry(&mut self, partitions: u32, key: &[u8], before: Option<usize>, after: Option<usize>) {
        if !self.counting {
            return;
        }
        let size = |bytes: Option<usize>| bytes.map_or((0, 0), |bytes| (1, (key.len() + bytes) as i64));
        let ((keys_before, bytes_before), (keys_after, bytes_after)) = (size(before), size(after));
        let change = self.changes.entry(state_partition(key, partitions)).or_default();
        change.0 += keys_after - keys_before;
        change.1 += bytes_after - bytes_before;
    }

    /// A pane of `key` whose bytes go from `before` to `after`.
    pub fn pane(&mut self, partitions: u32, key: &[u8], before: Option<usize>, after: Option<usize>) {
        let with_time = |bytes: Option<usize>| bytes.map(|bytes| bytes + PANE_TIME_BYTES);
        self.entry(partitions, key, with_time(before), with_time(after));
    }
}

impl Sizes {
    /// Counts every partition's keys and bytes in `txn` and keeps them current from now on.
    pub fn track(&self, txn: &ReadTransaction, partitions: u32) -> Result<Vec<PartitionStats>> {
        let stats = count(txn, partitions)?;
        *self.0.lock().expect("not poisoned") = Some(stats.clone());
        Ok(stats)
    }

    /// The current sizes, if tracked.
    pub fn get(&self) -> Option<Vec<PartitionStats>> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// An empty set of changes for a transaction: counting if the sizes are tracked.
    pub fn changes(&self) -> SizeChanges {
        SizeChanges { counting: self.0.lock().expect("not poisoned").is_some(), changes: BTreeMap::new() }
    }

    /// Applies a committed transaction's changes.
    pub fn apply(&self, changes: SizeChanges) {
        let mut sizes = self.0.lock().expect("not poisoned");
        let Some(stats) = sizes.as_mut() else { return };
        for (partition, (keys, bytes)) in changes.changes {
            if let Some(stats) = stats.get_mut(partition as usize) {
                stats.keys = stats.keys.saturating_add_signed(keys);
                stats.bytes = stats.bytes.saturating_add_signed(bytes);
            }
        }
    }
}

/// Every partition's entries and bytes: one per key of keyed state, one per key and pane of
/// windows.
fn count(txn: &ReadTransaction, partitions: u32) -> Result<Vec<PartitionStats>> {
    let mut changes = SizeChanges { counting: true, ..SizeChanges::default() };
    for entry in txn.open_table(STATE)?.iter()? {
        let (key, value) = entry?;
        changes.entry(partitions, key.value(), None, Some(value.value().2.len()));
    }
    for entry in txn.open_table(PANES)?.iter()? {
        let (key, value) = entry?;
        changes.pane(partitions, key.value().0, None, Some(value.value().len()));
    }
    let mut stats = vec![PartitionStats::default(); partitions as usize];
    for (partition, (keys, bytes)) in changes.changes {
        stats[partition as usize] = PartitionStats { keys: keys as u64, bytes: bytes as u64 };
    }
    Ok(stats)
}
