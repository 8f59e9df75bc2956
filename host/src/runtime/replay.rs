//! Time and chance as a plugin sees them, so that a replayed batch produces what its first run
//! did: by default the WASI wall clock reads the batch time, the monotonic clock stands still
//! at it, and random bytes come from a generator seeded with (job, batch time, partition).
//! `--allow-wall-clock` and `--allow-random` give a plugin the real ones instead.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};

/// What plugins may read of time and chance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Determinism {
    /// Identifies the job in every seed (derived from the consumer group).
    pub job_seed: u64,
    /// The real wall and monotonic clocks instead of the batch time.
    pub wall_clock: bool,
    /// The operating system's randomness instead of the seeded generator.
    pub os_random: bool,
}

impl Determinism {
    /// A job's seed from its name: the first eight bytes of its SHA-256.
    pub fn seed_of(job: &str) -> u64 {
        let digest = Sha256::digest(job.as_bytes());
        u64::from_le_bytes(digest[..8].try_into().expect("eight bytes"))
    }

    /// Installs the clocks and generators of one instance into its WASI context; `moment`
    /// is what the host sets before each call.
    pub fn install(&self, builder: &mut WasiCtxBuilder, moment: &Moment) {
        if !self.wall_clock {
            builder.wall_clock(BatchClock(moment.clone())).monotonic_clock(StillClock(moment.clone()));
        }
        if !self.os_random {
            builder
                .secure_random(SeededRandom(moment.clone()))
                .insecure_random(SeededRandom(moment.clone()))
                // Read once per instance (hash maps seed themselves from it): one per job.
                .insecure_random_seed(u128::from(self.job_seed));
        }
    }
}

/// The call in progress: its batch time, and the random stream seeded for it.
#[derive(Debug, Clone, Default)]
pub struct Moment(Arc<Mutex<MomentState>>);

#[derive(Debug, Default)]
struct MomentState {
    batch_time_ms: i64,
    /// SHA-256 of (job, batch time, partition): the key of this call's random stream.
    key: [u8; 32],
    /// Blocks of the stream handed out so far, and the unread rest of the last one.
    counter: u64,
    buffered: Vec<u8>,
}

impl Moment {
    /// A call for `partition` (or `-1`: no partition, e.g. `init` or `reduce`) of the batch at
    /// `batch_time_ms` starts: the clock reads that time, the random stream starts afresh.
    pub fn set(&self, job_seed: u64, batch_time_ms: i64, partition: i32) {
        let mut hasher = Sha256::new();
        hasher.update(b"sluice replay seed v1");
        hasher.update(job_seed.to_le_bytes());
        hasher.update(batch_time_ms.to_le_bytes());
        hasher.update(partition.to_le_bytes());
        let mut state = self.0.lock().expect("not poisoned");
        *state = MomentState { batch_time_ms, key: hasher.finalize().into(), counter: 0, buffered: Vec::new() };
    }

    fn batch_time(&self) -> Duration {
        Duration::from_millis(self.0.lock().expect("not poisoned").batch_time_ms.max(0) as u64)
    }

    /// The next bytes of the call's stream: SHA-256(key, block counter), block after block.
    fn fill(&self, out: &mut [u8]) {
        let mut state = self.0.lock().expect("not poisoned");
        let mut written = 0;
        while written < out.len() {
            if state.buffered.is_empty() {
                let block = Sha256::new().chain_update(state.key).chain_update(state.counter.to_le_bytes()).finalize();
                state.counter += 1;
                state.buffered = block.to_vec();
            }
            let take = state.buffered.len().min(out.len() - written);
            out[written..written + take].copy_from_slice(&state.buffered[..take]);
            state.buffered.drain(..take);
            written += take;
        }
    }
}

/// The wall clock at the batch time.
struct BatchClock(Moment);

impl HostWallClock for BatchClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        self.0.batch_time()
    }
}

/// A monotonic clock standing still at the batch time: no time passes within a call.
struct StillClock(Moment);

impl HostMonotonicClock for StillClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        self.0.batch_time().as_nanos() as u64
    }
}

/// Random bytes from the call's seeded stream.
struct SeededRandom(Moment);

impl rand_core::TryRng for SeededRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0; 4];
        self.0.fill(&mut bytes);
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0; 8];
        self.0.fill(&mut bytes);
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::Rng as _;

    #[test]
    fn the_stream_depends_on_job_batch_and_partition_only() {
        let stream = |job, time, partition| {
            let moment = Moment::default();
            moment.set(job, time, partition);
            let mut random = SeededRandom(moment);
            (random.next_u64(), random.next_u64())
        };
        assert_eq!(stream(1, 1000, 0), stream(1, 1000, 0));
        let first = stream(1, 1000, 0);
        assert_ne!(first.0, first.1, "the stream moves on");
        for other in [stream(2, 1000, 0), stream(1, 1100, 0), stream(1, 1000, 1)] {
            assert_ne!(first, other);
        }
    }

    #[test]
    fn a_new_call_starts_the_stream_afresh_and_the_clock_reads_its_batch_time() {
        let moment = Moment::default();
        moment.set(7, 5000, 2);
        let mut random = SeededRandom(moment.clone());
        let first = random.next_u64();
        random.next_u64();
        moment.set(7, 5000, 2);
        assert_eq!(random.next_u64(), first);
        assert_eq!(BatchClock(moment.clone()).now(), Duration::from_secs(5));
        assert_eq!(StillClock(moment).now(), 5_000_000_000);
    }
}
