//! Batch times: multiples of the batch interval, as in Spark, so a batch's identity does not
//! depend on when the process happened to start.

/// The first batch time at or after `now`.
pub fn first_batch_time(now_ms: i64, interval_ms: i64) -> i64 {
    (now_ms + interval_ms - 1).div_euclid(interval_ms) * interval_ms
}

/// The batch after `previous`. Normally one interval later; if that time has already passed
/// (the previous batch ran long), the latest tick not after `now`, so the next batch starts at
/// once but missed ticks are skipped rather than queued up.
pub fn next_batch_time(previous_ms: i64, now_ms: i64, interval_ms: i64) -> i64 {
    let due = previous_ms + interval_ms;
    if due >= now_ms { due } else { now_ms.div_euclid(interval_ms) * interval_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_times_are_multiples_of_the_interval() {
        assert_eq!(first_batch_time(10_001, 2_000), 12_000);
        assert_eq!(first_batch_time(12_000, 2_000), 12_000);
        assert_eq!(next_batch_time(12_000, 12_500, 2_000), 14_000);
    }

    #[test]
    fn a_late_batch_starts_the_next_at_once_without_a_backlog() {
        // The batch of 12 000 finished at 19 300: three ticks were missed; the next batch is
        // the tick of 18 000, due immediately, not 14 000, 16 000 and 18 000 in turn.
        assert_eq!(next_batch_time(12_000, 19_300, 2_000), 18_000);
    }
}
