//! Every plugin build that processed a job's batches, kept in the checkpoint directory by
//! content (`builds/<sha256>.wasm`), so a restart without `--plugin` continues with the build
//! the job last ran, and a replayed batch runs the build it was planned with — whatever file the
//! operator's `--plugin` points at by then.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The build store of one checkpoint directory.
#[derive(Debug, Clone)]
pub struct Builds {
    dir: PathBuf,
}

impl Builds {
    /// The store inside the checkpoint directory `checkpoint_dir`.
    pub fn new(checkpoint_dir: &Path) -> Builds {
        Builds { dir: checkpoint_dir.join("builds") }
    }

    /// The directory the builds are kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the build with `digest` is kept.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.wasm"))
    }

    /// Keeps `bytes` as the build `digest` (once: builds are immutable), written to a
    /// temporary file and renamed, so a crash never leaves half a build under its name.
    pub fn keep(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(digest);
        if path.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let temporary = self.dir.join(format!(".{digest}.{}.tmp", std::process::id()));
        let mut file =
            std::fs::File::create(&temporary).with_context(|| format!("cannot write {}", temporary.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path).with_context(|| format!("cannot keep build {}", path.display()))
    }

    /// The bytes of build `digest`, if it is kept.
    pub fn read(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(digest);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("cannot read build {}", path.display())),
        }
    }
}
