//! Test fixture: passes every record through unchanged (key, value, headers) after deliberate
//! busy work, so tests can make a plugin slow on purpose (backpressure, stopping with a batch
//! in flight) and can check that records cross the host unaltered.
//!
//! Configuration: `work-per-record` — iterations of busy work per record (default 0). A record
//! header `busy-work: N` overrides it for that record; a header `fail` rejects the record.

use serde::Deserialize;
use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub work_per_record: u64,
}

pub struct Busy {
    work_per_record: u64,
}

/// `iterations` rounds of xorshift from `seed`: cheap, and impossible to optimise away.
pub fn busy_work(iterations: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

impl Transform for Busy {
    type Config = Config;

    fn init(config: Config) -> Result<Self, PluginError> {
        Ok(Busy { work_per_record: config.work_per_record })
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        if record.headers.iter().any(|header| header.key == "fail") {
            return Err(Reject::new("asked to fail by header"));
        }
        let work = match record.header("busy-work") {
            Some(value) => std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| Reject::new("header busy-work is not a number"))?,
            None => self.work_per_record,
        };
        busy_work(work, record.offset as u64);
        let output = Output { topic: None, key: record.key, value: record.value, headers: record.headers };
        out.push(output);
        Ok(())
    }
}

sluice_sdk::export_transform!(Busy);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::{Header, testing};

    #[test]
    fn passes_records_through_and_honours_the_headers() {
        let mut busy: Busy = testing::init(&[("work-per-record", "10")]).unwrap();
        let mut slow = testing::record(1, "b");
        slow.headers.push(Header { key: "busy-work".into(), value: Some(b"1000".to_vec()) });
        let mut failing = testing::record(2, "c");
        failing.headers.push(Header { key: "fail".into(), value: None });
        let out =
            testing::run(&mut busy, &testing::context("t", 0), vec![testing::record(0, "a"), slow, failing]).unwrap();
        assert_eq!(out.values_utf8(), ["a", "b"]);
        assert_eq!(out.rejections[0].offset, 2);
    }

    #[test]
    fn busy_work_is_deterministic() {
        assert_eq!(busy_work(0, 8), 9);
        assert_eq!(busy_work(1000, 8), busy_work(1000, 8));
        assert_ne!(busy_work(1000, 8), busy_work(1001, 8));
    }
}
