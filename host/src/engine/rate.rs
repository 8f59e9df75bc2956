//! Rate control: how many records a batch may take from each partition.
//!
//! Two mechanisms, as in Spark's direct Kafka stream: a fixed cap per partition
//! (`--max-rate-per-partition`), and backpressure, where a PID controller (a port of Spark's
//! `PIDRateEstimator`) estimates from each finished batch the rate the job keeps up with. The
//! estimate is split across partitions in proportion to their lag, then capped.

use std::time::Duration;

use anyhow::{Result, bail};

use super::BatchReport;
use crate::config::RateLimits;

/// Spark's `PIDRateEstimator`: a rate, in records per second for the whole job, that makes
/// processing time fit the batch interval and works off scheduling delay.
#[derive(Debug, Clone)]
pub struct PidRateEstimator {
    batch_interval_ms: f64,
    proportional: f64,
    integral: f64,
    derivative: f64,
    min_rate: f64,
    first_run: bool,
    latest_time: i64,
    latest_rate: f64,
    latest_error: f64,
}

impl PidRateEstimator {
    /// An estimator with Spark's default gains (proportional 1.0, integral 0.2, derivative 0).
    pub fn new(batch_interval: Duration, min_rate: f64) -> Result<PidRateEstimator> {
        if batch_interval.is_zero() {
            bail!("the batch interval must be longer than zero");
        }
        if !(min_rate.is_finite() && min_rate > 0.0) {
            bail!("the minimum rate must be positive, not {min_rate}");
        }
        Ok(PidRateEstimator {
            batch_interval_ms: batch_interval.as_secs_f64() * 1000.0,
            proportional: 1.0,
            integral: 0.2,
            derivative: 0.0,
            min_rate,
            first_run: true,
            latest_time: -1,
            latest_rate: -1.0,
            latest_error: -1.0,
        })
    }

    /// Feeds one finished batch; returns the new rate, or `None` until there is one (the first
    /// batch only measures) and for batches that say nothing about speed (no records).
    pub fn compute(
        &mut self,
        time_ms: i64,
        elements: u64,
        processing_ms: i64,
        scheduling_delay_ms: i64,
    ) -> Option<f64> {
        if !(time_ms > self.latest_time && elements > 0 && processing_ms > 0) {
            return None;
        }
        let delay_since_update = (time_ms - self.latest_time) as f64 / 1000.0;
        let processing_rate = elements as f64 / processing_ms as f64 * 1000.0;
        // The error: how far the rate we asked for is above what was processed.
        let error = self.latest_rate - processing_rate;
        // The accumulated error: records waiting because earlier batches ran late.
        let historical_error = scheduling_delay_ms as f64 * processing_rate / self.batch_interval_ms;
        let d_error = (error - self.latest_error) / delay_since_update;
        let new_rate = (self.latest_rate
            - self.proportional * error
            - self.integral * historical_error
            - self.derivative * d_error)
            .max(self.min_rate);
        self.latest_time = time_ms;
        if self.first_run {
            self.latest_rate = processing_rate;
            self.latest_error = 0.0;
            self.first_run = false;
            None
        } else {
            self.latest_rate = new_rate;
            self.latest_error = error;
            Some(new_rate)
        }
    }
}

/// Each partition's record cap for one batch, as Spark's `maxMessagesPerPartition`: a total
/// `rate` split in proportion to `lags`, each share capped at `max_rate_per_partition`, times
/// the interval; at least one record per partition so every partition progresses. `None`
/// when nothing limits the batch.
pub fn records_per_partition(
    lags: &[i64],
    rate: Option<f64>,
    max_rate_per_partition: Option<f64>,
    interval: Duration,
) -> Option<Vec<i64>> {
    let total_lag: i64 = lags.iter().map(|lag| lag.max(&0)).sum();
    let rates: Vec<f64> = match (rate, max_rate_per_partition) {
        (None, None) => return None,
        (None, Some(max)) => vec![max; lags.len()],
        (Some(rate), max) => lags
            .iter()
            .map(|&lag| {
                let share = if total_lag > 0 { lag.max(0) as f64 / total_lag as f64 * rate } else { 0.0 };
                max.map_or(share, |max| share.min(max))
            })
            .collect(),
    };
    let seconds = interval.as_secs_f64();
    Some(rates.into_iter().map(|rate| ((rate * seconds) as i64).max(1)).collect())
}

/// The job's rate limits over time: the configured caps plus, with backpressure, the latest
/// estimate.
pub struct RateController {
    limits: RateLimits,
    interval: Duration,
    estimator: Option<PidRateEstimator>,
    estimate: Option<f64>,
    batches: u64,
}

impl RateController {
    pub fn new(limits: RateLimits, interval: Duration) -> Result<RateController> {
        let estimator = limits.backpressure.map(|min_rate| PidRateEstimator::new(interval, min_rate)).transpose()?;
        Ok(RateController { limits, interval, estimator, estimate: None, batches: 0 })
    }

    /// The rate for the whole job the next batch is planned with: the backpressure estimate
    /// once there is one, before that `--initial-rate` (without backpressure, for the first
    /// batch only).
    pub fn current_rate(&self) -> Option<f64> {
        match (self.estimator.is_some(), self.estimate) {
            (true, Some(estimate)) => Some(estimate),
            (true, None) => self.limits.initial_rate,
            (false, _) if self.batches == 0 => self.limits.initial_rate,
            (false, _) => None,
        }
    }

