//! Job configuration: one set of options, settable as `host run` flags or in a TOML job file.
//!
//! Precedence, highest first: command-line flags (and their `SLUICE_*` environment variables),
//! then the job file given with `--config`, then the defaults below. Lists given as flags
//! replace the file's list; key/value options (`--kafka`, `--plugin-config`, `--start`) merge
//! key by key, flags winning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use rdkafka::ClientConfig;
use regex::Regex;
use serde::{Deserialize, Deserializer};

use crate::offsets::{AutoOffsetReset, OnOffsetOutOfRange, TopicPartition};
use crate::runtime::{CpuLimit, Determinism, GrantedDir, Sandbox};

/// Bootstrap servers when none are given: a broker on this machine, as Kafka's tools assume.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Batch interval when none is given.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(2);
/// The lowest rate backpressure chooses when no `--backpressure-min-rate` is given (Spark's).
pub const DEFAULT_BACKPRESSURE_MIN_RATE: f64 = 100.0;
/// Batches the Streaming page keeps when no `--page-batches` is given.
const DEFAULT_PAGE_BATCHES: usize = 100;
/// Where the admin endpoint listens when no `--admin-address` is given: any free loopback port.
pub const DEFAULT_ADMIN_ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0));
/// Poison records isolated per task under `--on-failure dead-letter` when no
/// `--max-poison-per-task` is given.
pub const DEFAULT_MAX_POISON_PER_TASK: usize = 16;
/// Retries of a failed partition task when no `--task-retries` is given.
pub const DEFAULT_TASK_RETRIES: u32 = 2;
/// How long unreachable brokers are retried when no `--broker-timeout` is given.
pub const DEFAULT_BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the group waits for a member that stopped heartbeating (a host killed, or cut
/// off) before giving its partitions to the others, when no `--session-timeout` is given.
/// librdkafka's default is 45 s; a stream processor wants its partitions back sooner.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Records one partition task may hold when no `--max-records-per-partition` is given: a
/// backlog is worked off in batches of this size rather than in one that outgrows memory.
pub const DEFAULT_MAX_RECORDS_PER_PARTITION: usize = 100_000;
/// Bytes one partition task may hold when no `--max-bytes-per-partition` is given; with the
/// default `--max-memory` of 256 MiB a plugin instance holds the task and its outputs.
pub const DEFAULT_MAX_BYTES_PER_PARTITION: u64 = 32 << 20;

/// Kafka client properties the host sets itself; letting `--kafka` override them would break
/// direct mode (offsets are committed only after delivery, positions are chosen by the host).
const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --brokers"),
    ("group.id", "use --group"),
    ("enable.auto.commit", "Sluice commits offsets itself, after output is delivered"),
    ("enable.auto.offset.store", "Sluice commits offsets itself, after output is delivered"),
    ("auto.offset.reset", "use --auto-offset-reset"),
];

