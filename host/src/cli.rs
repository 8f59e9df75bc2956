//! The `host` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::JobOptions;
use crate::demo::DemoArgs;

/// Sluice: Kafka stream processing in micro-batches, with user logic as sandboxed WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "host", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job: read Kafka topics in micro-batches through a Wasm plugin.
    Run(Box<RunArgs>),
    /// Try Sluice in one command: the seeds' ETL on an in-process Kafka mock cluster.
    Demo(DemoArgs),
    /// Serve a Kafka mock cluster on loopback until stopped, printing its bootstrap address.
    DevBroker(DevBrokerArgs),
    /// Look into a job's checkpoint (`--checkpoint DIR`) without running the job.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Swap a running job's plugin for a new build at the next batch boundary, keeping offsets
    /// and state; rolled back if the new build fails its first batches.
    Upgrade(UpgradeArgs),
    /// Show a running job's plugin, partitions, last batch and lag (`--checkpoint DIR`), or a
    /// whole group's members, partitions, plugin builds and lag as their commits say
    /// (`--group NAME --topic NAME`).
    Status(StatusArgs),
}

/// Options of `host status`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["checkpoint", "group"]))]
pub struct StatusArgs {
    /// The running job's checkpoint directory (its admin endpoint and token are there).
    #[arg(long, env = "SLUICE_CHECKPOINT", value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// A consumer group: every member's partitions and builds, from the group's commits.
    #[arg(long, value_name = "NAME", requires = "topics")]
    pub group: Option<String>,
    /// The group's input topics (repeatable).
    #[arg(long = "topic", value_name = "NAME")]
    pub topics: Vec<String>,
    /// Bootstrap servers of the group's cluster.
    #[arg(long, env = "SLUICE_BROKERS", value_name = "HOST:PORT,...", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Print the status as JSON instead of readable lines.
    #[arg(long)]
    pub json: bool,
}

/// Options of `host upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The new plugin build (a Wasm component).
    #[arg(long, value_name = "PATH")]
    pub plugin: PathBuf,
    /// The running job's checkpoint directory (its admin endpoint and token are there).
    #[arg(long, env = "SLUICE_CHECKPOINT", value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Switch even to a plugin with another name (its state checks are skipped too).
    #[arg(long)]
    pub force: bool,
}

/// `host checkpoint ...`
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Last batch, offsets per partition, plugin versions by batch, state size per state
    /// partition and a few sample keys; with `--shared-state`, where each state partition's
    /// copy stands in its changelog (how far behind, given `--brokers` and `--group`).
    Inspect {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Bootstrap servers, to compare a shared-state job's copies with their changelog.
        #[arg(long, value_name = "HOST:PORT,...", requires = "group")]
        brokers: Option<String>,
        /// The job's consumer group (its changelog topic is `<group>-changelog`).
        #[arg(long, value_name = "NAME", requires = "brokers")]
        group: Option<String>,
    },
    /// Every key's state, one JSON object per line: {"key": ..., "state": ...}.
    Dump {
        /// The checkpoint directory.
        dir: PathBuf,
    },
}

/// Options of `host run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Job file (TOML) setting any of the options below; flags given here override it.
    #[arg(long, short = 'c', env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub options: JobOptions,
}

/// Options of `host dev-broker`.
#[derive(Debug, Args)]
pub struct DevBrokerArgs {
    /// Number of brokers in the cluster.
    #[arg(long, default_value_t = 1)]
    pub brokers: i32,
    /// A topic to create, as NAME:PARTITIONS (repeatable). Others appear on first use with
    /// 4 partitions.
    #[arg(long = "topic", value_name = "NAME:PARTITIONS", value_parser = crate::broker::parse_topic_spec)]
    pub topics: Vec<(String, i32)>,
    /// Delay before a new consumer group's first assignment (Kafka's
    /// `group.initial.rebalance.delay.ms`) [default: 200ms; brokers default to 3s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub initial_rebalance_delay: Option<std::time::Duration>,
}
