//! What the Streaming page shows: the last N batches with their offset ranges and build, the
//! run's totals, the plugin lineage and upgrade history, and the lag per partition.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::checkpoint::PluginRun;
use crate::control::{Status, UpgradeOutcome};
use crate::offsets::TopicPartition;
use crate::report::{BatchReport, Ending, RunSummary};

/// The page's memory of the run.
pub struct Board {
    capacity: usize,
    batches: VecDeque<BatchRow>,
    totals: RunSummary,
    lineage: Vec<LineageRow>,
    upgrades: Vec<UpgradeRow>,
    lag: BTreeMap<TopicPartition, i64>,
}

#[derive(Debug, Clone, Serialize)]
struct BatchRow {
    batch_time_ms: i64,
    records_in: usize,
    outputs: usize,
    rejected: usize,
    dead_letters: usize,
    skipped: usize,
    scheduling_delay_ms: u128,
    processing_ms: u128,
    total_delay_ms: u128,
    phases: Phases,
    ending: &'static str,
    replayed: bool,
    build: String,
    ranges: Vec<RangeRow>,
}

#[derive(Debug, Clone, Serialize)]
struct Phases {
    plan_ms: u128,
    fetch_ms: u128,
    plugin_ms: u128,
    deliver_ms: u128,
    commit_ms: u128,
}

#[derive(Debug, Clone, Serialize)]
struct RangeRow {
    topic: String,
    partition: i32,
    from: i64,
    until: i64,
}

#[derive(Debug, Clone, Serialize)]
struct LineageRow {
    build: String,
    first_batch_ms: i64,
    state_schema_version: u32,
}

#[derive(Debug, Clone, Serialize)]
struct UpgradeRow {
    at_ms: i64,
    outcome: &'static str,
    from: Option<String>,
    to: Option<String>,
    detail: String,
}

#[derive(Debug, Clone, Serialize)]
struct LagRow {
    topic: String,
    partition: i32,
    lag: i64,
}

/// Facts about the job that do not change while it runs.
#[derive(Debug, Clone, Serialize)]
pub struct JobFacts {
    pub group: String,
    pub member: String,
    pub batch_interval_ms: u128,
    pub started_at_ms: i64,
}

impl Board {
    /// A board keeping the last `capacity` batches.
    pub fn new(capacity: usize) -> Board {
        Board {
            capacity: capacity.max(1),
            batches: VecDeque::new(),
            totals: RunSummary::default(),
            lineage: Vec::new(),
            upgrades: Vec::new(),
            lag: BTreeMap::new(),
        }
    }

    pub fn batch(&mut self, report: &BatchReport) {
        self.totals.count(report);
        if self.batches.len() == self.capacity {
            self.batches.pop_front();
        }
        let p = &report.phases;
        self.batches.push_back(BatchRow {
            batch_time_ms: report.batch_time,
            records_in: report.records_in,
            outputs: report.outputs,
            rejected: report.rejected,
            dead_letters: report.dead_letters,
            skipped: report.skipped,
            scheduling_delay_ms: report.scheduling_delay.as_millis(),
            processing_ms: report.processing().as_millis(),
            total_delay_ms: report.total_delay().as_millis(),
            phases: Phases {
                plan_ms: p.plan.as_millis(),
                fetch_ms: p.fetch.as_millis(),
                plugin_ms: p.plugin.as_millis(),
                deliver_ms: p.deliver.as_millis(),
                commit_ms: p.commit.as_millis(),
            },
            ending: report.ending.name(),
            replayed: report.replayed,
            build: report.build.clone(),
            ranges: report
                .ranges
                .iter()
                .map(|range| RangeRow {
                    topic: range.partition.topic.clone(),
                    partition: range.partition.partition,
                    from: range.from,
                    until: range.until,
                })
                .collect(),
        });
    }

    pub fn lag(&mut self, partition: &TopicPartition, lag: i64) {
        self.lag.insert(partition.clone(), lag);
    }

    /// Records per second read by the last ten batches that read (as Spark's input rate:
    /// records over batch intervals).
    pub fn input_rate(&self, batch_interval_ms: u128) -> Option<f64> {
        let recent: Vec<&BatchRow> =
            self.batches.iter().rev().filter(|b| b.ending == Ending::Committed.name()).take(10).collect();
        if recent.is_empty() {
            return None;
        }
        let records: usize = recent.iter().map(|batch| batch.records_in).sum();
        Some(records as f64 * 1000.0 / (recent.len() as u128 * batch_interval_ms.max(1)) as f64)
    }

    pub fn totals(&self) -> RunSummary {
        self.totals.clone()
    }

    pub fn lag_total(&self) -> u64 {
        self.lag.values().map(|lag| *lag.max(&0) as u64).sum()
    }

    pub fn forget_partition(&mut self, partition: &TopicPartition) {
        self.lag.remove(partition);
    }

    pub fn lineage_ends_with(&self, build: &str) -> bool {
        self.lineage.last().is_some_and(|newest| newest.build == build)
    }

    pub fn lineage(&mut self, runs: &[PluginRun]) {
        self.lineage = runs
            .iter()
            .map(|run| LineageRow {
                build: run.identity().to_string(),
                first_batch_ms: run.first_batch,
                state_schema_version: run.state_schema_version,
            })
            .collect();
    }

    pub fn upgrade(&mut self, at_ms: i64, outcome: &UpgradeOutcome) {
        let (from, to, detail) = match outcome {
            UpgradeOutcome::Upgraded { from, to, first_batch } => {
                (Some(from.clone()), Some(to.clone()), format!("first batch {first_batch}"))
            }
            UpgradeOutcome::RolledBack { from, to, batch, reason } => {
                (Some(from.clone()), Some(to.clone()), format!("batch {batch}: {reason}"))
            }
            UpgradeOutcome::Refused { reason } | UpgradeOutcome::Stopped { reason } => (None, None, reason.clone()),
        };
        self.upgrades.push(UpgradeRow { at_ms, outcome: outcome.name(), from, to, detail });
    }

    /// The page's JSON (`/api/streaming`).
    pub fn to_json(&self, job: &JobFacts, status: &Status) -> serde_json::Value {
        let lag: Vec<LagRow> = self
            .lag
            .iter()
            .map(|(partition, lag)| LagRow {
                topic: partition.topic.clone(),
                partition: partition.partition,
                lag: *lag,
            })
            .collect();
        let mut job = serde_json::to_value(job).expect("plain data");
        job["plugin"] = status.to_json()["plugin"].clone();
        job["probation"] = status.probation.as_ref().map(ToString::to_string).into();
        serde_json::json!({
            "job": job,
            "totals": self.totals,
            "batches": self.batches,
            "lineage": self.lineage,
            "upgrades": self.upgrades,
            "lag": lag,
            "history_size": self.capacity,
        })
    }
}