/// Every option of a job. Each field is both a `host run` flag and a job-file key.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobOptions {
    /// The plugin: a Wasm component built for wasm32-wasip2 (in a job file, relative to the file).
    /// A job with a checkpoint that has run may leave it out: it continues with the build it
    /// ran last (kept in the checkpoint directory), hot upgrades included.
    #[arg(long, env = "SLUICE_PLUGIN", value_name = "PATH")]
    pub plugin: Option<PathBuf>,

    /// Start with a plugin build the checkpoint ran before the one it runs now (a rollback by
    /// hand; its state schema must still read the state).
    #[arg(long, env = "SLUICE_FORCE")]
    #[serde(default)]
    pub force: bool,

    /// Configuration passed to the plugin's `init`, as KEY=VALUE (repeatable).
    #[arg(long = "plugin-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    #[serde(default, deserialize_with = "pairs_from_table")]
    pub plugin_config: Vec<(String, String)>,

    /// Kafka bootstrap servers, comma-separated [default: 127.0.0.1:9092].
    #[arg(long, env = "SLUICE_BROKERS", value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,

    /// A topic to read (repeatable; job file: `topics = [...]`).
    #[arg(long = "topic", value_name = "TOPIC")]
    #[serde(default)]
    pub topics: Vec<String>,

    /// Read every topic whose whole name matches this regular expression.
    #[arg(long, env = "SLUICE_TOPIC_PATTERN", value_name = "REGEX")]
    pub topic_pattern: Option<String>,

    /// Consumer group the job commits its offsets to (so standard tooling shows its lag).
    #[arg(long, env = "SLUICE_GROUP")]
    pub group: Option<String>,

    /// Time between batches, e.g. `2s`, `500ms` [default: 2s].
    #[arg(long, env = "SLUICE_BATCH_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub batch_interval: Option<Duration>,

    /// Topic for the plugin's outputs that do not name a topic of their own.
    #[arg(long, env = "SLUICE_OUTPUT_TOPIC", value_name = "TOPIC")]
    pub output_topic: Option<String>,

    /// Print the first N outputs of each batch to stdout under a `Time: <batch time> ms`
    /// header, like Spark's `DStream.print()`.
    #[arg(long, env = "SLUICE_PRINT", value_name = "N")]
    pub print: Option<usize>,

    /// A librdkafka property for the job's Kafka clients, as KEY=VALUE (repeatable), like
    /// Spark's kafkaParams; e.g. `--kafka fetch.wait.max.ms=100`.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    #[serde(default, deserialize_with = "pairs_from_table")]
    pub kafka: Vec<(String, String)>,

    /// Start a partition at this offset, as TOPIC:PARTITION=OFFSET (repeatable); beats the
    /// group's committed offset, like `consumer.seek` in the seeds.
    #[arg(long, value_name = "TOPIC:PARTITION=OFFSET", value_parser = parse_start)]
    #[serde(default, deserialize_with = "starts_from_table")]
    pub start: Vec<(TopicPartition, i64)>,

    /// Where partitions without a committed offset start [default: latest].
    #[arg(long, env = "SLUICE_AUTO_OFFSET_RESET", value_enum)]
    pub auto_offset_reset: Option<AutoOffsetReset>,

    /// Stop after this many batches.
    #[arg(long, env = "SLUICE_MAX_BATCHES", value_name = "N")]
    pub max_batches: Option<u64>,

    /// Stop after the first batch that leaves every partition at its high watermark (backfills,
    /// scripted runs).
    #[arg(long, env = "SLUICE_STOP_WHEN_CAUGHT_UP")]
    #[serde(default)]
    pub stop_when_caught_up: bool,

    /// Keep a stateful job's keyed state in Kafka as well (a shuffle topic and a compacted
    /// changelog, `<group>-shuffle` and `<group>-changelog`), so that several hosts can share the
    /// job and a host that dies hands its state partitions over (README "Stateful jobs on
    /// several hosts").
    #[arg(long, env = "SLUICE_SHARED_STATE")]
    #[serde(default)]
    pub shared_state: bool,

    /// Partition tasks processed at once, each on its own plugin instance [default: CPU count].
    #[arg(long, env = "SLUICE_PARALLELISM", value_name = "N")]
    pub parallelism: Option<usize>,

    /// How long to keep retrying brokers that cannot be reached before giving up [default: 30s].
    #[arg(long, env = "SLUICE_BROKER_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub broker_timeout: Option<Duration>,

    /// How long the consumer group waits for a host that stopped heartbeating (killed, or cut
    /// off from the brokers) before its partitions go to the other hosts [default: 10s]. A host
    /// stopped with SIGINT/SIGTERM leaves the group at once.
    #[arg(long, env = "SLUICE_SESSION_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub session_timeout: Option<Duration>,

    /// Records one batch may take from one partition, at most, whatever the rate options say
    /// [default: 100000]. A replayed batch larger than this runs in pieces.
    #[arg(long, env = "SLUICE_MAX_RECORDS_PER_PARTITION", value_name = "N")]
    pub max_records_per_partition: Option<usize>,

    /// Bytes one batch may take from one partition, at most (keys, values and headers), e.g.
    /// `32MiB` [default: 32MiB]. A partition always yields at least one record.
    #[arg(long, env = "SLUICE_MAX_BYTES_PER_PARTITION", value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_bytes_per_partition: Option<u64>,

    /// Records per second a batch may take from one partition, at most (Spark's
    /// maxRatePerPartition): a batch takes at most rate × interval records per partition.
    #[arg(long, env = "SLUICE_MAX_RATE_PER_PARTITION", value_name = "RECORDS_PER_SECOND")]
    pub max_rate_per_partition: Option<f64>,

    /// Records per second for the whole job until the backpressure estimator has measured one
    /// (without --backpressure: for the first batch), so a cold start with a backlog does
    /// not take everything at once.
    #[arg(long, env = "SLUICE_INITIAL_RATE", value_name = "RECORDS_PER_SECOND")]
    pub initial_rate: Option<f64>,

    /// Adapt the rate to what the plugin keeps up with, from each batch's processing time and
    /// scheduling delay (Spark's PID rate estimator), within --max-rate-per-partition.
    #[arg(long, env = "SLUICE_BACKPRESSURE")]
    #[serde(default)]
    pub backpressure: bool,

    /// The lowest rate backpressure may choose, in records per second [default: 100].
    #[arg(long, env = "SLUICE_BACKPRESSURE_MIN_RATE", value_name = "RECORDS_PER_SECOND")]
    pub backpressure_min_rate: Option<f64>,

    /// What to do when a partition's position is no longer in the log (retention expired it)
    /// [default: fail].
    #[arg(long, env = "SLUICE_ON_OFFSET_OUT_OF_RANGE", value_enum)]
    pub on_offset_out_of_range: Option<OnOffsetOutOfRange>,

    /// How Kafka outputs and input offsets commit [default: at-least-once]. `exactly-once`
    /// makes each batch's outputs, dead letters and input offsets one Kafka transaction
    /// (readers use `isolation.level=read_committed`).
    #[arg(long, env = "SLUICE_DELIVERY", value_enum)]
    pub delivery: Option<DeliveryGuarantee>,

    /// Directory of the job's checkpoint: offsets, keyed state and window panes, committed
    /// once per batch. Required for stateful and windowed plugins; a restarted job resumes
    /// from it.
    #[arg(long, env = "SLUICE_CHECKPOINT", value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// Remove a key's state after it has had no new values for this long, telling the plugin
    /// first (Spark's `StateSpec.timeout`), e.g. `30s`, `10m`.
    #[arg(long, env = "SLUICE_STATE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub state_timeout: Option<Duration>,

    /// Window length for windowed plugins, a multiple of the batch interval, e.g. `3s`.
    #[arg(long, env = "SLUICE_WINDOW", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub window: Option<Duration>,

    /// How often a windowed plugin's windows are emitted, a multiple of the batch interval
    /// [default: the batch interval].
    #[arg(long, env = "SLUICE_SLIDE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub slide: Option<Duration>,

    /// How long one plugin call (one partition task) may run before it is stopped [default:
    /// 30s]. `off` runs calls unbounded, for fully trusted plugins only: the plugin step gets
    /// about a fifth faster, and a plugin that never returns stops the job's progress.
    #[arg(long, env = "SLUICE_TASK_DEADLINE", value_name = "DURATION|off", value_parser = parse_task_deadline)]
    #[serde(default, deserialize_with = "task_deadline")]
    pub task_deadline: Option<TaskDeadline>,

    /// Memory per plugin instance, e.g. `256MiB`, `1GiB` [default: 256MiB].
    #[arg(long, env = "SLUICE_MAX_MEMORY", value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_memory: Option<u64>,

    /// Bytes the host copies out of one plugin call's result, at most, e.g. `512MiB` [default:
    /// 512MiB]. A result larger than that (a plugin returning many outputs that alias one
    /// buffer, say) fails its task as `memory` before the host allocates it.
    #[arg(long, env = "SLUICE_MAX_OUTPUT_BYTES", value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_output_bytes: Option<u64>,

    /// Bytes the host holds of all of one batch's plugin results together, at most [default:
    /// 1GiB]; the task that would pass it fails as `memory`.
    #[arg(long, env = "SLUICE_MAX_BATCH_OUTPUT_BYTES", value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_batch_output_bytes: Option<u64>,

    /// Elements per table per plugin instance [default: 100000].
    #[arg(long, env = "SLUICE_MAX_TABLE_ELEMENTS", value_name = "N")]
    pub max_table_elements: Option<u32>,

    /// Core instances (and tables, memories) one plugin component may create [default: 64].
    #[arg(long, env = "SLUICE_MAX_INSTANCES", value_name = "N")]
    pub max_instances: Option<u32>,

    /// What to do with a partition task that still fails after its retries: halt the job,
    /// send its poison records to --dead-letter-topic, or skip it [default: halt].
    #[arg(long, env = "SLUICE_ON_FAILURE", value_enum)]
    pub on_failure: Option<FailurePolicy>,

    /// Retries of a failed partition task, each on a fresh plugin instance, with backoff
    /// from 100ms doubling [default: 2].
    #[arg(long, env = "SLUICE_TASK_RETRIES", value_name = "N")]
    pub task_retries: Option<u32>,

    /// A topic the plugin may send outputs to, as a regular expression matching the whole name
    /// (repeatable) [default: the output and dead-letter topics]. An output for any other
    /// topic is undeliverable and follows --on-failure.
    #[arg(long = "allow-output-topic", value_name = "PATTERN")]
    #[serde(default)]
    pub allow_output_topics: Vec<String>,

    /// This host's name in the consumer group: in logs, commit metadata and `host status`, and
    /// in the transactional id of `--delivery exactly-once` [default: the machine's host name].
    /// Two hosts of one job on one machine need different ids.
    #[arg(long, env = "SLUICE_INSTANCE_ID", value_name = "NAME")]
    pub instance_id: Option<String>,

    /// Poison records `--on-failure dead-letter` isolates one by one in a failing task, at
    /// most [default: 16]: each isolation runs the plugin again on a fresh instance. Past it, a
    /// part of the task that still fails is dead-lettered whole.
    #[arg(long, env = "SLUICE_MAX_POISON_PER_TASK", value_name = "N")]
    pub max_poison_per_task: Option<usize>,

    /// Topic for dead letters: records the plugin rejected, and with `--on-failure
    /// dead-letter` the records a failing task was isolated down to.
    #[arg(long, env = "SLUICE_DEAD_LETTER_TOPIC", value_name = "TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// Where the admin endpoint (status, hot upgrades) of a job with --checkpoint listens
    /// [default: 127.0.0.1:0, a free loopback port; the address and token go to DIR/admin.json].
    #[arg(long, env = "SLUICE_ADMIN_ADDRESS", value_name = "HOST:PORT")]
    pub admin_address: Option<std::net::SocketAddr>,

    /// Serve Prometheus metrics at /metrics and the Streaming page at / on this address (e.g.
    /// 127.0.0.1:9464; off unless given). Read-only: upgrades stay on the admin endpoint.
    #[arg(long, env = "SLUICE_METRICS_ADDRESS", value_name = "HOST:PORT")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Batches the Streaming page keeps and charts [default: 100].
    #[arg(long, env = "SLUICE_PAGE_BATCHES", value_name = "N")]
    pub page_batches: Option<usize>,

    /// PostgreSQL connection for the table sink, e.g. `postgres://user@127.0.0.1:5432/db` or
    /// `host=127.0.0.1 port=5432 user=app dbname=app`.
    #[arg(long, env = "SLUICE_POSTGRES", value_name = "URL")]
    pub postgres: Option<String>,

    /// Table that outputs without a topic of their own are written to, one row per output
    /// (its value a JSON object of column values). Needs --postgres.
    #[arg(long, env = "SLUICE_POSTGRES_TABLE", value_name = "TABLE")]
    pub postgres_table: Option<String>,

    /// `transactional`: a batch's rows and its offsets (table `sluice_offsets`) commit in one
    /// database transaction, and the job restarts from there; `upsert`: rows are upserted by
    /// --postgres-key, so replayed batches change nothing [default: transactional].
    #[arg(long, env = "SLUICE_POSTGRES_MODE", value_enum)]
    pub postgres_mode: Option<PostgresMode>,

    /// How long the database may be unreachable, and one statement may run, before the job
    /// gives up [default: --broker-timeout].
    #[arg(long, env = "SLUICE_POSTGRES_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration")]
    pub postgres_timeout: Option<Duration>,

    /// A key column of --postgres-table, the conflict target of upserts (repeatable).
    #[arg(long = "postgres-key", value_name = "COLUMN")]
    #[serde(default)]
    pub postgres_keys: Vec<String>,

    /// Give the plugin the host's real clocks. Without it the wall clock reads the batch time
    /// and the monotonic clock stands still at it, so a replayed batch sees the time its first
    /// run saw.
    #[arg(long, env = "SLUICE_ALLOW_WALL_CLOCK")]
    #[serde(default)]
    pub allow_wall_clock: bool,

    /// Give the plugin the operating system's randomness. Without it random bytes come from a
    /// generator seeded with (job, batch time, partition), the same again on a replay.
    #[arg(long, env = "SLUICE_ALLOW_RANDOM")]
    #[serde(default)]
    pub allow_random: bool,

    /// Grant the plugin one environment variable, as NAME=VALUE (repeatable). Plugins see no
    /// environment otherwise.
    #[arg(long = "allow-env", value_name = "NAME=VALUE", value_parser = parse_key_value)]
    #[serde(default, deserialize_with = "pairs_from_table")]
    pub allow_env: Vec<(String, String)>,

    /// Grant the plugin read-only access to a host directory, as HOST_DIR or HOST_DIR:GUEST_DIR
    /// (repeatable). Plugins see no files otherwise.
    #[arg(long = "allow-dir", value_name = "HOST_DIR[:GUEST_DIR]")]
    #[serde(default)]
    pub allow_dirs: Vec<String>,
}

