//! The checkpoint: offsets, keyed state, window panes and plugin history in one embedded ACID
//! file, written in one transaction per batch.
//!
//! Unlike Spark's checkpoint it holds no code, only data keyed by bytes the plugin chose, so
//! any later plugin version (same state schema) resumes from it. The file is `checkpoint.redb`
//! inside the `--checkpoint` directory. A batch is recorded in two steps:
//!
//! 1. [`Checkpoint::begin_batch`] records the batch's plan (time and offset ranges) before
//!    anything is fetched, so a batch interrupted by a crash is replayed with the same ranges
//!    and the same batch time.
//! 2. [`Checkpoint::commit`] records the batch's results: every partition's new offset, the
//!    state changes, the window panes and which plugin produced them; the plan is cleared.
//!
//! The consumer group's offsets are committed between the two steps (see `engine::commit`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::offsets::{OffsetRange, TopicPartition};
use crate::runtime::PluginIdentity;

mod builds;
mod partitions;
mod sizes;
mod view;

pub use builds::Builds;
pub use partitions::{PartitionMeta, PartitionWrite};
pub use view::{HeldChanges, StateView};

const EMPTY: &[u8] = &[];

/// The file inside the checkpoint directory.
pub const FILE_NAME: &str = "checkpoint.redb";
/// Written at creation and checked at every open, so a foreign redb file is never mistaken
/// for a checkpoint, and a future layout can be told apart.
const FORMAT: &str = "sluice-checkpoint/1";

/// Small facts: `format`, `state-partitions`, `last-batch`, `pending` (JSON plan),
/// `touched-index` ("0" when [`TOUCHED`] is not kept; absent or "1" when it is).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (topic, partition) → the offset the next batch starts at.
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
/// key → (batch time of the key's last update, state schema version, state bytes).
const STATE: TableDefinition<&[u8], (i64, u32, &[u8])> = TableDefinition::new("state");
/// (batch time of last update, key) → (): finds idle keys without reading the whole state.
/// Kept only while the job has a state timeout: it is two more writes per touched key, and
/// is rebuilt from [`STATE`] when a timeout is configured again.
const TOUCHED: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("state-touched");
/// (key, batch time) → the key's values of that batch, reduced: one window pane.
const PANES: TableDefinition<(&[u8], i64), &[u8]> = TableDefinition::new("window-panes");
/// key → (window end, value): the last window result, for inverse-reduce updates.
const WINDOWS: TableDefinition<&[u8], (i64, &[u8])> = TableDefinition::new("window-results");
/// first batch time → JSON [`PluginRun`]: which plugin processed which batches.
const PLUGINS: TableDefinition<i64, &str> = TableDefinition::new("plugins");
/// (topic, partition) → the `--start` offset the job applied: a `--start` seeks once, and the
/// same value given again on a restart is ignored.
const APPLIED_STARTS: TableDefinition<(&str, i32), i64> = TableDefinition::new("applied-starts");

/// A key's window panes: (batch time, pane), oldest first.
pub type Panes = Vec<(i64, Vec<u8>)>;
/// A kept window result: (window end, value).
pub type WindowResult = (i64, Vec<u8>);
/// A key's pane at a time: (key, pane time, pane).
pub type TimedPane = (Vec<u8>, i64, Vec<u8>);
/// A key and its state bytes.
pub type KeyState = (Vec<u8>, Vec<u8>);

/// A batch planned but not yet committed, replayed exactly after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    /// The plugin build (digest) the batch ran with; a replay runs the same build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Ran with `--shared-state` through the shuffle topic (its values are applied by the
    /// state partitions' owners, not rebuilt from this plan).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// One plugin build's stretch of batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRun {
    pub name: String,
    pub version: String,
    pub state_schema_version: u32,
    /// SHA-256 of the component file.
    pub digest: String,
    /// The plugin configuration the batches ran with.
    #[serde(default)]
    pub config: Vec<(String, String)>,
    /// The group member (`--instance-id`) that ran them.
    #[serde(default)]
    pub member: String,
    pub first_batch: i64,
    pub last_batch: i64,
    pub batches: u64,
}

