//! Test fixture: version 2 of `plugins/etl`, for upgrade tests. The same ETL, reported under
//! the same plugin name, with each output marked by an `etl-version: 2` header so a test can
//! tell which version produced it (v1's outputs carry no such header).

use sluice_sdk::{BatchContext, Outputs, PluginError, Record, Reject, Transform};

/// Version 1, compiled from its own source (a dependency on the `etl` crate would link its
/// component exports in as well).
#[path = "../../../../plugins/etl/src/lib.rs"]
mod etl;

pub struct EtlV2(etl::Etl);

impl Transform for EtlV2 {
    type Config = etl::Config;

    fn init(config: etl::Config) -> Result<Self, PluginError> {
        etl::Etl::init(config).map(EtlV2)
    }

    fn process(&mut self, ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        let mut v1 = Outputs::default();
        self.0.process(ctx, record, &mut v1)?;
        for output in v1.into_vec() {
            out.push(output.with_header("etl-version", "2"));
        }
        Ok(())
    }
}

sluice_sdk::export_transform!(EtlV2, name = "etl");