impl JobOptions {
    /// Reads a job file. Unknown keys are an error naming the key.
    pub fn from_file(path: &Path) -> Result<JobOptions> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job file {}", path.display()))?;
        let mut options: JobOptions = toml::from_str(&text).map_err(|error| {
            // toml's own rendering spans several lines; one line names the file, line and problem.
            let line = error.span().map_or(0, |span| text[..span.start].lines().count().max(1));
            anyhow::anyhow!("invalid job file {}, line {line}: {}", path.display(), error.message().trim())
        })?;
        // Paths in a file are relative to the file, so a job directory can move as a whole.
        if let Some(dir) = path.parent() {
            options.plugin = options.plugin.map(|plugin| dir.join(plugin));
            options.checkpoint = options.checkpoint.map(|checkpoint| dir.join(checkpoint));
        }
        Ok(options)
    }

    /// These options (flags) layered over `file`.
    pub fn over(self, file: JobOptions) -> JobOptions {
        fn list<T>(flags: Vec<T>, file: Vec<T>) -> Vec<T> {
            if flags.is_empty() { file } else { flags }
        }
        fn pairs<K: Ord, V>(file: Vec<(K, V)>, flags: Vec<(K, V)>) -> Vec<(K, V)> {
            let merged: BTreeMap<K, V> = file.into_iter().chain(flags).collect();
            merged.into_iter().collect()
        }
        JobOptions {
            plugin: self.plugin.or(file.plugin),
            force: self.force || file.force,
            plugin_config: pairs(file.plugin_config, self.plugin_config),
            brokers: self.brokers.or(file.brokers),
            topics: list(self.topics, file.topics),
            topic_pattern: self.topic_pattern.or(file.topic_pattern),
            group: self.group.or(file.group),
            batch_interval: self.batch_interval.or(file.batch_interval),
            output_topic: self.output_topic.or(file.output_topic),
            print: self.print.or(file.print),
            kafka: pairs(file.kafka, self.kafka),
            start: pairs(file.start, self.start),
            auto_offset_reset: self.auto_offset_reset.or(file.auto_offset_reset),
            max_batches: self.max_batches.or(file.max_batches),
            stop_when_caught_up: self.stop_when_caught_up || file.stop_when_caught_up,
            shared_state: self.shared_state || file.shared_state,
            parallelism: self.parallelism.or(file.parallelism),
            broker_timeout: self.broker_timeout.or(file.broker_timeout),
            session_timeout: self.session_timeout.or(file.session_timeout),
            max_records_per_partition: self.max_records_per_partition.or(file.max_records_per_partition),
            max_bytes_per_partition: self.max_bytes_per_partition.or(file.max_bytes_per_partition),
            max_rate_per_partition: self.max_rate_per_partition.or(file.max_rate_per_partition),
            initial_rate: self.initial_rate.or(file.initial_rate),
            backpressure: self.backpressure || file.backpressure,
            backpressure_min_rate: self.backpressure_min_rate.or(file.backpressure_min_rate),
            on_offset_out_of_range: self.on_offset_out_of_range.or(file.on_offset_out_of_range),
            delivery: self.delivery.or(file.delivery),
            checkpoint: self.checkpoint.or(file.checkpoint),
            state_timeout: self.state_timeout.or(file.state_timeout),
            window: self.window.or(file.window),
            slide: self.slide.or(file.slide),
            task_deadline: self.task_deadline.or(file.task_deadline),
            max_memory: self.max_memory.or(file.max_memory),
            max_table_elements: self.max_table_elements.or(file.max_table_elements),
            max_instances: self.max_instances.or(file.max_instances),
            max_output_bytes: self.max_output_bytes.or(file.max_output_bytes),
            max_batch_output_bytes: self.max_batch_output_bytes.or(file.max_batch_output_bytes),
            admin_address: self.admin_address.or(file.admin_address),
            metrics_address: self.metrics_address.or(file.metrics_address),
            page_batches: self.page_batches.or(file.page_batches),
            postgres: self.postgres.or(file.postgres),
            postgres_table: self.postgres_table.or(file.postgres_table),
            postgres_mode: self.postgres_mode.or(file.postgres_mode),
            postgres_timeout: self.postgres_timeout.or(file.postgres_timeout),
            postgres_keys: list(self.postgres_keys, file.postgres_keys),
            on_failure: self.on_failure.or(file.on_failure),
            task_retries: self.task_retries.or(file.task_retries),
            max_poison_per_task: self.max_poison_per_task.or(file.max_poison_per_task),
            dead_letter_topic: self.dead_letter_topic.or(file.dead_letter_topic),
            allow_output_topics: list(self.allow_output_topics, file.allow_output_topics),
            instance_id: self.instance_id.or(file.instance_id),
            allow_wall_clock: self.allow_wall_clock || file.allow_wall_clock,
            allow_random: self.allow_random || file.allow_random,
            allow_env: pairs(file.allow_env, self.allow_env),
            allow_dirs: list(self.allow_dirs, file.allow_dirs),
        }
    }
}