impl PluginRun {
    /// A run of `plugin` with `config` on `member` starting (and so far ending) at `batch`.
    /// The build that ran.
    pub fn identity(&self) -> PluginIdentity {
        PluginIdentity {
            info: crate::runtime::PluginInfo {
                name: self.name.clone(),
                version: self.version.clone(),
                state_schema_version: self.state_schema_version,
            },
            digest: self.digest.clone(),
        }
    }

    pub fn of(plugin: &PluginIdentity, config: &[(String, String)], member: &str, batch: i64) -> PluginRun {
        PluginRun {
            name: plugin.info.name.clone(),
            version: plugin.info.version.clone(),
            state_schema_version: plugin.info.state_schema_version,
            digest: plugin.digest.clone(),
            config: config.to_vec(),
            member: member.to_string(),
            first_batch: batch,
            last_batch: batch,
            batches: 1,
        }
    }
}

impl fmt::Display for PluginRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (state schema {}, sha256 {}): {} batches, {} ms to {} ms",
            self.name,
            self.version,
            self.state_schema_version,
            &self.digest[..self.digest.len().min(12)],
            self.batches,
            self.first_batch,
            self.last_batch
        )?;
        if !self.config.is_empty() {
            let config: Vec<String> = self.config.iter().map(|(key, value)| format!("{key}={value}")).collect();
            write!(f, ", config {}", config.join(" "))?;
        }
        if !self.member.is_empty() {
            write!(f, ", on {}", self.member)?;
        }
        Ok(())
    }
}

/// Where a job resumes, as the checkpoint has it.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub offsets: BTreeMap<TopicPartition, i64>,
    pub last_batch: Option<i64>,
    /// Batches planned but not committed, oldest first: the one in flight, or the batches a
    /// new build ran on probation (they commit together).
    pub pending: Vec<PendingBatch>,
    /// Every plugin run, oldest first: the last is the active build.
    pub plugin_runs: Vec<PluginRun>,
    /// Whether any keyed state or window pane is stored.
    pub has_state: bool,
    /// The `--start` offsets applied so far.
    pub applied_starts: BTreeMap<TopicPartition, i64>,
}

/// A key's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    /// Batch time of the key's last update.
    pub touched: i64,
    /// The plugin's state schema version the bytes are encoded in.
    pub schema: u32,
    pub bytes: Vec<u8>,
}

/// What a batch does to one key's state.
#[derive(Debug, Clone)]
pub enum StateWrite {
    /// The key now holds `bytes`, updated at the batch's time.
    Put { key: Vec<u8>, bytes: Vec<u8>, previous_touched: Option<i64> },
    /// The key is gone.
    Remove { key: Vec<u8>, previous_touched: i64 },
}

/// Everything one batch changes, committed at once.
#[derive(Debug, Default)]
pub struct BatchChanges {
    pub state: Vec<StateWrite>,
    /// New or grown panes: (key, pane time, pane). In one process a pane's time is the
    /// batch's; with `--shared-state`, the time of the stage-1 batch its values came from.
    pub panes: Vec<TimedPane>,
    /// Panes that left every window, by (key, pane time).
    pub expired_panes: Vec<(Vec<u8>, i64)>,
    /// Window results kept for the next slide's inverse reduce: (key, window end, result).
    pub window_results: Vec<(Vec<u8>, i64, Vec<u8>)>,
    /// Keys whose kept window result is dropped.
    pub dropped_windows: Vec<Vec<u8>>,
    /// With `--shared-state`: the state partitions' new metas.
    pub partitions: Vec<(u32, PartitionMeta)>,
}

impl BatchChanges {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
            && self.panes.is_empty()
            && self.expired_panes.is_empty()
            && self.window_results.is_empty()
            && self.dropped_windows.is_empty()
            && self.partitions.is_empty()
    }
}

