//! Top 3 brands per category by running sales: the seeds' Spark SQL `row_number()` example
//! (seed 003, 7.2) as a stateful plugin.
//!
//! Input lines are `id brand category`. Each category's state is its sales count per brand;
//! every batch emits, for each category it touched, `category:brand=count,...` with the top
//! three brands (most sales first, ties by brand name), keyed by the category.

use std::collections::BTreeMap;

use sluice_sdk::{BatchContext, Emit, Json, Output, Outputs, PluginError, Record, Reject, Stateful};

/// How many brands a category's ranking shows.
const TOP: usize = 3;

/// The top-3 plugin. No configuration.
pub struct Top3;

impl Stateful for Top3 {
    type Config = ();
    type Key = String;
    type Value = String;
    type State = Json<BTreeMap<String, u64>>;

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(Top3)
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, String>) -> Result<(), Reject> {
        let fields: Vec<&str> = record.value_str()?.split_whitespace().collect();
        let [_id, brand, category] = fields[..] else {
            return Err(Reject::new(format!("expected 3 fields `id brand category`, found {}", fields.len())));
        };
        out.emit(category.to_string(), brand.to_string());
        Ok(())
    }

    fn update(
        &mut self,
        category: &String,
        brands: Vec<String>,
        sales: Option<Self::State>,
        out: &mut Outputs,
    ) -> Option<Self::State> {
        let Json(mut sales) = sales.unwrap_or_default();
        for brand in brands {
            *sales.entry(brand).or_insert(0) += 1;
        }
        let mut ranking: Vec<(&String, &u64)> = sales.iter().collect();
        ranking.sort_by(|(a_brand, a_sales), (b_brand, b_sales)| b_sales.cmp(a_sales).then(a_brand.cmp(b_brand)));
        let top: Vec<String> = ranking.iter().take(TOP).map(|(brand, count)| format!("{brand}={count}")).collect();
        out.push(Output::new(format!("{category}:{}", top.join(","))).with_key(category.as_str()));
        Some(Json(sales))
    }
}

sluice_sdk::export_stateful!(Top3);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_sdk::testing::{record, run_stateful};

    use super::*;

    fn values(outputs: &[Output]) -> Vec<String> {
        outputs.iter().map(|o| String::from_utf8(o.value.clone().unwrap()).unwrap()).collect()
    }

    #[test]
    fn ranks_brands_per_category_across_batches() {
        let mut state = BTreeMap::new();
        let lines =
            ["1 apple phone", "2 huawei phone", "3 apple phone", "4 xiaomi phone", "5 oppo phone", "6 lenovo pc"];
        let first =
            run_stateful(&mut Top3, &mut state, lines.iter().enumerate().map(|(i, l)| record(i as i64, *l)).collect());
        assert_eq!(values(&first.unwrap()), ["phone:apple=2,huawei=1,oppo=1", "pc:lenovo=1"]);
        let second =
            run_stateful(&mut Top3, &mut state, vec![record(6, "7 xiaomi phone"), record(7, "8 xiaomi phone")]);
        assert_eq!(values(&second.unwrap()), ["phone:xiaomi=3,apple=2,huawei=1"]);
        assert_eq!(state["phone"].0.values().sum::<u64>(), 7, "every sale is kept, not just the top 3");
    }

    #[test]
    fn malformed_lines_are_rejected_with_a_reason() {
        let output = sluice_sdk::testing::run_stateful(&mut Top3, &mut BTreeMap::new(), vec![record(0, "1 apple")]);
        assert!(output.unwrap().is_empty());
        let mut emit = Emit::<String, String>::default();
        let reject = Top3.process(&sluice_sdk::testing::context("t", 0), record(0, "1 apple"), &mut emit).unwrap_err();
        assert_eq!(reject.reason(), "expected 3 fields `id brand category`, found 2");
    }
}
