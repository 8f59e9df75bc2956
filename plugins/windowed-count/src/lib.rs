//! Word counts over a sliding window: the seeds' `reduceByKeyAndWindow(_ + _, _ - _, ...)`
//! example (seed 003, 6), run with `--window 3s --slide 2s` over 1 s batches.
//!
//! Emits `(word,count)` for every word seen inside the window, keyed by the word, at each slide.

use sluice_sdk::{BatchContext, Emit, Output, PluginError, Record, Reject, Window, Windowed};

/// The windowed word count. No configuration.
pub struct WindowedCount;

impl Windowed for WindowedCount {
    type Config = ();
    type Key = String;
    type Value = u64;
    const INVERTIBLE: bool = true;

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(WindowedCount)
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, u64>) -> Result<(), Reject> {
        for word in record.value_str()?.split_whitespace() {
            out.emit(word.to_string(), 1);
        }
        Ok(())
    }

    fn reduce(&mut self, a: u64, b: u64) -> u64 {
        a + b
    }

    fn inverse_reduce(&mut self, total: u64, part: u64) -> u64 {
        total - part
    }

    fn present(&mut self, word: &String, count: u64, window: Window) -> Output {
        Output::new(format!("({word},{count})"))
            .with_key(word.as_str())
            .with_header("window-end", window.end.to_string())
    }
}

sluice_sdk::export_windowed!(WindowedCount);

#[cfg(test)]
mod tests {
    use sluice_sdk::testing::{record, run_window};

    use super::*;

    #[test]
    fn counts_words_in_a_window() {
        let window = run_window(&mut WindowedCount, vec![record(0, "a b a"), record(1, "b c")]).unwrap();
        assert_eq!(window, [("a", 2), ("b", 2), ("c", 1)].map(|(w, n)| (w.to_string(), n)).into());
        assert_eq!(WindowedCount.inverse_reduce(5, 2), 3);
    }
}