/// One batch's (or one piece of a batch's) results, committed in one transaction.
#[derive(Debug)]
pub struct BatchCommit<'a> {
    pub batch_time: i64,
    /// The ranges processed: each partition's offset moves to its range's end.
    pub ranges: &'a [OffsetRange],
    pub changes: &'a BatchChanges,
    pub plugin: &'a PluginIdentity,
    pub config: &'a [(String, String)],
    /// The group member committing (`--instance-id`).
    pub member: &'a str,
    /// `--start` offsets applied since the last commit.
    pub applied_starts: &'a [(TopicPartition, i64)],
}

/// What `host checkpoint inspect` reports about the state.
#[derive(Debug, Clone, Default)]
pub struct StateStats {
    pub partitions: Vec<PartitionStats>,
    /// Keys of keyed state per state schema version (not yet migrated keys keep theirs).
    pub schemas: BTreeMap<u32, u64>,
    pub samples: Vec<KeyState>,
}

/// Counts of one state partition, for `host checkpoint inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionStats {
    pub keys: u64,
    pub bytes: u64,
}

/// An open checkpoint, owned by one job at a time (redb locks the file).
pub struct Checkpoint {
    db: Database,
    path: PathBuf,
    /// Whether commits keep [`TOUCHED`] up to date.
    touched_index: bool,
    state_partitions: u32,
    sizes: sizes::Sizes,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, creating the directory and an empty checkpoint on first
    /// use. A file that is not a Sluice checkpoint is an error naming it, never a fresh start.
    /// `state_partitions` is recorded at creation; afterwards the recorded number is used.
    pub fn open(dir: &Path, state_partitions: u32) -> Result<Checkpoint> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let fresh = !path.exists();
        let db =
            if fresh { Database::create(&path) } else { Database::open(&path) }.map_err(|e| open_error(&path, e))?;
        let mut checkpoint =
            Checkpoint { db, path, touched_index: true, state_partitions, sizes: sizes::Sizes::default() };
        if fresh {
            let txn = checkpoint.db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert("format", FORMAT.as_bytes())?;
                meta.insert("state-partitions", state_partitions.to_le_bytes().as_slice())?;
                // Create every table, so readers never meet a missing one.
                txn.open_table(OFFSETS)?;
                txn.open_table(STATE)?;
                txn.open_table(TOUCHED)?;
                txn.open_table(PANES)?;
                txn.open_table(WINDOWS)?;
                txn.open_table(PLUGINS)?;
                txn.open_table(APPLIED_STARTS)?;
            }
            txn.commit().with_context(|| format!("cannot initialise checkpoint {}", checkpoint.path.display()))?;
        } else {
            let txn = checkpoint.db.begin_read()?;
            check_format(&txn, &checkpoint.path)?;
            checkpoint.state_partitions = read_state_partitions(&txn)?;
            let flag = txn.open_table(META)?.get("touched-index")?.map(|value| value.value().to_vec());
            checkpoint.touched_index = flag.as_deref() != Some(b"0");
            drop(txn);
            // Tables added since the format's first version.
            let txn = checkpoint.db.begin_write()?;
            txn.open_table(APPLIED_STARTS)?;
            txn.commit().with_context(|| format!("cannot update checkpoint {}", checkpoint.path.display()))?;
        }
        Ok(checkpoint)
    }

    /// Keeps the index of last updates (for `--state-timeout`) from now on, rebuilding it from
    /// the state if it was not kept, or drops it. Both in one transaction with the flag.
    pub fn keep_touched_index(&mut self, keep: bool) -> Result<()> {
        if keep == self.touched_index {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            txn.delete_table(TOUCHED)?;
            let mut touched = txn.open_table(TOUCHED)?;
            if keep {
                for entry in txn.open_table(STATE)?.iter()? {
                    let (key, value) = entry?;
                    touched.insert((value.value().0, key.value()), ())?;
                }
            }
            txn.open_table(META)?.insert("touched-index", if keep { b"1".as_slice() } else { b"0".as_slice() })?;
        }
        txn.commit().with_context(|| format!("cannot update the state index of {}", self.path.display()))?;
        tracing::info!("{} the index of last state updates", if keep { "rebuilt" } else { "dropped" });
        self.touched_index = keep;
        Ok(())
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many state partitions the job's keyed state is split into.
    pub fn state_partitions(&self) -> Result<u32> {
        read_state_partitions(&self.db.begin_read()?)
    }

    /// Where the job resumes.
    pub fn resume(&self) -> Result<Resume> {
        read_resume(&self.db.begin_read()?)
    }

    /// Records the plans of the batches not yet committed (the batch about to be processed,
    /// after any a new build holds on probation) before they are processed. A durable write of
    /// its own, so that a crash at any later point replays exactly these batches.
    pub fn begin_batch(&self, pending: &[PendingBatch]) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("pending", serde_json::to_vec(pending)?.as_slice())?;
        let last = pending.last().map_or(0, |plan| plan.batch_time);
        txn.commit().with_context(|| format!("cannot record batch {last} ms in {}", self.path.display()))
    }

    /// The stored state of each of `keys`, in order.
    pub fn read_state(&self, keys: &[&[u8]]) -> Result<Vec<Option<StoredState>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(STATE)?;
        keys.iter()
            .map(|key| {
                Ok(table.get(*key)?.map(|guard| {
                    let (touched, schema, bytes) = guard.value();
                    StoredState { touched, schema, bytes: bytes.to_vec() }
                }))
            })
            .collect()
    }

    /// Every key whose last update was at or before `idle_since`, with its state.
    pub fn idle_keys(&self, idle_since: i64) -> Result<Vec<(Vec<u8>, StoredState)>> {
        ensure!(self.touched_index, "idle keys asked of {} without its index of last updates", self.path.display());
        let txn = self.db.begin_read()?;
        let touched = txn.open_table(TOUCHED)?;
        let state = txn.open_table(STATE)?;
        let mut idle = Vec::new();
        // (t, key) sorts by time first, so everything before (idle_since + 1, "") is idle.
        for entry in touched.range(..(idle_since + 1, EMPTY))? {
            let (entry, _) = entry?;
            let (_, key) = entry.value();
            if let Some(guard) = state.get(key)? {
                let (touched, schema, bytes) = guard.value();
                idle.push((key.to_vec(), StoredState { touched, schema, bytes: bytes.to_vec() }));
            }
        }
        Ok(idle)
    }

    /// Up to `count` keys' states, the first in key order (for an upgrade's dry run).
    pub fn sample_state(&self, count: usize) -> Result<Vec<(Vec<u8>, StoredState)>> {
        let txn = self.db.begin_read()?;
        let mut sample = Vec::new();
        for entry in txn.open_table(STATE)?.iter()?.take(count) {
            let (key, value) = entry?;
            let (touched, schema, bytes) = value.value();
            sample.push((key.value().to_vec(), StoredState { touched, schema, bytes: bytes.to_vec() }));
        }
        Ok(sample)
    }

    /// Every stored window pane, by key, in pane time order.
    pub fn panes(&self) -> Result<BTreeMap<Vec<u8>, Panes>> {
        let txn = self.db.begin_read()?;
        let mut panes: BTreeMap<Vec<u8>, Panes> = BTreeMap::new();
        for entry in txn.open_table(PANES)?.iter()? {
            let (key, value) = entry?;
            let (key, time) = key.value();
            panes.entry(key.to_vec()).or_default().push((time, value.value().to_vec()));
        }
        Ok(panes)
    }

    /// The kept window result of each key that has one: (window end, value).
    pub fn window_results(&self) -> Result<BTreeMap<Vec<u8>, WindowResult>> {
        let txn = self.db.begin_read()?;
        let mut results = BTreeMap::new();
        for entry in txn.open_table(WINDOWS)?.iter()? {
            let (key, value) = entry?;
            let (end, bytes) = value.value();
            results.insert(key.value().to_vec(), (end, bytes.to_vec()));
        }
        Ok(results)
    }

    /// The stored pane of each of `keys` at `batch_time`, in order (a batch that runs in
    /// pieces folds each piece's values into the pane the earlier pieces left).
    pub fn panes_at(&self, keys: &[&[u8]], batch_time: i64) -> Result<Vec<Option<Vec<u8>>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PANES)?;
        keys.iter().map(|key| Ok(table.get((*key, batch_time))?.map(|pane| pane.value().to_vec()))).collect()
    }

    /// Commits batches (one, or a new build's probation batches together, or a piece of a
    /// replayed batch): their offsets, state changes, panes and plugin runs, in one transaction,
    /// leaving `pending` as the plans still to run (none normally; the rest of a batch that runs
    /// in pieces). After this returns the batches are done; a crash before it replays them.
    pub fn commit(&self, batches: &[BatchCommit<'_>], pending: &[PendingBatch]) -> Result<()> {
        let txn = self.db.begin_write()?;
        let mut sizes = self.sizes.changes();
        for batch in batches {
            self.write_batch(&txn, batch, &mut sizes)?;
        }
        {
            let mut meta = txn.open_table(META)?;
            if pending.is_empty() {
                meta.remove("pending")?;
            } else {
                meta.insert("pending", serde_json::to_vec(pending)?.as_slice())?;
            }
        }
        crate::failpoint::reached("checkpoint");
        let last = batches.last().map_or(0, |batch| batch.batch_time);
        txn.commit().with_context(|| format!("cannot commit batch {last} ms to {}", self.path.display()))?;
        self.sizes.apply(sizes);
        Ok(())
    }

    /// Every build that processed batches here, oldest first.
    pub fn plugin_runs(&self) -> Result<Vec<PluginRun>> {
        read_plugin_runs(&self.db.begin_read()?)
    }

    /// Keys and bytes of each state partition, counted now and kept current by every commit
    /// and restore from then on (for the metrics; the first call reads the whole state).
    pub fn state_sizes(&self) -> Result<Vec<PartitionStats>> {
        match self.sizes.get() {
            Some(sizes) => Ok(sizes),
            None => self.sizes.track(&self.db.begin_read()?, self.state_partitions),
        }
    }

    /// Writes one batch's results into `txn`.
    fn write_batch(
        &self,
        txn: &redb::WriteTransaction,
        batch: &BatchCommit<'_>,
        sizes: &mut sizes::SizeChanges,
    ) -> Result<()> {
        let partitions = self.state_partitions;
        let BatchCommit { batch_time, ranges, changes, plugin, config, member, applied_starts } = *batch;
        {
            let mut offsets = txn.open_table(OFFSETS)?;
            for range in ranges {
                offsets.insert((range.partition.topic.as_str(), range.partition.partition), range.until)?;
            }
            let mut starts = txn.open_table(APPLIED_STARTS)?;
            for (partition, offset) in applied_starts {
                starts.insert((partition.topic.as_str(), partition.partition), *offset)?;
            }
            let mut state = txn.open_table(STATE)?;
            let mut touched = txn.open_table(TOUCHED)?;
            let index = self.touched_index;
            for write in &changes.state {
                match write {
                    StateWrite::Put { key, bytes, previous_touched } => {
                        if let Some(previous) = previous_touched.filter(|_| index) {
                            touched.remove((previous, key.as_slice()))?;
                        }
                        let schema = plugin.info.state_schema_version;
                        let old = state.insert(key.as_slice(), (batch_time, schema, bytes.as_slice()))?;
                        sizes.entry(partitions, key, old.map(|old| old.value().2.len()), Some(bytes.len()));
                        if index {
                            touched.insert((batch_time, key.as_slice()), ())?;
                        }
                    }
                    StateWrite::Remove { key, previous_touched } => {
                        if index {
                            touched.remove((*previous_touched, key.as_slice()))?;
                        }
                        let old = state.remove(key.as_slice())?;
                        sizes.entry(partitions, key, old.map(|old| old.value().2.len()), None);
                    }
                }
            }
            let mut panes = txn.open_table(PANES)?;
            for (key, time, value) in &changes.panes {
                let old = panes.insert((key.as_slice(), *time), value.as_slice())?;
                sizes.pane(partitions, key, old.map(|old| old.value().len()), Some(value.len()));
            }
            for (key, time) in &changes.expired_panes {
                let old = panes.remove((key.as_slice(), *time))?;
                sizes.pane(partitions, key, old.map(|old| old.value().len()), None);
            }
            let mut windows = txn.open_table(WINDOWS)?;
            for (key, end, value) in &changes.window_results {
                windows.insert(key.as_slice(), (*end, value.as_slice()))?;
            }
            for key in &changes.dropped_windows {
                windows.remove(key.as_slice())?;
            }

            let mut plugins = txn.open_table(PLUGINS)?;
            let last: Option<PluginRun> = match plugins.last()? {
                Some((_, json)) => Some(serde_json::from_str(json.value())?),
                None => None,
            };
            let run = match last {
                Some(mut run) if run.digest == plugin.digest && run.config == config && run.member == member => {
                    // The pieces of one batch count once.
                    if run.last_batch != batch_time {
                        run.batches += 1;
                    }
                    run.last_batch = batch_time;
                    run
                }
                _ => PluginRun::of(plugin, config, member, batch_time),
            };
            plugins.insert(run.first_batch, serde_json::to_string(&run)?.as_str())?;

            let mut meta = txn.open_table(META)?;
            meta.insert("last-batch", batch_time.to_le_bytes().as_slice())?;
        }
        partitions::write_metas(txn, &changes.partitions)?;
        Ok(())
    }
}