/// Which topics a job reads.
#[derive(Debug, Clone)]
pub enum Topics {
    /// These topics, by name.
    Named(Vec<String>),
    /// Every topic whose whole name matches.
    Pattern(Regex),
}

/// A complete, validated job: what the engine runs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// `None`: the build the checkpoint ran last.
    pub plugin: Option<PathBuf>,
    /// Whether a build older than the checkpoint's current one may start (`--force`).
    pub force: bool,
    pub plugin_config: Vec<(String, String)>,
    pub brokers: String,
    pub topics: Topics,
    pub group: String,
    pub batch_interval: Duration,
    pub output_topic: Option<String>,
    pub print: Option<usize>,
    pub kafka: Vec<(String, String)>,
    pub start: BTreeMap<TopicPartition, i64>,
    pub auto_offset_reset: AutoOffsetReset,
    pub max_batches: Option<u64>,
    pub stop_when_caught_up: bool,
    /// `--shared-state`: keyed state also lives in the job's shuffle and changelog topics.
    pub shared_state: bool,
    pub parallelism: usize,
    pub broker_timeout: Duration,
    /// How long the group waits for a silent member.
    pub session_timeout: Duration,
    /// What one partition task may hold.
    pub bounds: TaskBounds,
    pub rate: RateLimits,
    pub on_offset_out_of_range: OnOffsetOutOfRange,
    pub delivery: DeliveryGuarantee,
    pub checkpoint: Option<PathBuf>,
    pub state_timeout: Option<Duration>,
    pub window: Option<WindowSpec>,
    pub sandbox: Sandbox,
    pub failure: FailureSettings,
    pub admin_address: std::net::SocketAddr,
    /// Where metrics and the Streaming page are served, if anywhere.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Batches the Streaming page keeps.
    pub page_batches: usize,
    pub postgres: Option<PostgresSettings>,
    /// Topics the plugin may send outputs to.
    pub output_topics: OutputTopics,
    /// This host's name in the group.
    pub instance_id: String,
}

/// How much one partition task may hold, whatever its planned range says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskBounds {
    pub max_records: usize,
    pub max_bytes: usize,
}

/// How a batch's Kafka outputs and its input offsets commit (the seeds' delivery semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    /// Outputs are delivered, then offsets committed: a crash in between repeats the batch's
    /// outputs.
    #[default]
    AtLeastOnce,
    /// Outputs, dead letters and offsets are one Kafka transaction per batch: a reader with
    /// `isolation.level=read_committed` sees each output once.
    ExactlyOnce,
}

/// The topics a plugin's outputs may go to: the job's own output and dead-letter topics, or
/// the `--allow-output-topic` patterns.
#[derive(Debug, Clone)]
pub struct OutputTopics {
    /// Each pattern as given, and compiled to match whole names.
    patterns: Vec<(String, Regex)>,
}

impl OutputTopics {
    fn new(patterns: &[String], output: Option<&str>, dead_letters: Option<&str>) -> Result<OutputTopics> {
        let given: Vec<String> = if patterns.is_empty() {
            output.into_iter().chain(dead_letters).map(regex::escape).collect()
        } else {
            patterns.to_vec()
        };
        let patterns = given
            .into_iter()
            .map(|pattern| {
                let compiled = Regex::new(&format!("^(?:{pattern})$"))
                    .with_context(|| format!("invalid --allow-output-topic {pattern:?}"))?;
                Ok((pattern, compiled))
            })
            .collect::<Result<_>>()?;
        Ok(OutputTopics { patterns })
    }