    /// Each partition's cap for the next batch, given the partitions' lags.
    pub fn caps(&self, lags: &[i64]) -> Option<Vec<i64>> {
        records_per_partition(lags, self.current_rate(), self.limits.max_rate_per_partition, self.interval)
    }

    /// Feeds a finished batch to the estimator.
    pub fn batch_completed(&mut self, now_ms: i64, report: &BatchReport) {
        self.batches += 1;
        if let Some(estimator) = &mut self.estimator {
            let processing = report.processing().as_millis() as i64;
            let scheduling = report.scheduling_delay.as_millis() as i64;
            if let Some(rate) = estimator.compute(now_ms, report.records_in as u64, processing, scheduling) {
                self.estimate = Some(rate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::BatchPhases;

    const TWO_SECONDS: Duration = Duration::from_secs(2);

    #[test]
    fn the_seeds_cap_is_rate_times_interval_per_partition() {
        // Seed 003: 2 s × 3 partitions × 100 records/s = 600 records a batch.
        let caps = records_per_partition(&[5_000, 5_000, 5_000], None, Some(100.0), TWO_SECONDS).unwrap();
        assert_eq!(caps, [200, 200, 200]);
    }

    #[test]
    fn nothing_limits_without_a_rate_or_a_cap() {
        assert_eq!(records_per_partition(&[10, 20], None, None, TWO_SECONDS), None);
    }

    #[test]
    fn an_estimate_is_split_by_lag_and_capped() {
        let caps = records_per_partition(&[100, 300, 0], Some(400.0), None, TWO_SECONDS).unwrap();
        assert_eq!(caps, [200, 600, 1]);
        let capped = records_per_partition(&[100, 300, 0], Some(400.0), Some(150.0), TWO_SECONDS).unwrap();
        assert_eq!(capped, [200, 300, 1]);
    }

    #[test]
    fn every_partition_may_take_at_least_one_record() {
        let caps = records_per_partition(&[1, 1_000_000], Some(10.0), None, Duration::from_millis(100)).unwrap();
        assert_eq!(caps, [1, 1]);
    }

    #[test]
    fn the_first_batch_only_measures() {
        let mut pid = PidRateEstimator::new(TWO_SECONDS, 100.0).unwrap();
        assert_eq!(pid.compute(1_000, 1_000, 500, 0), None);
        assert!(pid.compute(3_000, 1_000, 500, 0).is_some());
        // Batches with nothing processed say nothing about speed.
        assert_eq!(pid.compute(5_000, 0, 0, 0), None);
    }

    /// A job that processes `capacity` records/s with an endless backlog.
    fn simulate(capacity: f64, scheduling_delay_ms: i64, batches: usize) -> Vec<f64> {
        let mut pid = PidRateEstimator::new(TWO_SECONDS, 100.0).unwrap();
        let mut rate = 20_000.0; // a cold start far above capacity
        let mut rates = Vec::new();
        for batch in 1..=batches {
            let elements = (rate * 2.0) as u64;
            let processing_ms = (elements as f64 / capacity * 1000.0) as i64;
            if let Some(new_rate) = pid.compute(batch as i64 * 2_000, elements, processing_ms, scheduling_delay_ms) {
                rate = new_rate;
                rates.push(rate);
            }
        }
        rates
    }

    #[test]
    fn the_estimate_settles_at_what_the_job_keeps_up_with() {
        let rates = simulate(1_000.0, 0, 20);
        let last = *rates.last().unwrap();
        assert!((900.0..=1_100.0).contains(&last), "settled at {last}: {rates:?}");
        assert!(rates.iter().all(|rate| *rate >= 100.0));
    }

    #[test]
    fn scheduling_delay_pushes_the_rate_lower() {
        let on_time = simulate(1_000.0, 0, 3)[1];
        let late = simulate(1_000.0, 1_000, 3)[1];
        assert!(late < on_time, "{late} should be below {on_time}");
    }

    #[test]
    fn initial_rate_applies_until_there_is_an_estimate() {
        let limits = RateLimits { max_rate_per_partition: None, initial_rate: Some(50.0), backpressure: None };
        let mut controller = RateController::new(limits, TWO_SECONDS).unwrap();
        assert_eq!(controller.caps(&[1_000]).unwrap(), [100]);
        let report = BatchReport {
            batch_time: 2_000,
            ranges: vec![],
            records_in: 100,
            outputs: 100,
            rejected: 0,
            dead_letters: 0,
            skipped: 0,
            scheduling_delay: Duration::ZERO,
            phases: BatchPhases { plugin: Duration::from_millis(50), ..BatchPhases::default() },
            caught_up: false,
            rate: Some(50.0),
            replayed: false,
            ending: crate::engine::Ending::Committed,
            build: String::new(),
            by_topic: Default::default(),
            outputs_by_topic: Default::default(),
        };
        controller.batch_completed(2_100, &report);
        assert_eq!(controller.caps(&[1_000]), None, "without backpressure only the first batch is limited");
    }
}
