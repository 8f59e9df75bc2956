//! `host checkpoint inspect` and `host checkpoint dump`: a checkpoint, readable by people and
//! by scripts, without running a job.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::checkpoint::{CheckpointView, StateStats};
use crate::offsets::describe_ranges;

/// How many keys `inspect` shows as samples.
const SAMPLE_KEYS: usize = 5;
/// Longest state shown per sample key, in characters.
const SAMPLE_WIDTH: usize = 60;

/// The report of `host checkpoint inspect DIR`; `changelog`: the brokers and group of a
/// shared-state job, to say how far each state partition's copy is behind its changelog.
pub fn inspect(dir: &Path, changelog: Option<(&str, &str)>) -> Result<String> {
    let view = CheckpointView::open(dir)?;
    let resume = view.resume()?;
    let mut text = String::new();
    writeln!(text, "checkpoint {}", view.path().display())?;
    match resume.last_batch {
        Some(time) => writeln!(text, "last batch: {time} ms ({})", utc(time))?,
        None => writeln!(text, "last batch: none committed yet")?,
    }
    for pending in &resume.pending {
        writeln!(
            text,
            "interrupted batch: {} ms, replayed with the same ranges on the next start: {}",
            pending.batch_time,
            describe_ranges(&pending.ranges)
        )?;
    }
    writeln!(text, "offsets (next batch starts at):")?;
    if resume.offsets.is_empty() {
        writeln!(text, "  none")?;
    }
    for (partition, offset) in &resume.offsets {
        writeln!(text, "  {partition}  {offset}")?;
    }
    writeln!(text, "plugins (oldest first):")?;
    for run in &resume.plugin_runs {
        writeln!(text, "  {run}")?;
    }
    if let Some(active) = resume.plugin_runs.last() {
        writeln!(text, "active build: {} {} (sha256 {})", active.name, active.version, active.digest)?;
    }
    let StateStats { partitions, schemas, samples } = view.state_stats(SAMPLE_KEYS)?;
    let keys: u64 = partitions.iter().map(|p| p.keys).sum();
    let bytes: u64 = partitions.iter().map(|p| p.bytes).sum();
    writeln!(text, "state: {keys} keys, {bytes} bytes in {} state partitions", partitions.len())?;
    for (index, partition) in partitions.iter().enumerate() {
        writeln!(text, "  partition {index}: {} keys, {} bytes", partition.keys, partition.bytes)?;
    }
    let metas = view.partition_metas()?;
    if !metas.is_empty() {
        let ends = match changelog {
            Some((brokers, group)) => Some(crate::shared_state::changelog_ends(brokers, group, metas.keys().copied())?),
            None => None,
        };
        writeln!(text, "shared state (copies of state partitions this host has held):")?;
        for (partition, meta) in &metas {
            let behind = match ends.as_ref().and_then(|ends| ends.get(partition)) {
                Some(end) if meta.dirty => format!(", changelog ends at {end}"),
                Some(end) => format!(", {} changelog records behind", (end - meta.changelog).max(0)),
                None => String::new(),
            };
            let dirty = if meta.dirty { " (newer than the changelog: this host ran alone)" } else { "" };
            let applied: Vec<String> = meta.applied.iter().map(|(p, offset)| format!("{p}={offset}")).collect();
            writeln!(
                text,
                "  partition {partition}: changelog offset {}{behind}{dirty}; shuffle resumes at {}; input applied up \
                 to {}",
                meta.changelog,
                meta.resume,
                if applied.is_empty() { "nothing".to_string() } else { applied.join(", ") }
            )?;
        }
    }
    if !schemas.is_empty() {
        let versions: Vec<String> = schemas.iter().map(|(schema, keys)| format!("{keys} keys at v{schema}")).collect();
        writeln!(text, "state schema versions: {}", versions.join(", "))?;
    }
    if !samples.is_empty() {
        writeln!(text, "sample keys:")?;
        for (key, state) in samples {
            let state: String = String::from_utf8_lossy(&state).chars().take(SAMPLE_WIDTH).collect();
            writeln!(text, "  {:?} = {state:?}", String::from_utf8_lossy(&key))?;
        }
    }
    Ok(text)
}

/// The output of `host checkpoint dump DIR`: every key's state as one JSON object per line,
/// `{"key": ..., "state": ...}`, UTF-8 text where the bytes are UTF-8, else `{"hex": ...}`.
pub fn dump(dir: &Path) -> Result<String> {
    let view = CheckpointView::open(dir)?;
    let mut text = String::new();
    for (key, state) in view.state()? {
        let line = serde_json::json!({ "key": readable(&key), "state": readable(&state) });
        writeln!(text, "{line}")?;
    }
    Ok(text)
}

fn readable(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(text.to_string()),
        Err(_) => {
            serde_json::json!({ "hex": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    }
}

fn utc(time_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(time_ms)
        .map_or_else(|| "?".into(), |time| time.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())
}