    /// Whether an output may be sent to `topic`.
    pub fn allows(&self, topic: &str) -> bool {
        self.patterns.iter().any(|(_, pattern)| pattern.is_match(topic))
    }

    /// The allowed topics, for messages.
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() {
            return "none".into();
        }
        self.patterns.iter().map(|(given, _)| given.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// How the PostgreSQL sink makes outputs exactly-once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresMode {
    /// Rows and offsets in one transaction.
    #[default]
    Transactional,
    /// Idempotent upserts by key.
    Upsert,
}

/// The PostgreSQL table sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    pub url: String,
    pub table: String,
    pub mode: PostgresMode,
    pub keys: Vec<String>,
    /// How long the database may be unreachable, and one statement may run.
    pub timeout: Duration,
}

/// What happens to a partition task that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Stop the job with an error; nothing past the last good batch is committed.
    #[default]
    Halt,
    /// Isolate the failing records, send them to --dead-letter-topic, and go on.
    DeadLetter,
    /// Log and count the task's records as skipped, and go on.
    Skip,
}

/// The failure policy and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureSettings {
    pub policy: FailurePolicy,
    pub retries: u32,
    pub dead_letter_topic: Option<String>,
    /// Poison records isolated one by one per task under `dead-letter`, at most.
    pub max_poison: usize,
}

impl Default for FailureSettings {
    fn default() -> FailureSettings {
        FailureSettings {
            policy: FailurePolicy::Halt,
            retries: DEFAULT_TASK_RETRIES,
            dead_letter_topic: None,
            max_poison: DEFAULT_MAX_POISON_PER_TASK,
        }
    }
}

/// Window length and slide of a windowed job, both multiples of the batch interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub length: Duration,
    pub slide: Duration,
}

impl WindowSpec {
    /// Checks `--window` and `--slide` against the batch interval, naming both values when
    /// one does not divide evenly.
    pub fn new(length: Duration, slide: Option<Duration>, batch_interval: Duration) -> Result<WindowSpec> {
        let slide = slide.unwrap_or(batch_interval);
        for (flag, value) in [("--window", length), ("--slide", slide)] {
            if value.is_zero() || value.as_millis() % batch_interval.as_millis() != 0 {
                bail!(
                    "{flag} {} is not a multiple of --batch-interval {}",
                    humantime::format_duration(value),
                    humantime::format_duration(batch_interval)
                );
            }
        }
        Ok(WindowSpec { length, slide })
    }
}

/// How many records a batch may take: Spark's rate limits and backpressure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Records per second per partition, at most.
    pub max_rate_per_partition: Option<f64>,
    /// Records per second for the whole job until an estimate exists.
    pub initial_rate: Option<f64>,
    /// Whether the PID estimator adapts the rate; `Some(min_rate)` when enabled.
    pub backpressure: Option<f64>,
}

impl RateLimits {
    /// No limits: every batch takes everything available.
    pub const UNLIMITED: RateLimits =
        RateLimits { max_rate_per_partition: None, initial_rate: None, backpressure: None };
}

