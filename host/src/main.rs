//! `host`: the Sluice command-line binary.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser as _;
use sluice_host::broker::DevBroker;
use sluice_host::cli::{CheckpointCommand, Cli, Command, DevBrokerArgs, RunArgs, UpgradeArgs};
use sluice_host::config::{JobConfig, JobOptions};
use sluice_host::engine::{Engine, Shutdown};
use sluice_host::observe::summary;
use tracing_subscriber::EnvFilter;

/// A batch allocates and frees hundreds of thousands of small buffers (records, keyed values,
/// outputs lifted from the plugin); mimalloc frees them about a fifth faster end to end than
/// glibc's allocator in the word-count benchmark (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line naming the thing and the problem; the cause chain is joined with ": ".
            let message = format!("{error:#}");
            eprintln!("error: {}", message.lines().map(str::trim).collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info"))
                // The source closes its consumer itself, within a bound (librdkafka can wait for
                // ever); rdkafka's drop then closes it again and logs that as an error.
                .add_directive("rdkafka::consumer::base_consumer=off".parse().expect("a valid directive")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Demo(args) => sluice_host::demo::run(args).await,
            Command::DevBroker(args) => dev_broker(args).await,
            Command::Checkpoint(CheckpointCommand::Inspect { dir, brokers, group }) => {
                let changelog = brokers.as_deref().zip(group.as_deref());
                let report = tokio::task::block_in_place(|| sluice_host::inspect::inspect(&dir, changelog))?;
                print!("{report}");
                Ok(())
            }
            Command::Upgrade(args) => upgrade(args),
            Command::Status(args) => {
                let (body, text) = match (&args.checkpoint, &args.group) {
                    (Some(checkpoint), _) => {
                        let (code, body) = sluice_host::admin::request(checkpoint, "GET", "/status", None)?;
                        sluice_host::admin::check_ok(code, &body)?;
                        let text = summary::job(&body);
                        (body, text)
                    }
                    (None, Some(group)) => {
                        let mut config = rdkafka::ClientConfig::new();
                        config.set("bootstrap.servers", &args.brokers);
                        let view = tokio::task::block_in_place(|| {
                            sluice_host::source::group_view(&config, group, &args.topics)
                        })?;
                        (serde_json::to_value(&view)?, summary::group(&view))
                    }
                    (None, None) => unreachable!("clap requires --checkpoint or --group"),
                };
                match args.json {
                    true => println!("{}", serde_json::to_string_pretty(&body)?),
                    false => print!("{text}"),
                }
                Ok(())
            }
            Command::Checkpoint(CheckpointCommand::Dump { dir }) => {
                print!("{}", sluice_host::inspect::dump(&dir)?);
                Ok(())
            }
        }
    })
}

async fn run(args: RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => JobOptions::from_file(path)?,
        None => JobOptions::default(),
    };
    let job = JobConfig::from_options(args.options.over(file))?;
    let engine = tokio::task::block_in_place(|| Engine::start(job))?;
    engine.run(Shutdown::on_signals()).await?;
    Ok(())
}

/// Asks the running job to upgrade and prints the outcome; fails unless it upgraded.
fn upgrade(args: UpgradeArgs) -> Result<()> {
    let plugin = std::fs::canonicalize(&args.plugin)
        .map_err(|error| anyhow::anyhow!("cannot read plugin {}: {error}", args.plugin.display()))?;
    let body = serde_json::json!({ "plugin": plugin, "force": args.force });
    let (code, answer) =
        tokio::task::block_in_place(|| sluice_host::admin::request(&args.checkpoint, "POST", "/upgrade", Some(&body)))?;
    sluice_host::admin::check_ok(code, &answer)?;
    let text = |key: &str| answer[key].as_str().unwrap_or("?").to_string();
    match answer["outcome"].as_str() {
        Some("upgraded") => {
            println!("upgraded from {} to {} at batch {} ms", text("from"), text("to"), answer["first_batch"]);
            Ok(())
        }
        Some("rolled-back") => anyhow::bail!(
            "rolled back from {} to {} at batch {} ms: {}",
            text("to"),
            text("from"),
            answer["batch"],
            text("reason")
        ),
        Some("stopped") => anyhow::bail!("upgrade not done: {}", text("reason")),
        _ => anyhow::bail!("upgrade refused: {}", text("reason")),
    }
}

async fn dev_broker(args: DevBrokerArgs) -> Result<()> {
    let broker = std::sync::Arc::new(DevBroker::start(args.brokers, &args.topics)?);
    if let Some(delay) = args.initial_rebalance_delay {
        broker.set_initial_rebalance_delay(delay);
    }
    // The address alone on stdout, so scripts can read it with one `read`.
    println!("{}", broker.bootstrap_servers());
    eprintln!(
        "mock Kafka cluster serving at {} (brokers 1 to {}); stop with Ctrl-C. Fault commands on stdin: \
         down N, up N, leader TOPIC PARTITION N, rtt N MS, errors API ERROR[,ERROR], topic NAME PARTITIONS",
        broker.bootstrap_servers(),
        broker.brokers()
    );
    // Fault injection from a test harness or a terminal: one command per line, one answer
    // per command on stdout. End of input is not a stop (a broker started in the background
    // has none).
    let control = broker.clone();
    std::thread::Builder::new().name("dev-broker-control".into()).spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if line.trim().is_empty() {
                continue;
            }
            match control.control(&line) {
                Ok(()) => println!("ok"),
                Err(error) => println!("error: {error:#}"),
            }
        }
    })?;
    let mut shutdown = Shutdown::on_signals();
    shutdown.requested().await;
    Ok(())
}
