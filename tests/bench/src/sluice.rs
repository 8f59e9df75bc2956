//! Sluice itself: `host run` with the given flags, run by the engine in this process.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use sluice_host::cli::{Cli, Command};
use sluice_host::config::JobConfig;
use sluice_host::engine::{BatchReport, Engine, RunSummary, Shutdown};

/// What a Sluice run did.
pub struct SluiceRun {
    /// From the start of the first batch's wait to the last batch's commit; loading the
    /// plugin and connecting happen before, closing the clients after, and neither is
    /// counted (nor is either for the native baseline).
    pub elapsed: Duration,
    pub summary: RunSummary,
    pub batches: Vec<BatchReport>,
}

/// Runs a job given as `host run` flags to its end.
pub fn run(flags: &[String]) -> Result<SluiceRun> {
    // Parsed by the `host` binary's own command line.
    let command = ["host", "run"].into_iter().map(String::from).chain(flags.iter().cloned());
    let Command::Run(args) = Cli::try_parse_from(command).context("bad host run flags")?.command else {
        bail!("not a run command");
    };
    let job = JobConfig::from_options(args.options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let engine = tokio::task::block_in_place(|| Engine::start(job))?;
        let mut batches = Vec::new();
        let started = Instant::now();
        let mut last_commit = started;
        let summary = engine
            .run_observed(Shutdown::manual().0, |report| {
                last_commit = Instant::now();
                batches.push(report.clone());
                Ok(())
            })
            .await?;
        Ok(SluiceRun { elapsed: last_commit - started, summary, batches })
    })
}