impl JobConfig {
    /// Validates merged options and fills in defaults.
    pub fn from_options(options: JobOptions) -> Result<JobConfig> {
        let sandbox = sandbox(&options)?;
        if options.plugin.is_none() && options.checkpoint.is_none() {
            bail!(
                "no plugin given: pass --plugin PATH or set `plugin` in the job file (a job with a --checkpoint that \
                 has run continues with the build it ran last)"
            );
        }
        let topics = match (options.topics.is_empty(), options.topic_pattern) {
            (false, None) => Topics::Named(options.topics),
            (true, Some(pattern)) => Topics::Pattern(
                Regex::new(&format!("^(?:{pattern})$"))
                    .with_context(|| format!("invalid --topic-pattern {pattern:?}"))?,
            ),
            (true, None) => bail!("no topics to read: pass --topic NAME or --topic-pattern REGEX"),
            (false, Some(_)) => {
                bail!("--topic and --topic-pattern are exclusive: give one or the other")
            }
        };
        let group = options.group.context("no consumer group given: pass --group NAME")?;
        let batch_interval = options.batch_interval.unwrap_or(DEFAULT_BATCH_INTERVAL);
        if batch_interval.is_zero() {
            bail!("--batch-interval must be longer than zero");
        }
        for (key, _) in &options.kafka {
            if let Some((_, why)) = MANAGED_KAFKA_PROPERTIES.iter().find(|(managed, _)| managed == key) {
                bail!("kafka property `{key}` cannot be set with --kafka: {why}");
            }
        }
        if options.parallelism == Some(0) {
            bail!("--parallelism must be at least 1");
        }
        let parallelism =
            options.parallelism.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let broker_timeout = options.broker_timeout.unwrap_or(DEFAULT_BROKER_TIMEOUT);
        let output_topics = OutputTopics::new(
            &options.allow_output_topics,
            options.output_topic.as_deref(),
            options.dead_letter_topic.as_deref(),
        )?;
        if options.shared_state && options.delivery == Some(DeliveryGuarantee::ExactlyOnce) {
            bail!(
                "--shared-state with --delivery exactly-once is not supported yet: the state's two stages would need \
                 one transaction each per batch (docs/adr/0009); run shared state with at-least-once outputs (its \
                 state is exact either way), or exactly-once on one host without --shared-state"
            );
        }
        let instance_id = match options.instance_id {
            Some(id) if id.trim().is_empty() => bail!("--instance-id must not be empty"),
            Some(id) => id,
            None => host_name(),
        };
        Ok(JobConfig {
            plugin: options.plugin,
            force: options.force,
            plugin_config: options.plugin_config,
            brokers: options.brokers.unwrap_or_else(|| DEFAULT_BROKERS.into()),
            topics,
            group,
            batch_interval,
            output_topic: options.output_topic.clone(),
            print: options.print.filter(|n| *n > 0),
            kafka: options.kafka,
            start: options.start.into_iter().collect(),
            auto_offset_reset: options.auto_offset_reset.unwrap_or_default(),
            max_batches: options.max_batches,
            stop_when_caught_up: options.stop_when_caught_up,
            shared_state: options.shared_state,
            parallelism,
            broker_timeout,
            session_timeout: match options.session_timeout {
                Some(timeout) if timeout < Duration::from_secs(1) => bail!("--session-timeout must be at least 1s"),
                timeout => timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT),
            },
            bounds: TaskBounds {
                max_records: match options.max_records_per_partition {
                    Some(0) => bail!("--max-records-per-partition must be at least 1"),
                    records => records.unwrap_or(DEFAULT_MAX_RECORDS_PER_PARTITION),
                },
                max_bytes: match options.max_bytes_per_partition {
                    Some(0) => bail!("--max-bytes-per-partition must be at least 1 byte"),
                    bytes => usize::try_from(bytes.unwrap_or(DEFAULT_MAX_BYTES_PER_PARTITION)).unwrap_or(usize::MAX),
                },
            },
            rate: RateLimits {
                max_rate_per_partition: positive_rate("--max-rate-per-partition", options.max_rate_per_partition)?,
                initial_rate: positive_rate("--initial-rate", options.initial_rate)?,
                backpressure: match options.backpressure {
                    true => Some(
                        positive_rate("--backpressure-min-rate", options.backpressure_min_rate)?
                            .unwrap_or(DEFAULT_BACKPRESSURE_MIN_RATE),
                    ),
                    false => None,
                },
            },
            on_offset_out_of_range: options.on_offset_out_of_range.unwrap_or_default(),
            delivery: options.delivery.unwrap_or_default(),
            checkpoint: options.checkpoint,
            state_timeout: match options.state_timeout {
                Some(timeout) if timeout.is_zero() => {
                    bail!("--state-timeout must be longer than zero")
                }
                timeout => timeout,
            },
            window: match (options.window, options.slide) {
                (Some(length), slide) => Some(WindowSpec::new(length, slide, batch_interval)?),
                (None, Some(_)) => bail!("--slide needs --window"),
                (None, None) => None,
            },
            sandbox,
            admin_address: options.admin_address.unwrap_or(DEFAULT_ADMIN_ADDRESS),
            metrics_address: options.metrics_address,
            page_batches: match options.page_batches {
                Some(0) => bail!("--page-batches must be at least 1"),
                batches => batches.unwrap_or(DEFAULT_PAGE_BATCHES),
            },
            postgres: match (options.postgres, options.postgres_table) {
                (Some(url), Some(table)) => {
                    if options.output_topic.is_some() {
                        bail!("--output-topic and --postgres-table both claim the outputs without a topic: give one");
                    }
                    let mode = options.postgres_mode.unwrap_or_default();
                    if mode == PostgresMode::Transactional && options.delivery == Some(DeliveryGuarantee::ExactlyOnce) {
                        bail!(
                            "--delivery exactly-once and --postgres-mode transactional each commit the input offsets \
                             in their own transaction (Kafka's, the database's), and the two cannot commit atomically \
                             together: use --postgres-mode upsert (idempotent rows) with exactly-once Kafka outputs, or \
                             keep the database transactional with at-least-once Kafka outputs"
                        );
                    }
                    if mode == PostgresMode::Upsert && options.postgres_keys.is_empty() {
                        bail!("--postgres-mode upsert needs --postgres-key COLUMN (the conflict target)");
                    }
                    let timeout = options.postgres_timeout.unwrap_or(broker_timeout);
                    Some(PostgresSettings { url, table, mode, keys: options.postgres_keys, timeout })
                }
                (None, None) => None,
                (Some(_), None) => bail!("--postgres needs --postgres-table TABLE"),
                (None, Some(_)) => bail!("--postgres-table needs --postgres URL"),
            },
            output_topics,
            instance_id,
            failure: FailureSettings {
                policy: match (options.on_failure.unwrap_or_default(), &options.dead_letter_topic) {
                    (FailurePolicy::DeadLetter, None) => {
                        bail!("--on-failure dead-letter needs --dead-letter-topic TOPIC")
                    }
                    (policy, _) => policy,
                },
                retries: options.task_retries.unwrap_or(DEFAULT_TASK_RETRIES),
                dead_letter_topic: options.dead_letter_topic,
                max_poison: options.max_poison_per_task.unwrap_or(DEFAULT_MAX_POISON_PER_TASK),
            },
        })
    }

    /// The base configuration of every Kafka client the job creates: the brokers plus the
    /// user's `--kafka` properties.
    pub fn kafka_client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // After an outage librdkafka waits up to this long between reconnection attempts (its
        // default is 10 s): brokers that are back are used again within a second.
        config.set("reconnect.backoff.max.ms", "1000");
        // The group's membership (DescribeGroups, `host status --group`) names members by it.
        config.set("client.id", format!("sluice-{}", self.instance_id));
        for (key, value) in &self.kafka {
            config.set(key, value);
        }
        config
    }
}

/// The machine's host name, the default `--instance-id`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sluice".into())
}

/// The plugin sandbox from its options, defaults filled in.
fn sandbox(options: &JobOptions) -> Result<Sandbox> {
    let defaults = Sandbox::default();
    let (cpu, deadline) = match options.task_deadline {
        None => (defaults.cpu, defaults.deadline),
        Some(TaskDeadline::After(deadline)) if deadline.is_zero() => {
            bail!("--task-deadline must be longer than zero (or `off`)")
        }
        Some(TaskDeadline::After(deadline)) => (defaults.cpu, deadline),
        Some(TaskDeadline::Off) => (CpuLimit::Unbounded, defaults.deadline),
    };
    let dirs = options
        .allow_dirs
        .iter()
        .map(|grant| {
            let (host, guest) = match grant.rsplit_once(':') {
                Some((host, guest)) if !host.is_empty() && guest.starts_with('/') => (host, guest.to_string()),
                _ => (grant.as_str(), grant.clone()),
            };
            let host = PathBuf::from(host);
            if !host.is_dir() {
                bail!("--allow-dir {grant}: {} is not a directory", host.display());
            }
            Ok(GrantedDir { host, guest })
        })
        .collect::<Result<Vec<_>>>()?;
    let max_memory = options.max_memory.unwrap_or(defaults.max_memory);
    Ok(Sandbox {
        cpu,
        deadline,
        max_memory,
        max_table_elements: options.max_table_elements.unwrap_or(defaults.max_table_elements),
        max_instances: options.max_instances.unwrap_or(defaults.max_instances),
        max_output_bytes: options.max_output_bytes.unwrap_or(defaults.max_output_bytes),
        max_batch_output_bytes: options.max_batch_output_bytes.unwrap_or(defaults.max_batch_output_bytes),
        env: options.allow_env.clone(),
        dirs,
        determinism: Determinism {
            job_seed: Determinism::seed_of(options.group.as_deref().unwrap_or_default()),
            wall_clock: options.allow_wall_clock,
            os_random: options.allow_random,
        },
    })
}

/// Parses a size in bytes: a number with an optional unit, `KiB`, `MiB`, `GiB` (powers of
/// 1024) or `KB`, `MB`, `GB` (powers of 1000).
fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().with_context(|| format!("expected a size such as 256MiB, got {text:?}"))?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => bail!("unknown size unit {other:?} in {text:?}: use KiB, MiB, GiB, KB, MB or GB"),
    };
    number.checked_mul(unit).with_context(|| format!("size {text:?} is too large"))
}

