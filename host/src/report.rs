//! What a batch did and what a run did, as the engine reports them to its log, its caller
//! and whoever watches the job (metrics, the Streaming page).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::offsets::OffsetRange;

/// What one batch did, as logged.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub batch_time: i64,
    pub ranges: Vec<OffsetRange>,
    pub records_in: usize,
    pub outputs: usize,
    pub rejected: usize,
    /// Records sent to the dead-letter topic (rejections, isolated poison records, records the
    /// plugin could not be given and outputs that could not be delivered).
    pub dead_letters: usize,
    /// Records of failed tasks skipped under `--on-failure skip` (and outputs that could not be
    /// delivered).
    pub skipped: usize,
    /// How late the batch started relative to its batch time.
    pub scheduling_delay: Duration,
    /// Where the processing time went.
    pub phases: BatchPhases,
    /// Whether the batch left every partition at the high watermark seen when planning.
    pub caught_up: bool,
    /// The rate limit the batch was planned with, in records per second for the whole job
    /// (`None`: unlimited, or only `--max-rate-per-partition`).
    pub rate: Option<f64>,
    /// Whether this ran a plan an earlier run did not commit (or the rest of one).
    pub replayed: bool,
    pub ending: Ending,
    /// The plugin build that ran it.
    pub build: String,
    /// Records in and rejected, per input topic.
    pub by_topic: BTreeMap<String, TopicCounts>,
    /// Outputs per destination: the topic, or `table` and `print` for outputs without one.
    pub outputs_by_topic: BTreeMap<String, u64>,
}

/// One input topic's share of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicCounts {
    pub records_in: u64,
    pub rejected: u64,
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Committed: done for good.
    Committed,
    /// Run by a new build on probation: delivered, and held uncommitted until the probation
    /// batches commit together.
    Held,
    /// Abandoned uncommitted because the group gave its partitions to another member (they
    /// are replayed by their new owner).
    Fenced,
    /// Failed by a new build on probation: the build was rolled back, and the old one
    /// processes this batch (and the held ones) again.
    RolledBack,
}

impl Ending {
    /// Its name in metrics labels and on the Streaming page.
    pub fn name(self) -> &'static str {
        match self {
            Ending::Committed => "committed",
            Ending::Held => "held",
            Ending::Fenced => "fenced",
            Ending::RolledBack => "rolled-back",
        }
    }
}

/// The steps of one batch and how long each took; together they make up its processing time.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchPhases {
    /// Assignment changes, topic discovery, upgrade switch, offset-range planning.
    pub plan: Duration,
    /// Reading the ranges' records, and recording the batch's plan in the checkpoint.
    pub fetch: Duration,
    /// Plugin calls, state and windows.
    pub plugin: Duration,
    /// Waiting for the sinks to acknowledge every output.
    pub deliver: Duration,
    /// The consumer-group commit and the checkpoint transaction.
    pub commit: Duration,
}

/// Totals over a run, reported when the job stops.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunSummary {
    pub batches: u64,
    pub records_in: u64,
    pub outputs: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    pub skipped: u64,
}

impl RunSummary {
    /// Adds one batch.
    pub fn count(&mut self, report: &BatchReport) {
        self.batches += 1;
        self.records_in += report.records_in as u64;
        self.outputs += report.outputs as u64;
        self.rejected += report.rejected as u64;
        self.dead_letters += report.dead_letters as u64;
        self.skipped += report.skipped as u64;
    }
}

impl BatchReport {
    /// From the batch's start to its commit: the sum of its phases.
    pub fn processing(&self) -> Duration {
        let BatchPhases { plan, fetch, plugin, deliver, commit } = self.phases;
        plan + fetch + plugin + deliver + commit
    }

    /// Scheduling delay plus processing time: how far behind its batch time the batch finished.
    pub fn total_delay(&self) -> Duration {
        self.scheduling_delay + self.processing()
    }
}
