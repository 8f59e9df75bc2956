//! Per state partition facts for `--shared-state` (which input each partition has applied,
//! where its shuffle and changelog partitions stand), committed with the keys they describe.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Checkpoint, CheckpointView, PANES, STATE, StoredState, TOUCHED, WINDOWS, state_partition};
use crate::offsets::TopicPartition;

/// state partition → JSON [`PartitionMeta`].
pub(super) const PARTITION_META: TableDefinition<u32, &str> = TableDefinition::new("state-partition-meta");

/// What a state partition knows besides its keys, kept with them in the checkpoint and in
/// each changelog marker: which input it has applied, where its shuffle partition continues,
/// and how far its changelog goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Per input partition, the offset up to which its records' values are in this state
    /// partition: the next stage-1 range applied must start exactly here.
    pub applied: Vec<(TopicPartition, i64)>,
    /// The first shuffle offset not yet resolved (applied or found dead).
    pub resume: i64,
    /// The changelog offset after this copy's last marker: a restore continues from it.
    #[serde(default)]
    pub changelog: i64,
    /// Changed by a one-host batch that wrote no changelog: the local copy is the only one
    /// up to date, and is published (a snapshot) before the partition is shared.
    #[serde(default)]
    pub dirty: bool,
    /// Windowed jobs: the end of the last window slide this partition emitted (0: none yet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub windows_to: i64,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// One change a restore from the changelog applies to a state partition's local copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionWrite {
    /// A key's state, or its removal.
    State { key: Vec<u8>, stored: Option<StoredState> },
    /// A key's pane at `time`, or its expiry.
    Pane { key: Vec<u8>, time: i64, pane: Option<Vec<u8>> },
    /// A key's kept window result (window end, value), or its removal.
    Window { key: Vec<u8>, result: Option<(i64, Vec<u8>)> },
}

impl PartitionMeta {
    pub fn applied(&self, source: &TopicPartition) -> Option<i64> {
        self.applied.iter().find(|(partition, _)| partition == source).map(|(_, offset)| *offset)
    }

    pub fn set_applied(&mut self, source: &TopicPartition, offset: i64) {
        match self.applied.iter_mut().find(|(partition, _)| partition == source) {
            Some(entry) => entry.1 = offset,
            None => {
                self.applied.push((source.clone(), offset));
                self.applied.sort();
            }
        }
    }
}

impl CheckpointView {
    /// Every state partition's meta the checkpoint has (`--shared-state` jobs).
    pub fn partition_metas(&self) -> Result<BTreeMap<u32, PartitionMeta>> {
        read_metas(&self.begin_read()?)
    }
}

impl Checkpoint {
    /// Every state partition's meta this checkpoint has.
    pub fn partition_metas(&self) -> Result<BTreeMap<u32, PartitionMeta>> {
        read_metas(&self.db.begin_read()?)
    }

    /// Every key of state partition `partition` (of `partitions`) with its state: a snapshot.
    pub fn partition_state(&self, partition: u32, partitions: u32) -> Result<Vec<(Vec<u8>, StoredState)>> {
        let txn = self.db.begin_read()?;
        let mut keys = Vec::new();
        for entry in txn.open_table(STATE)?.iter()? {
            let (key, value) = entry?;
            if state_partition(key.value(), partitions) == partition {
                let (touched, schema, bytes) = value.value();
                keys.push((key.value().to_vec(), StoredState { touched, schema, bytes: bytes.to_vec() }));
            }
        }
        Ok(keys)
    }

    /// Applies one changelog batch of a state partition (keys, panes and window results set
    /// or removed) with the meta its marker carried, in one transaction.
    pub fn restore_partition(&self, partition: u32, writes: &[PartitionWrite], meta: &PartitionMeta) -> Result<()> {
        let txn = self.db.begin_write()?;
        let mut sizes = self.sizes.changes();
        let partitions = self.state_partitions;
        {
            let mut state = txn.open_table(STATE)?;
            let mut touched = txn.open_table(TOUCHED)?;
            let mut panes = txn.open_table(PANES)?;
            let mut windows = txn.open_table(WINDOWS)?;
            for write in writes {
                match write {
                    PartitionWrite::State { key, stored } => {
                        let previous = state.remove(key.as_slice())?.map(|old| (old.value().0, old.value().2.len()));
                        let after = stored.as_ref().map(|stored| stored.bytes.len());
                        sizes.entry(partitions, key, previous.map(|(_, bytes)| bytes), after);
                        if let Some((previous, _)) = previous.filter(|_| self.touched_index) {
                            touched.remove((previous, key.as_slice()))?;
                        }
                        if let Some(stored) = stored {
                            state.insert(key.as_slice(), (stored.touched, stored.schema, stored.bytes.as_slice()))?;
                            if self.touched_index {
                                touched.insert((stored.touched, key.as_slice()), ())?;
                            }
                        }
                    }
                    PartitionWrite::Pane { key, time, pane } => {
                        let previous = match pane {
                            Some(pane) => panes.insert((key.as_slice(), *time), pane.as_slice())?,
                            None => panes.remove((key.as_slice(), *time))?,
                        };
                        let after = pane.as_ref().map(Vec::len);
                        sizes.pane(partitions, key, previous.map(|old| old.value().len()), after);
                    }
                    PartitionWrite::Window { key, result } => {
                        match result {
                            Some((end, value)) => windows.insert(key.as_slice(), (*end, value.as_slice()))?,
                            None => windows.remove(key.as_slice())?,
                        };
                    }
                }
            }
            txn.open_table(PARTITION_META)?.insert(partition, serde_json::to_string(meta)?.as_str())?;
        }
        txn.commit()
            .with_context(|| format!("cannot restore state partition {partition} in {}", self.path.display()))?;
        self.sizes.apply(sizes);
        Ok(())
    }

    /// Records state partitions' metas alone (after a snapshot was published).
    pub fn set_partition_metas(&self, metas: &[(u32, PartitionMeta)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        write_metas(&txn, metas)?;
        txn.commit().with_context(|| format!("cannot record state partitions in {}", self.path.display()))
    }
}

fn read_metas(txn: &redb::ReadTransaction) -> Result<BTreeMap<u32, PartitionMeta>> {
    let mut metas = BTreeMap::new();
    let table = match txn.open_table(PARTITION_META) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(metas),
        Err(error) => return Err(error.into()),
    };
    for entry in table.iter()? {
        let (partition, json) = entry?;
        let meta = serde_json::from_str(json.value())
            .with_context(|| format!("unreadable meta of state partition {}", partition.value()))?;
        metas.insert(partition.value(), meta);
    }
    Ok(metas)
}

pub(super) fn write_metas(txn: &redb::WriteTransaction, metas: &[(u32, PartitionMeta)]) -> Result<()> {
    if metas.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(PARTITION_META)?;
    for (partition, meta) in metas {
        table.insert(*partition, serde_json::to_string(meta)?.as_str())?;
    }
    Ok(())
}