fn positive_rate(flag: &str, rate: Option<f64>) -> Result<Option<f64>> {
    match rate {
        Some(rate) if !(rate.is_finite() && rate > 0.0) => {
            bail!("{flag} must be a positive number of records per second")
        }
        rate => Ok(rate),
    }
}

fn parse_key_value(text: &str) -> Result<(String, String)> {
    let (key, value) = text.split_once('=').with_context(|| format!("expected KEY=VALUE, got {text:?}"))?;
    if key.is_empty() {
        bail!("expected KEY=VALUE, got {text:?} (empty key)");
    }
    Ok((key.to_string(), value.to_string()))
}

fn parse_start(text: &str) -> Result<(TopicPartition, i64)> {
    let (partition, offset) =
        text.rsplit_once('=').with_context(|| format!("expected TOPIC:PARTITION=OFFSET, got {text:?}"))?;
    let offset = offset
        .parse::<i64>()
        .ok()
        .filter(|o| *o >= 0)
        .with_context(|| format!("offset in {text:?} is not a non-negative number"))?;
    Ok((partition.parse()?, offset))
}

/// `--task-deadline`: a duration, or no bound at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskDeadline {
    After(Duration),
    Off,
}

fn parse_task_deadline(text: &str) -> Result<TaskDeadline> {
    if text.trim() == "off" {
        return Ok(TaskDeadline::Off);
    }
    humantime::parse_duration(text)
        .map(TaskDeadline::After)
        .with_context(|| format!("{text:?} is neither a duration like \"30s\" nor \"off\""))
}

fn task_deadline<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<TaskDeadline>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_task_deadline(&text).map(Some).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"2s\" or \"500ms\": {e}")))
}

/// A TOML scalar, kept as the text a Kafka property or plugin parameter takes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(text) => text,
            Scalar::Integer(n) => n.to_string(),
            Scalar::Float(x) => x.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Size::Bytes(bytes)) => Ok(Some(bytes)),
        Some(Size::Text(text)) => parse_size(&text).map(Some).map_err(serde::de::Error::custom),
    }
}

fn pairs_from_table<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<(String, String)>, D::Error> {
    let table = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(table.into_iter().map(|(key, value)| (key, value.into_text())).collect())
}

