//! The peer: Quix Streams (PyPI) running tests/bench/quix_peer.py against the same broker.
//! Its virtual environment is made on first use, under the target directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/quix_peer.py");
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/requirements.txt");

/// A Python with Quix Streams installed.
pub struct Quix {
    python: PathBuf,
    pub version: String,
}

impl Quix {
    /// The virtual environment in `dir`, created (and Quix Streams installed) if missing.
    pub fn prepare(dir: &Path) -> Result<Quix> {
        let python = dir.join("bin").join("python3");
        if !python.exists() {
            eprintln!("setting up Quix Streams in {}", dir.display());
            run(Command::new("python3").args(["-m", "venv"]).arg(dir))
                .context("cannot create a Python virtual environment (is python3-venv installed?)")?;
        }
        let installed = Command::new(&python).args(["-c", "import quixstreams"]).output()?.status.success();
        if !installed {
            run(Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(REQUIREMENTS))
            .context("cannot install Quix Streams")?;
        }
        let version = Command::new(&python)
            .args(["-c", "import importlib.metadata as m; print(m.version('quixstreams'))"])
            .output()?;
        Ok(Quix { python, version: String::from_utf8_lossy(&version.stdout).trim().to_string() })
    }

    /// Runs the peer's `job` (etl or wordcount) over `records` input records until it has
    /// produced `outputs` outputs; returns its own measure of the time it took.
    pub fn run(
        &self,
        job: &str,
        bootstrap: &str,
        (input, output): (&str, &str),
        (records, outputs): (u64, u64),
        state: &Path,
    ) -> Result<Duration> {
        let result = Command::new(&self.python)
            .arg(SCRIPT)
            .args([job, bootstrap, input, output, &records.to_string(), &outputs.to_string()])
            .arg(state)
            .output()
            .context("cannot run the Quix Streams peer")?;
        if !result.status.success() {
            bail!("the Quix Streams peer failed ({}):\n{}", result.status, String::from_utf8_lossy(&result.stderr));
        }
        let stdout = String::from_utf8_lossy(&result.stdout);
        let line = stdout.lines().last().context("the Quix Streams peer printed nothing")?;
        let report: serde_json::Value = serde_json::from_str(line).with_context(|| format!("peer said {line:?}"))?;
        let seconds = report["seconds"].as_f64().context("the peer's report has no seconds")?;
        Ok(Duration::from_secs_f64(seconds))
    }
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status()?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