/// A read-only view for `host checkpoint inspect`, usable while no job holds the file.
pub struct CheckpointView {
    db: ViewDatabase,
    path: PathBuf,
}

/// How the view opened the file: read-only, or (after a crash) through the repairing writer.
enum ViewDatabase {
    ReadOnly(ReadOnlyDatabase),
    Repaired(Database),
}

impl CheckpointView {
    /// Opens the checkpoint in `dir`. A file left by a crashed job needs redb's repair, which
    /// only a writer may run; the view then opens it as the next job would, repairing it (the
    /// data committed before the crash is exactly what remains).
    pub fn open(dir: &Path) -> Result<CheckpointView> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            bail!("no checkpoint in {} (expected {})", dir.display(), path.display());
        }
        let db = match ReadOnlyDatabase::open(&path) {
            Ok(db) => ViewDatabase::ReadOnly(db),
            Err(redb::DatabaseError::RepairAborted) => {
                ViewDatabase::Repaired(Database::open(&path).map_err(|e| open_error(&path, e))?)
            }
            Err(error) => return Err(open_error(&path, error)),
        };
        let view = CheckpointView { db, path };
        check_format(&view.begin_read()?, &view.path)?;
        Ok(view)
    }

    fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(match &self.db {
            ViewDatabase::ReadOnly(db) => db.begin_read()?,
            ViewDatabase::Repaired(db) => db.begin_read()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The resume point, as a job would see it.
    pub fn resume(&self) -> Result<Resume> {
        read_resume(&self.begin_read()?)
    }

    /// Every plugin run, oldest first.
    pub fn plugin_runs(&self) -> Result<Vec<PluginRun>> {
        read_plugin_runs(&self.begin_read()?)
    }

    pub fn state_partitions(&self) -> Result<u32> {
        read_state_partitions(&self.begin_read()?)
    }

    /// Key count and bytes per state partition (state and panes together), keyed-state counts
    /// per state schema version, and the first `samples` keys with their state.
    pub fn state_stats(&self, samples: usize) -> Result<StateStats> {
        let txn = self.begin_read()?;
        let partitions = read_state_partitions(&txn)?;
        let mut stats = vec![PartitionStats::default(); partitions as usize];
        let mut schemas = BTreeMap::new();
        let mut sample = Vec::new();
        for entry in txn.open_table(STATE)?.iter()? {
            let (key, value) = entry?;
            let (key, (_, schema, bytes)) = (key.value(), value.value());
            *schemas.entry(schema).or_insert(0) += 1;
            let partition = &mut stats[state_partition(key, partitions) as usize];
            partition.keys += 1;
            partition.bytes += (key.len() + bytes.len()) as u64;
            if sample.len() < samples {
                sample.push((key.to_vec(), bytes.to_vec()));
            }
        }
        let mut last_key: Option<Vec<u8>> = None;
        for entry in txn.open_table(PANES)?.iter()? {
            let (key, value) = entry?;
            let ((key, _), bytes) = (key.value(), value.value());
            let partition = &mut stats[state_partition(key, partitions) as usize];
            if last_key.as_deref() != Some(key) {
                partition.keys += 1;
                last_key = Some(key.to_vec());
                if sample.len() < samples {
                    sample.push((key.to_vec(), bytes.to_vec()));
                }
            }
            partition.bytes += (key.len() + 8 + bytes.len()) as u64;
        }
        Ok(StateStats { partitions: stats, schemas, samples: sample })
    }

    /// Every key's state, in key order (for tests and debugging).
    pub fn state(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let txn = self.begin_read()?;
        let mut state = BTreeMap::new();
        for entry in txn.open_table(STATE)?.iter()? {
            let (key, value) = entry?;
            state.insert(key.value().to_vec(), value.value().2.to_vec());
        }
        Ok(state)
    }
}

/// The state partition a key belongs to: FNV-1a of its bytes, so the split is stable across
/// runs, platforms and Rust versions (unlike `std`'s hasher).
pub fn state_partition(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

fn read_plugin_runs(txn: &ReadTransaction) -> Result<Vec<PluginRun>> {
    let mut runs = Vec::new();
    for entry in txn.open_table(PLUGINS)?.iter()? {
        runs.push(serde_json::from_str(entry?.1.value()).context("unreadable plugin record in the checkpoint")?);
    }
    Ok(runs)
}

fn read_resume(txn: &ReadTransaction) -> Result<Resume> {
    let meta = txn.open_table(META)?;
    let mut offsets = BTreeMap::new();
    for entry in txn.open_table(OFFSETS)?.iter()? {
        let (key, offset) = entry?;
        let (topic, partition) = key.value();
        offsets.insert(TopicPartition::new(topic, partition), offset.value());
    }
    let last_batch = meta.get("last-batch")?.map(|bytes| i64_from(bytes.value()));
    // A list of plans; checkpoints written before probation batches were held have one.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Pending {
        Many(Vec<PendingBatch>),
        One(PendingBatch),
    }
    let pending = match meta.get("pending")? {
        Some(json) => {
            match serde_json::from_slice(json.value()).context("unreadable pending batch in the checkpoint")? {
                Pending::Many(plans) => plans,
                Pending::One(plan) => vec![plan],
            }
        }
        None => Vec::new(),
    };
    let plugin_runs = read_plugin_runs(txn)?;
    let has_state = !txn.open_table(STATE)?.is_empty()? || !txn.open_table(PANES)?.is_empty()?;
    let mut applied_starts = BTreeMap::new();
    // A checkpoint written before starts were recorded has no such table yet.
    if let Ok(table) = txn.open_table(APPLIED_STARTS) {
        for entry in table.iter()? {
            let (key, offset) = entry?;
            let (topic, partition) = key.value();
            applied_starts.insert(TopicPartition::new(topic, partition), offset.value());
        }
    }
    Ok(Resume { offsets, last_batch, pending, plugin_runs, has_state, applied_starts })
}

fn check_format(txn: &ReadTransaction, path: &Path) -> Result<()> {
    let foreign =
        || format!("{} is not a Sluice checkpoint (no `{FORMAT}` marker); refusing to start over it", path.display());
    let meta = txn.open_table(META).with_context(foreign)?;
    let format = meta.get("format").with_context(foreign)?.with_context(foreign)?;
    if format.value() != FORMAT.as_bytes() {
        bail!(
            "{} is a checkpoint of format {:?}, this host reads {FORMAT:?}",
            path.display(),
            String::from_utf8_lossy(format.value())
        );
    }
    Ok(())
}

fn read_state_partitions(txn: &ReadTransaction) -> Result<u32> {
    let meta = txn.open_table(META)?;
    let bytes = meta.get("state-partitions")?.context("the checkpoint does not record its state partitions")?;
    let array: [u8; 4] = bytes.value().try_into().context("malformed state partition count in the checkpoint")?;
    Ok(u32::from_le_bytes(array))
}

fn open_error(path: &Path, error: redb::DatabaseError) -> anyhow::Error {
    match error {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            anyhow::anyhow!("checkpoint {} is in use by another job", path.display())
        }
        error => anyhow::anyhow!(
            "{} is not a readable Sluice checkpoint ({error}); refusing to start over it — \
             move it away to start from scratch",
            path.display()
        ),
    }
}

