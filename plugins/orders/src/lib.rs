//! Orders into a database table: the seeds' `name,orderid` records (seed 003, 4.3.1), one row
//! per record, for the PostgreSQL sink (`host run --postgres URL --postgres-table orders`).
//!
//! Each output's value is the row as a JSON object, `{"name": ..., "orderid": ...}`; a record
//! that is not `name,orderid` with an integer id is rejected with the reason.

use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};

/// The orders plugin. No configuration.
pub struct Orders;

impl Transform for Orders {
    type Config = ();

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(Orders)
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        let line = record.value_str()?;
        let Some((name, orderid)) = line.split_once(',') else {
            return Err(Reject::new(format!("expected `name,orderid`, got {line:?}")));
        };
        let orderid: i64 = orderid.trim().parse().map_err(|e| Reject::new(format!("orderid {orderid:?}: {e}")))?;
        let row = serde_json::json!({ "name": name.trim(), "orderid": orderid });
        out.push(Output::new(row.to_string()).with_key(orderid.to_string()));
        Ok(())
    }
}

sluice_sdk::export_transform!(Orders);

#[cfg(test)]
mod tests {
    use sluice_sdk::testing::{context, record, run};

    use super::*;

    #[test]
    fn records_become_rows_and_bad_ones_are_rejected() {
        let records = vec![record(0, "alice,1"), record(1, "bob"), record(2, "carol,x")];
        let output = run(&mut Orders, &context("orders", 0), records).unwrap();
        assert_eq!(output.values_utf8(), [r#"{"name":"alice","orderid":1}"#]);
        let reasons: Vec<&str> = output.rejections.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons, ["expected `name,orderid`, got \"bob\"", "orderid \"x\": invalid digit found in string"]);
    }
}