fn starts_from_table<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<(TopicPartition, i64)>, D::Error> {
    let table = BTreeMap::<String, i64>::deserialize(deserializer)?;
    table
        .into_iter()
        .map(|(partition, offset)| Ok((partition.parse().map_err(serde::de::Error::custom)?, offset)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<JobOptions> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text)?;
        JobOptions::from_file(&path)
    }

    #[test]
    fn the_task_deadline_can_be_turned_off_but_not_zero() {
        let job = |deadline: &str| {
            let text =
                format!("plugin = \"p.wasm\"\ntopics = [\"t\"]\ngroup = \"g\"\ntask-deadline = \"{deadline}\"\n");
            file(&text).and_then(JobConfig::from_options)
        };
        assert_eq!(job("off").unwrap().sandbox.cpu, CpuLimit::Unbounded);
        let bounded = job("2s").unwrap().sandbox;
        assert_eq!((bounded.cpu, bounded.deadline), (CpuLimit::Epoch, Duration::from_secs(2)));
        let zero = job("0s").err().unwrap();
        assert!(format!("{zero:#}").contains("longer than zero (or `off`)"), "{zero:#}");
        let bad = job("soon").err().unwrap();
        assert!(format!("{bad:#}").contains("neither a duration"), "{bad:#}");
        assert_eq!(parse_task_deadline("off").unwrap(), TaskDeadline::Off);
    }

    #[test]
    fn a_job_file_sets_every_option() {
        let options = file(
            r#"
            plugin = "etl.wasm"
            brokers = "10.0.0.1:9092"
            topics = ["a", "b"]
            group = "etl"
            batch-interval = "500ms"
            output-topic = "out"
            print = 5
            auto-offset-reset = "earliest"
            max-batches = 3
            stop-when-caught-up = true
            parallelism = 4
            broker-timeout = "1m"
            max-rate-per-partition = 100
            initial-rate = 50.5
            backpressure = true
            on-offset-out-of-range = "earliest"
            checkpoint = "state"
            state-timeout = "1m"
            window = "1500ms"
            slide = "1s"
            [kafka]
            "fetch.wait.max.ms" = 100
            [start]
            "a:0" = 42
            [plugin-config]
            timezone = "Asia/Shanghai"
            "#,
        )
        .unwrap();
        assert!(options.plugin.as_ref().unwrap().ends_with("etl.wasm"));
        let job = JobConfig::from_options(options).unwrap();
        assert_eq!(job.brokers, "10.0.0.1:9092");
        assert!(matches!(&job.topics, Topics::Named(t) if t == &["a", "b"]));
        assert_eq!(job.batch_interval, Duration::from_millis(500));
        assert_eq!(job.print, Some(5));
        assert_eq!(job.kafka, [("fetch.wait.max.ms".to_string(), "100".to_string())]);
        assert_eq!(job.start[&TopicPartition::new("a", 0)], 42);
        assert_eq!(job.plugin_config, [("timezone".to_string(), "Asia/Shanghai".to_string())]);
        assert_eq!(job.auto_offset_reset, AutoOffsetReset::Earliest);
        assert_eq!((job.max_batches, job.stop_when_caught_up, job.parallelism), (Some(3), true, 4));
        assert_eq!(job.broker_timeout, Duration::from_secs(60));
        assert_eq!(
            job.rate,
            RateLimits { max_rate_per_partition: Some(100.0), initial_rate: Some(50.5), backpressure: Some(100.0) }
        );
        assert_eq!(job.on_offset_out_of_range, OnOffsetOutOfRange::Earliest);
        assert!(job.checkpoint.as_ref().unwrap().ends_with("state"));
        assert_eq!(job.state_timeout, Some(Duration::from_secs(60)));
        let window = WindowSpec { length: Duration::from_millis(1500), slide: Duration::from_secs(1) };
        assert_eq!(job.window, Some(window));
    }

    #[test]
    fn sandbox_and_failure_options_come_from_the_job_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "plugin = \"p.wasm\"\ntopics = [\"t\"]\ngroup = \"g\"\ntask-deadline = \"5s\"\nmax-memory = \"64MiB\"\n\
             max-instances = 10\non-failure = \"dead-letter\"\ndead-letter-topic = \"dlq\"\ntask-retries = 0\n\
             allow-dirs = [\"{}:/data\"]\n[allow-env]\nTZ = \"UTC\"\n",
            dir.path().display()
        );
        let job = JobConfig::from_options(file(&text).unwrap()).unwrap();
        assert_eq!(job.sandbox.deadline, Duration::from_secs(5));
        assert_eq!(job.sandbox.cpu, CpuLimit::Epoch);
        assert_eq!(job.sandbox.max_memory, 64 << 20);
        assert_eq!(job.sandbox.max_instances, 10);
        assert_eq!(job.sandbox.env, [("TZ".to_string(), "UTC".to_string())]);
        assert_eq!(job.sandbox.dirs, [GrantedDir { host: dir.path().to_path_buf(), guest: "/data".into() }]);
        assert_eq!(
            job.failure,
            FailureSettings {
                policy: FailurePolicy::DeadLetter,
                retries: 0,
                dead_letter_topic: Some("dlq".into()),
                max_poison: DEFAULT_MAX_POISON_PER_TASK
            }
        );
    }

    #[test]
    fn exactly_once_comes_from_the_job_file_and_refuses_the_databases_transactions() {
        let base = "plugin = \"p.wasm\"\ntopics = [\"t\"]\ngroup = \"g\"\ndelivery = \"exactly-once\"\n";
        let job = JobConfig::from_options(file(base).unwrap()).unwrap();
        assert_eq!(job.delivery, DeliveryGuarantee::ExactlyOnce);
        let with_table = format!("{base}postgres = \"host=db\"\npostgres-table = \"rows\"\n");
        let error = JobConfig::from_options(file(&with_table).unwrap()).unwrap_err().to_string();
        assert!(error.contains("cannot commit atomically"), "{error}");
        let upsert = format!("{with_table}postgres-mode = \"upsert\"\npostgres-keys = [\"id\"]\n");
        assert!(JobConfig::from_options(file(&upsert).unwrap()).is_ok(), "idempotent rows combine with it");
        let default = "plugin = \"p.wasm\"\ntopics = [\"t\"]\ngroup = \"g\"\n";
        assert_eq!(JobConfig::from_options(file(default).unwrap()).unwrap().delivery, DeliveryGuarantee::AtLeastOnce);
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").unwrap_err().to_string().contains("unknown size unit"));
    }

    #[test]
    fn dead_letter_policy_needs_a_topic() {
        let options = JobOptions {
            plugin: Some("p.wasm".into()),
            topics: vec!["t".into()],
            group: Some("g".into()),
            on_failure: Some(FailurePolicy::DeadLetter),
            ..JobOptions::default()
        };
        let error = JobConfig::from_options(options).unwrap_err().to_string();
        assert_eq!(error, "--on-failure dead-letter needs --dead-letter-topic TOPIC");
    }

    #[test]
    fn windows_must_be_multiples_of_the_batch_interval() {
        let interval = Duration::from_secs(1);
        let error = WindowSpec::new(Duration::from_millis(2500), None, interval).unwrap_err().to_string();
        assert_eq!(error, "--window 2s 500ms is not a multiple of --batch-interval 1s");
        let error = WindowSpec::new(Duration::from_secs(3), Some(Duration::from_millis(1500)), interval).unwrap_err();
        assert_eq!(error.to_string(), "--slide 1s 500ms is not a multiple of --batch-interval 1s");
        let window = WindowSpec::new(Duration::from_secs(3), None, interval).unwrap();
        assert_eq!(window.slide, interval, "the slide defaults to the batch interval");
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = format!("{:#}", file("plugin = \"x.wasm\"\nbatch-intervall = \"2s\"\n").unwrap_err());
        assert!(error.contains("unknown field `batch-intervall`"), "{error}");
    }

    #[test]
    fn flags_override_the_file_and_merge_key_values() {
        let from_file =
            file("plugin = \"a.wasm\"\ntopics = [\"a\"]\ngroup = \"g\"\n[kafka]\n\"x\" = \"file\"\n\"y\" = \"file\"\n")
                .unwrap();
        let flags = JobOptions {
            topics: vec!["b".into()],
            kafka: vec![("y".into(), "flag".into())],
            batch_interval: Some(Duration::from_secs(5)),
            ..JobOptions::default()
        };
        let job = JobConfig::from_options(flags.over(from_file)).unwrap();
        assert!(matches!(&job.topics, Topics::Named(t) if t == &["b"]));
        assert_eq!(job.kafka, [("x".into(), "file".into()), ("y".into(), "flag".into())]);
        assert_eq!(job.batch_interval, Duration::from_secs(5));
        assert_eq!(job.group, "g");
    }

    #[test]
    fn defaults_follow_kafka() {
        let options = JobOptions {
            plugin: Some("p.wasm".into()),
            topics: vec!["t".into()],
            group: Some("g".into()),
            ..JobOptions::default()
        };
        let job = JobConfig::from_options(options).unwrap();
        assert_eq!(job.auto_offset_reset, AutoOffsetReset::Latest);
        assert_eq!(job.batch_interval, DEFAULT_BATCH_INTERVAL);
        assert_eq!(job.brokers, DEFAULT_BROKERS);
        assert_eq!(job.rate, RateLimits::UNLIMITED);
        assert_eq!(job.on_offset_out_of_range, OnOffsetOutOfRange::Fail);
    }

    #[test]
    fn incomplete_or_conflicting_jobs_are_refused() {
        let base = || JobOptions {
            plugin: Some("p.wasm".into()),
            topics: vec!["t".into()],
            group: Some("g".into()),
            ..JobOptions::default()
        };
        let error = |options: JobOptions| JobConfig::from_options(options).unwrap_err().to_string();
        assert!(error(JobOptions { plugin: None, ..base() }).contains("no plugin"));
        assert!(error(JobOptions { topics: vec![], ..base() }).contains("no topics"));
        assert!(error(JobOptions { topic_pattern: Some("x".into()), ..base() }).contains("exclusive"));
        assert!(error(JobOptions { group: None, ..base() }).contains("--group"));
        assert!(error(JobOptions { max_rate_per_partition: Some(0.0), ..base() }).contains("positive"));
        assert!(
            error(JobOptions { kafka: vec![("enable.auto.commit".into(), "true".into())], ..base() })
                .contains("`enable.auto.commit` cannot be set")
        );
    }

    #[test]
    fn flag_values_parse() {
        assert_eq!(parse_key_value("a.b=c=d").unwrap(), ("a.b".into(), "c=d".into()));
        assert!(parse_key_value("novalue").is_err());
        assert_eq!(parse_start("in:2=40").unwrap(), (TopicPartition::new("in", 2), 40));
        assert!(parse_start("in:2").is_err());
        assert!(parse_start("in=4").is_err());
    }
}
