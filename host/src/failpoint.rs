//! Crash points for recovery tests: `SLUICE_CRASH_AT=PHASE:N` aborts the process the N-th time
//! it reaches PHASE, as abruptly as `kill -9` (no destructors, no flush, no commit);
//! `SLUICE_CRASH_AT=PHASE:N:panic` panics there instead, to check that a bug on the batch path
//! ends the job with an error naming where, never silently.
//!
//! Phases, in batch order: `fetch` (records read and the plan recorded, nothing processed),
//! `record` (about to hand one partition's records to the plugin), `plugin` (plugin calls
//! done), `deliver` (outputs acknowledged by the sinks), `database` (rows written), `commit`
//! (group offsets committed, checkpoint not yet) and `checkpoint` (inside the checkpoint
//! transaction, before it commits). Without the variable every crash point is a single
//! relaxed load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the crash point.
pub const VARIABLE: &str = "SLUICE_CRASH_AT";

struct CrashAt {
    phase: String,
    nth: u64,
    panic: bool,
    seen: AtomicU64,
}

static CRASH_AT: OnceLock<Option<CrashAt>> = OnceLock::new();

/// Marks that the process reached `phase`; aborts it (or panics) if this is the configured crash.
pub fn reached(phase: &str) {
    let crash = CRASH_AT.get_or_init(|| {
        let value = std::env::var(VARIABLE).ok()?;
        let mut parts = value.split(':');
        let (phase, nth) = (parts.next()?, parts.next()?.parse().ok()?);
        let panic = parts.next() == Some("panic");
        Some(CrashAt { phase: phase.to_string(), nth, panic, seen: AtomicU64::new(0) })
    });
    if let Some(crash) = crash
        && crash.phase == phase
        && crash.seen.fetch_add(1, Ordering::Relaxed) + 1 == crash.nth
    {
        if crash.panic {
            panic!("{VARIABLE}: panicking at {phase} #{}", crash.nth);
        }
        eprintln!("{VARIABLE}: crashing at {phase} #{}", crash.nth);
        std::process::abort();
    }
}
