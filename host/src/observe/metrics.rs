//! The job's Prometheus metrics: one typed family per quantity, named by Prometheus
//! conventions (`sluice_` prefix, `_total` counters, base units in the name), encoded in the
//! OpenMetrics text format by `prometheus-client`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::report::{BatchReport, Ending};
use crate::runtime::{FailureKind, PluginIdentity, PluginKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndingLabel {
    /// committed, held, fenced or rolled_back.
    pub ending: &'static str,
    pub replayed: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    pub instance: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatePartitionLabel {
    pub state_partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub kind: String,
    pub state_schema_version: u32,
}

impl BuildLabels {
    fn of(plugin: &PluginIdentity, kind: PluginKind) -> BuildLabels {
        BuildLabels {
            name: plugin.info.name.clone(),
            version: plugin.info.version.clone(),
            digest: plugin.digest.clone(),
            kind: kind.to_string(),
            state_schema_version: plugin.info.state_schema_version,
        }
    }
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Batch-level durations: 1 ms to about 65 s.
fn batch_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// One plugin call or one checkpoint commit: 100 µs to about 6.5 s.
fn call_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric of a running job.
pub struct Metrics {
    registry: Registry,
    batches: Family<EndingLabel, Counter>,
    input_records: Family<TopicLabel, Counter>,
    output_records: Family<TopicLabel, Counter>,
    rejected_records: Family<TopicLabel, Counter>,
    dead_letters: Counter,
    skipped_records: Counter,
    phase_seconds: Histograms<PhaseLabel>,
    processing_seconds: Histogram,
    scheduling_delay_seconds: Histogram,
    total_delay_seconds: Histogram,
    lag: Family<PartitionLabels, Gauge>,
    plugin_task_seconds: Histogram,
    instance_memory: Family<InstanceLabel, Gauge>,
    resident_memory: Gauge,
    state_keys: Family<StatePartitionLabel, Gauge>,
    state_bytes: Family<StatePartitionLabel, Gauge>,
    checkpoint_commit_seconds: Histogram,
    upgrades: Family<OutcomeLabel, Counter>,
    build: Family<BuildLabels, Gauge>,
    task_retries: Family<KindLabel, Counter>,
    task_failures: Family<KindLabel, Counter>,
    rebalances: Counter,
}

impl Metrics {
    pub fn new(plugin: &PluginIdentity, kind: PluginKind) -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("sluice"),
            batches: Family::default(),
            input_records: Family::default(),
            output_records: Family::default(),
            rejected_records: Family::default(),
            dead_letters: Counter::default(),
            skipped_records: Counter::default(),
            phase_seconds: Histograms::new_with_constructor(batch_seconds),
            processing_seconds: batch_seconds(),
            scheduling_delay_seconds: batch_seconds(),
            total_delay_seconds: batch_seconds(),
            lag: Family::default(),
            plugin_task_seconds: call_seconds(),
            instance_memory: Family::default(),
            resident_memory: Gauge::default(),
            state_keys: Family::default(),
            state_bytes: Family::default(),
            checkpoint_commit_seconds: call_seconds(),
            upgrades: Family::default(),
            build: Family::default(),
            task_retries: Family::default(),
            task_failures: Family::default(),
            rebalances: Counter::default(),
        };
        metrics.register();
        metrics.build.get_or_create(&BuildLabels::of(plugin, kind)).set(1);
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("batches", "Batches run, by how they ended", self.batches.clone());
        r.register("input_records", "Records read from each input topic", self.input_records.clone());
        r.register("output_records", "Records delivered to each output topic", self.output_records.clone());
        r.register(
            "rejected_records",
            "Input records rejected (by the plugin, or unreadable), by input topic",
            self.rejected_records.clone(),
        );
        r.register("dead_letters", "Records sent to the dead-letter topic", self.dead_letters.clone());
        r.register(
            "skipped_records",
            "Records skipped by the failure policy and outputs given up as undeliverable",
            self.skipped_records.clone(),
        );
        r.register_with_unit(
            "batch_phase",
            "Time of each phase of a batch (plan, fetch, plugin, deliver, commit)",
            Unit::Seconds,
            self.phase_seconds.clone(),
        );
        r.register_with_unit(
            "batch_processing",
            "From a batch's start to its commit",
            Unit::Seconds,
            self.processing_seconds.clone(),
        );
        r.register_with_unit(
            "batch_scheduling_delay",
            "How late a batch started after its batch time",
            Unit::Seconds,
            self.scheduling_delay_seconds.clone(),
        );
        r.register_with_unit(
            "batch_total_delay",
            "Scheduling delay plus processing time",
            Unit::Seconds,
            self.total_delay_seconds.clone(),
        );
        r.register(
            "partition_lag_records",
            "Records between a partition's last planned offset and its high watermark",
            self.lag.clone(),
        );
        r.register_with_unit(
            "plugin_task",
            "Time of one plugin call over one partition's records of a batch",
            Unit::Seconds,
            self.plugin_task_seconds.clone(),
        );
        r.register_with_unit(
            "plugin_instance_memory",
            "Linear memory of each plugin instance",
            Unit::Bytes,
            self.instance_memory.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the host process",
            Unit::Bytes,
            self.resident_memory.clone(),
        );
        r.register("state_keys", "Keys of keyed state in each state partition", self.state_keys.clone());
        r.register_with_unit(
            "state",
            "Bytes of keyed state and window panes in each state partition",
            Unit::Bytes,
            self.state_bytes.clone(),
        );
        r.register_with_unit(
            "checkpoint_commit",
            "Time of the checkpoint transaction that commits a batch",
            Unit::Seconds,
            self.checkpoint_commit_seconds.clone(),
        );
        r.register("upgrades", "Hot upgrades, by outcome", self.upgrades.clone());
        r.register("plugin_build_info", "The plugin build the job runs (value 1)", self.build.clone());
        r.register("task_retries", "Retries of failed plugin tasks, by failure kind", self.task_retries.clone());
        r.register("task_failures", "Failed plugin calls, by failure kind", self.task_failures.clone());
        r.register("rebalances", "Consumer-group assignment changes applied", self.rebalances.clone());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        self.resident_memory.set(resident_memory_bytes().unwrap_or(0));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// Counts a batch as its log line reports it.
    pub fn batch(&self, report: &BatchReport) {
        let ending = match report.ending {
            Ending::Committed => "committed",
            Ending::Held => "held",
            Ending::Fenced => "fenced",
            Ending::RolledBack => "rolled_back",
        };
        self.batches.get_or_create(&EndingLabel { ending, replayed: report.replayed }).inc();
        for (topic, counts) in &report.by_topic {
            let label = TopicLabel { topic: topic.clone() };
            self.input_records.get_or_create(&label).inc_by(counts.records_in);
            self.rejected_records.get_or_create(&label).inc_by(counts.rejected);
        }
        for (topic, count) in &report.outputs_by_topic {
            self.output_records.get_or_create(&TopicLabel { topic: topic.clone() }).inc_by(*count);
        }
        self.dead_letters.inc_by(report.dead_letters as u64);
        self.skipped_records.inc_by(report.skipped as u64);
        let phases = &report.phases;
        for (phase, took) in [
            ("plan", phases.plan),
            ("fetch", phases.fetch),
            ("plugin", phases.plugin),
            ("deliver", phases.deliver),
            ("commit", phases.commit),
        ] {
            self.phase_seconds.get_or_create(&PhaseLabel { phase }).observe(took.as_secs_f64());
        }
        self.processing_seconds.observe(report.processing().as_secs_f64());
        self.scheduling_delay_seconds.observe(report.scheduling_delay.as_secs_f64());
        self.total_delay_seconds.observe(report.total_delay().as_secs_f64());
    }

    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag.get_or_create(&PartitionLabels { topic: topic.to_string(), partition }).set(lag);
    }

    /// A partition this host no longer reads: its lag is someone else's to report.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        self.lag.remove(&PartitionLabels { topic: topic.to_string(), partition });
    }

    pub fn plugin_task(&self, took: Duration) {
        self.plugin_task_seconds.observe(took.as_secs_f64());
    }

    pub fn instance_memory(&self, instance: usize, bytes: usize) {
        self.instance_memory.get_or_create(&InstanceLabel { instance: instance as u32 }).set(bytes as i64);
    }

    pub fn state_size(&self, state_partition: u32, keys: u64, bytes: u64) {
        let label = StatePartitionLabel { state_partition };
        self.state_keys.get_or_create(&label).set(keys as i64);
        self.state_bytes.get_or_create(&label).set(bytes as i64);
    }

    pub fn checkpoint_commit(&self, took: Duration) {
        self.checkpoint_commit_seconds.observe(took.as_secs_f64());
    }

    /// An upgrade's outcome (`upgraded`, `rolled_back`, `refused`); an upgrade also changes
    /// the running build.
    pub fn upgrade(&self, outcome: &'static str) {
        self.upgrades.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn running(&self, plugin: &PluginIdentity, kind: PluginKind) {
        self.build.clear();
        self.build.get_or_create(&BuildLabels::of(plugin, kind)).set(1);
    }

    pub fn task_retry(&self, kind: FailureKind) {
        self.task_retries.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
    }

    pub fn task_failure(&self, kind: FailureKind) {
        self.task_failures.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
    }

    pub fn rebalance(&self) {
        self.rebalances.inc();
    }
}

/// The process's resident set, from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_memory_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The exposition's content type (Prometheus negotiates OpenMetrics).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let plugin = PluginIdentity {
            info: crate::runtime::PluginInfo {
                name: "wordcount".into(),
                version: "1.0.0".into(),
                state_schema_version: 1,
            },
            digest: "0".repeat(64),
        };
        let metrics = Metrics::new(&plugin, PluginKind::Stateful);
        metrics.rebalance();
        metrics.checkpoint_commit(Duration::from_millis(3));
        let text = metrics.encode();
        for line in [
            "# TYPE sluice_rebalances counter",
            "sluice_rebalances_total 1",
            "# TYPE sluice_checkpoint_commit_seconds histogram",
            "sluice_checkpoint_commit_seconds_count 1",
            "# TYPE sluice_process_resident_memory_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains(r#"sluice_plugin_build_info{name="wordcount",version="1.0.0""#), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
