//! Crash points for recovery tests: `SLUICE_CRASH_AT=PHASE:N` aborts the process the N-th time
//! it reaches PHASE, as abruptly as `kill -9` (no destructors, no flush, no commit).
//!
//! Phases, in batch order: `fetch` (records read, nothing processed), `plugin` (plugin calls
//! done), `deliver` (outputs acknowledged by the sinks), `checkpoint` (inside the checkpoint
//! transaction, before it commits) and `commit` (checkpoint committed, group offsets not yet).
//! Without the variable every crash point is a single relaxed load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the crash point.
pub const VARIABLE: &str = "SLUICE_CRASH_AT";

struct CrashAt {
    phase: String,
    nth: u64,
    seen: AtomicU64,
}

static CRASH_AT: OnceLock<Option<CrashAt>> = OnceLock::new();

/// Marks that the process reached `phase`; aborts it if this is the configured crash.
pub fn reached(phase: &str) {
    let crash = CRASH_AT.get_or_init(|| {
        let value = std::env::var(VARIABLE).ok()?;
        let (phase, nth) = value.split_once(':')?;
        Some(CrashAt { phase: phase.to_string(), nth: nth.parse().ok()?, seen: AtomicU64::new(0) })
    });
    if let Some(crash) = crash
        && crash.phase == phase
        && crash.seen.fetch_add(1, Ordering::Relaxed) + 1 == crash.nth
    {
        eprintln!("{VARIABLE}: crashing at {phase} #{}", crash.nth);
        std::process::abort();
    }
}
