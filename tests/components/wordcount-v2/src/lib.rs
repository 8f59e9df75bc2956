//! Test fixture: version 2 of `plugins/wordcount`, for upgrades. Same plugin name, new state
//! encoding — a JSON object instead of v1's decimal text — so state schema 2, with a migration
//! from v1; outputs are marked `(word,total,v2)` so tests can tell the versions apart. v2 has a
//! bug v1 has not: the word `v2-crash` makes it panic (for rollback tests).

use serde::{Deserialize, Serialize};
use sluice_sdk::{BatchContext, Codec, Emit, Json, Output, Outputs, PluginError, Record, Reject, Stateful};

pub struct WordCountV2;

/// A word's state in v2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub count: u64,
}

impl Stateful for WordCountV2 {
    type Config = ();
    type Key = String;
    type Value = u64;
    type State = Json<Tally>;

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(WordCountV2)
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, u64>) -> Result<(), Reject> {
        for word in record.value_str()?.split_whitespace() {
            assert_ne!(word, "v2-crash", "wordcount v2 cannot count this word");
            out.emit(word.to_string(), 1);
        }
        Ok(())
    }

    fn update(
        &mut self,
        word: &String,
        ones: Vec<u64>,
        tally: Option<Json<Tally>>,
        out: &mut Outputs,
    ) -> Option<Json<Tally>> {
        let count = ones.iter().sum::<u64>() + tally.map_or(0, |Json(tally)| tally.count);
        out.push(Output::new(format!("({word},{count},v2)")).with_key(word.as_str()));
        Some(Json(Tally { count }))
    }

    /// v1 kept each count as decimal text.
    fn migrate(from_version: u32, bytes: &[u8]) -> Result<Json<Tally>, String> {
        match from_version {
            1 => u64::decode(bytes).map(|count| Json(Tally { count })),
            other => Err(format!("unknown state schema version {other}")),
        }
    }
}

sluice_sdk::export_stateful!(WordCountV2, name = "wordcount", state_schema_version = 2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_v1_counts() {
        assert_eq!(WordCountV2::migrate(1, b"41").unwrap(), Json(Tally { count: 41 }));
        assert!(WordCountV2::migrate(1, b"x").is_err());
        assert!(WordCountV2::migrate(7, b"1").unwrap_err().contains("unknown state schema version 7"));
    }
}
