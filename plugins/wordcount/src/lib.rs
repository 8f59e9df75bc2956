//! Running word counts across batches: the seeds' `updateStateByKey` example (seed 003, 5.3).
//!
//! Each line is split on whitespace; each word's count is kept as state, and every batch
//! emits `(word,total)` for the words it saw, keyed by the word.

use sluice_sdk::{BatchContext, Emit, Output, Outputs, PluginError, Record, Reject, Stateful};

/// The word count plugin. No configuration.
pub struct WordCount;

impl Stateful for WordCount {
    type Config = ();
    type Key = String;
    type Value = u64;
    type State = u64;

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(WordCount)
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, u64>) -> Result<(), Reject> {
        for word in record.value_str()?.split_whitespace() {
            out.emit(word.to_string(), 1);
        }
        Ok(())
    }

    fn update(&mut self, word: &String, ones: Vec<u64>, total: Option<u64>, out: &mut Outputs) -> Option<u64> {
        let total = ones.iter().sum::<u64>() + total.unwrap_or(0);
        out.push(Output::new(format!("({word},{total})")).with_key(word.as_str()));
        Some(total)
    }
}

sluice_sdk::export_stateful!(WordCount);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_sdk::testing::{record, run_stateful};

    use super::*;

    #[test]
    fn counts_accumulate_across_batches() {
        let mut state = BTreeMap::new();
        let first = run_stateful(&mut WordCount, &mut state, vec![record(0, "to be or not to be")]).unwrap();
        assert_eq!(first.len(), 4, "one output per distinct word");
        let second = run_stateful(&mut WordCount, &mut state, vec![record(1, "be quick")]).unwrap();
        let values: Vec<&[u8]> = second.iter().filter_map(|o| o.value.as_deref()).collect();
        assert_eq!(values, [b"(be,3)".as_slice(), b"(quick,1)"]);
        assert_eq!(
            state,
            [("be", 3), ("not", 1), ("or", 1), ("quick", 1), ("to", 2)].map(|(w, n)| (w.to_string(), n)).into()
        );
    }
}
