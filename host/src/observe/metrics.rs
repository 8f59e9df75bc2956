//! The job's Prometheus metrics: one typed family per quantity, named by Prometheus
//! conventions (`sluice_` prefix, `_total` counters, base units in the name), encoded in the
//! OpenMetrics text format by `prometheus-client`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::report::BatchReport;
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
    /// committed, held, fenced or rolled-back.
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

/// Registers a metric under `name` (`sluice_` prefixed; the unit, and `_total` for counters,
/// appended by the encoder) and returns it: a family shares its values with its clones.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, unit: Option<Unit>, help: &str, metric: M) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

impl Metrics {
    pub fn new(plugin: &PluginIdentity, kind: PluginKind) -> Metrics {
        let mut registry = Registry::with_prefix("sluice");
        let r = &mut registry;
        let (seconds, bytes) = (Some(Unit::Seconds), Some(Unit::Bytes));
        let metrics = Metrics {
            batches: add(r, "batches", None, "Batches run, by how they ended", Family::default()),
            input_records: add(r, "input_records", None, "Records read from each input topic", Family::default()),
            output_records: add(r, "output_records", None, "Records delivered to each output", Family::default()),
            rejected_records: add(
                r,
                "rejected_records",
                None,
                "Input records rejected (by the plugin, or unreadable), by input topic",
                Family::default(),
            ),
            dead_letters: add(r, "dead_letters", None, "Records sent to the dead-letter topic", Counter::default()),
            skipped_records: add(
                r,
                "skipped_records",
                None,
                "Records skipped by the failure policy and outputs given up as undeliverable",
                Counter::default(),
            ),
            phase_seconds: add(
                r,
                "batch_phase",
                seconds.clone(),
                "Time of each phase of a batch (plan, fetch, plugin, deliver, commit)",
                Histograms::new_with_constructor(batch_seconds),
            ),
            processing_seconds: add(
                r,
                "batch_processing",
                seconds.clone(),
                "From a batch's start to its commit",
                batch_seconds(),
            ),
            scheduling_delay_seconds: add(
                r,
                "batch_scheduling_delay",
                seconds.clone(),
                "How late a batch started after its batch time",
                batch_seconds(),
            ),
            total_delay_seconds: add(
                r,
                "batch_total_delay",
                seconds.clone(),
                "Scheduling delay plus processing time",
                batch_seconds(),
            ),
            lag: add(
                r,
                "partition_lag_records",
                None,
                "Records between a partition's last planned offset and its high watermark",
                Family::default(),
            ),
            plugin_task_seconds: add(
                r,
                "plugin_task",
                seconds.clone(),
                "Time of one plugin call over one partition's records of a batch",
                call_seconds(),
            ),
            instance_memory: add(
                r,
                "plugin_instance_memory",
                bytes.clone(),
                "Linear memory of each plugin instance",
                Family::default(),
            ),
            resident_memory: add(
                r,
                "process_resident_memory",
                bytes.clone(),
                "Resident memory of the host process",
                Gauge::default(),
            ),
            state_keys: add(
                r,
                "state_keys",
                None,
                "Keys of keyed state (windows: key panes) in each state partition",
                Family::default(),
            ),
            state_bytes: add(
                r,
                "state",
                bytes,
                "Bytes of keyed state and window panes in each state partition",
                Family::default(),
            ),
            checkpoint_commit_seconds: add(
                r,
                "checkpoint_commit",
                seconds,
                "Time of the checkpoint transaction that commits a batch",
                call_seconds(),
            ),
            upgrades: add(r, "upgrades", None, "Hot upgrades, by outcome", Family::default()),
            build: add(r, "plugin_build_info", None, "The plugin build the job runs (value 1)", Family::default()),
            task_retries: add(
                r,
                "task_retries",
                None,
                "Retries of failed plugin tasks, by failure kind",
                Family::default(),
            ),
            task_failures: add(r, "task_failures", None, "Failed plugin calls, by failure kind", Family::default()),
            rebalances: add(r, "rebalances", None, "Consumer-group assignment changes applied", Counter::default()),
            registry,
        };
        metrics.running(plugin, kind);
        metrics
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
        let ending = report.ending.name();
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

    /// An upgrade's outcome (`upgraded`, `rolled-back`, `refused`, `stopped`).
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