fn i64_from(bytes: &[u8]) -> i64 {
    i64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PluginInfo;

    fn put(checkpoint: &Checkpoint, batch_time: i64, key: &str, previous_touched: Option<i64>) {
        let plugin = PluginIdentity {
            info: PluginInfo { name: "test".into(), version: "1".into(), state_schema_version: 1 },
            digest: "0".repeat(64),
        };
        let state = vec![StateWrite::Put { key: key.into(), bytes: b"1".to_vec(), previous_touched }];
        let ranges = [OffsetRange { partition: TopicPartition::new("in", 0), from: 0, until: batch_time }];
        let changes = BatchChanges { state, ..BatchChanges::default() };
        let commit = BatchCommit {
            batch_time,
            ranges: &ranges,
            changes: &changes,
            plugin: &plugin,
            config: &[],
            member: "test",
            applied_starts: &[],
        };
        checkpoint.commit(&[commit], &[]).unwrap();
    }

    fn idle(checkpoint: &Checkpoint, since: i64) -> Vec<String> {
        let idle = checkpoint.idle_keys(since).unwrap();
        idle.into_iter().map(|(key, _)| String::from_utf8(key).unwrap()).collect()
    }

    #[test]
    fn the_index_of_last_updates_is_rebuilt_when_a_timeout_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoint = Checkpoint::open(dir.path(), 1).unwrap();
        put(&checkpoint, 100, "a", None);
        put(&checkpoint, 200, "b", None);
        assert_eq!(idle(&checkpoint, 150), ["a"]);

        // Without a timeout the index is dropped and no longer kept...
        checkpoint.keep_touched_index(false).unwrap();
        put(&checkpoint, 300, "a", Some(100));
        put(&checkpoint, 300, "c", None);
        assert!(checkpoint.idle_keys(1_000).is_err(), "no index to answer from");
        drop(checkpoint);

        // ...and a later run with a timeout rebuilds it from the state, which survives reopening.
        let mut checkpoint = Checkpoint::open(dir.path(), 1).unwrap();
        assert!(checkpoint.idle_keys(1_000).is_err(), "the file remembers the index is not kept");
        checkpoint.keep_touched_index(true).unwrap();
        assert_eq!(idle(&checkpoint, 250), ["b"]);
        assert_eq!(idle(&checkpoint, 300), ["b", "a", "c"]);
        put(&checkpoint, 400, "b", Some(200));
        assert_eq!(idle(&checkpoint, 350), ["a", "c"]);
    }
}
