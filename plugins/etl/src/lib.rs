//! The seeds' online ETL (seed 003, section 4.3.3) as a Sluice plugin.
//!
//! Input lines have 15 comma-separated fields, each wrapped in `<<<!>>>`:
//! record id, user id, operation time (`yyyyMMddHHmmss`), client IP, server IP, client port,
//! server port, server domain, five empty fields, URL, and a trailing number. Each valid line
//! becomes `userid|timestamp|clientIp:clientPort|serverIp:serverPort|url`, the timestamp being
//! the operation time as epoch milliseconds in the configured time zone.
//!
//! The seeds drop malformed lines silently; this plugin rejects each one with its reason
//! (wrong field count, unparsable time), so the host can report or dead-letter it.
//!
//! Configuration: `timezone` — an IANA zone (`Asia/Shanghai`) or a fixed offset (`+08:00`);
//! default `UTC`.

use std::borrow::Cow;

use chrono::{FixedOffset, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
use serde::Deserialize;
use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};

/// The field marker the seeds' producer wraps around every field.
const MARK: &str = "<<<!>>>";
/// Fields in a well-formed line.
const FIELD_COUNT: usize = 15;

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Time zone the operation times are written in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    "UTC".into()
}

/// The ETL transform.
pub struct Etl {
    zone: Zone,
}

/// A time zone: a named IANA zone (with its daylight-saving rules) or a fixed offset.
enum Zone {
    Named(chrono_tz::Tz),
    Fixed(FixedOffset),
}

impl Zone {
    fn parse(text: &str) -> Result<Zone, PluginError> {
        if let Ok(tz) = text.parse::<chrono_tz::Tz>() {
            return Ok(Zone::Named(tz));
        }
        text.parse::<FixedOffset>().map(Zone::Fixed).map_err(|_| {
            PluginError::invalid_config(format!(
                "config key `timezone`: {text:?} is neither an IANA time zone (e.g. Asia/Shanghai) nor an offset (e.g. +08:00)"
            ))
        })
    }

    /// Epoch milliseconds of a wall-clock time in this zone. A time that falls twice (end of
    /// daylight saving) takes the earlier instant; one that never happens is an error.
    fn epoch_millis(&self, local: &NaiveDateTime) -> Option<i64> {
        fn earliest<T: TimeZone>(result: LocalResult<chrono::DateTime<T>>) -> Option<i64> {
            result.earliest().map(|t| t.timestamp_millis())
        }
        match self {
            Zone::Named(tz) => earliest(tz.from_local_datetime(local)),
            Zone::Fixed(offset) => earliest(offset.from_local_datetime(local)),
        }
    }
}

/// Parses `yyyyMMddHHmmss` strictly: 14 digits naming a real calendar time.
fn parse_operation_time(text: &str) -> Option<NaiveDateTime> {
    if text.len() != 14 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text[range].parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(number(0..4)? as i32, number(4..6)?, number(6..8)?)?;
    date.and_hms_opt(number(8..10)?, number(10..12)?, number(12..14)?)
}

impl Transform for Etl {
    type Config = Config;

    fn init(config: Config) -> Result<Self, PluginError> {
        Ok(Etl { zone: Zone::parse(&config.timezone)? })
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        let line = record.value_str()?;
        // Fields are borrowed from the record, never copied: one allocation per record, for
        // the output (benchmarks: docs/BENCHMARKS.md).
        let mut fields = [""; FIELD_COUNT];
        let mut found = 0;
        for field in line.split(',') {
            if let Some(slot) = fields.get_mut(found) {
                *slot = field;
            }
            found += 1;
        }
        if found != FIELD_COUNT {
            return Err(Reject::new(format!("expected {FIELD_COUNT} comma-separated fields, found {found}")));
        }
        let field = |i: usize| unmark(fields[i].trim());

        let time = field(2);
        let timestamp = parse_operation_time(&time)
            .and_then(|local| self.zone.epoch_millis(&local))
            .ok_or_else(|| Reject::new(format!("unparsable operation time {time:?} (expected yyyyMMddHHmmss)")))?;
        let (user, client_ip, server_ip, client_port, server_port, url) =
            (field(1), field(3), field(4), field(5), field(6), field(13));

        let value = format!("{user}|{timestamp}|{client_ip}:{client_port}|{server_ip}:{server_port}|{url}");
        let output = Output::new(value);
        out.push(match record.key {
            Some(key) => output.with_key(key),
            None => output,
        });
        Ok(())
    }
}

/// A field without the markers. They normally wrap the field; the seeds remove them wherever
/// they are, which needs a copy only in the rare field that has one inside.
fn unmark(field: &str) -> Cow<'_, str> {
    let inner = field.strip_prefix(MARK).unwrap_or(field);
    let inner = inner.strip_suffix(MARK).unwrap_or(inner);
    if inner.contains('<') && inner.contains(MARK) { Cow::Owned(field.replace(MARK, "")) } else { Cow::Borrowed(inner) }
}

#[cfg(feature = "component")]
sluice_sdk::export_transform!(Etl);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing;

    /// The sample line of the seeds.
    const SAMPLE: &str = "<<<!>>>3111<<<!>>>,<<<!>>>238<<<!>>>,<<<!>>>20181111132902<<<!>>>,<<<!>>>58.223.1.112<<<!>>>,<<<!>>>202.102.92.18<<<!>>>,<<<!>>>59947<<<!>>>,<<<!>>>80<<<!>>>,<<<!>>>www.sumecjob.com<<<!>>>,<<<!>>><<<!>>>,<<<!>>><<<!>>>,<<<!>>><<<!>>>,<<<!>>><<<!>>>,<<<!>>><<<!>>>,<<<!>>>http://www.sumecjob.com/Social.aspx<<<!>>>,<<<!>>>2556928066<<<!>>>";

    fn run(config: &[(&str, &str)], lines: &[&str]) -> sluice_sdk::BatchOutput {
        let mut etl: Etl = testing::init(config).unwrap();
        let records = lines.iter().enumerate().map(|(i, line)| testing::record(i as i64, *line)).collect();
        testing::run(&mut etl, &testing::context("source", 0), records).unwrap()
    }

    #[test]
    fn transforms_the_seed_sample_in_utc() {
        let out = run(&[], &[SAMPLE]);
        // 2018-11-11 13:29:02 UTC
        assert_eq!(
            out.values_utf8(),
            ["238|1541942942000|58.223.1.112:59947|202.102.92.18:80|http://www.sumecjob.com/Social.aspx"]
        );
        assert!(out.rejections.is_empty());
    }

    #[test]
    fn honours_the_time_zone() {
        let shanghai = run(&[("timezone", "Asia/Shanghai")], &[SAMPLE]);
        assert!(shanghai.values_utf8()[0].starts_with("238|1541914142000|"), "{:?}", shanghai.values_utf8());
        let offset = run(&[("timezone", "+08:00")], &[SAMPLE]);
        assert_eq!(offset.values_utf8(), shanghai.values_utf8());
    }

    #[test]
    fn rejects_wrong_field_counts_and_bad_times_with_reasons() {
        let short = SAMPLE.rsplit_once(',').unwrap().0;
        let bad_time = SAMPLE.replace("20181111132902", "20181311132902");
        let garbage_time = SAMPLE.replace("20181111132902", "yesterday");
        let out = run(&[], &[short, SAMPLE, &bad_time, &garbage_time, ""]);
        assert_eq!(out.outputs.len(), 1);
        let reasons: Vec<(i64, &str)> = out.rejections.iter().map(|r| (r.offset, r.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (0, "expected 15 comma-separated fields, found 14"),
                (2, "unparsable operation time \"20181311132902\" (expected yyyyMMddHHmmss)"),
                (3, "unparsable operation time \"yesterday\" (expected yyyyMMddHHmmss)"),
                (4, "expected 15 comma-separated fields, found 1"),
            ]
        );
    }

    #[test]
    fn removes_markers_wherever_they_are() {
        let inside = SAMPLE.replace("<<<!>>>238<<<!>>>", "<<<!>>>2<<<!>>>38<<<!>>>");
        let unwrapped = SAMPLE.replace("<<<!>>>80<<<!>>>", "80");
        let out = run(&[], &[&inside, &unwrapped]);
        assert_eq!(out.values_utf8()[0], run(&[], &[SAMPLE]).values_utf8()[0]);
        assert_eq!(out.values_utf8()[1], out.values_utf8()[0]);
    }

    #[test]
    fn refuses_an_unknown_time_zone() {
        let err = testing::init::<Etl>(&[("timezone", "Mars/Olympus")]).err().unwrap();
        assert!(matches!(&err, PluginError::InvalidConfig(m) if m.contains("Mars/Olympus")), "{err:?}");
        let err = testing::init::<Etl>(&[("tz", "UTC")]).err().unwrap();
        assert!(matches!(&err, PluginError::InvalidConfig(m) if m.contains("unknown field `tz`")), "{err:?}");
    }

    #[test]
    fn keeps_the_input_key() {
        let mut etl: Etl = testing::init(&[]).unwrap();
        let mut record = testing::record(5, SAMPLE);
        record.key = Some(b"k1".to_vec());
        let out = testing::run(&mut etl, &testing::context("source", 0), vec![record]).unwrap();
        assert_eq!(out.outputs[0].key.as_deref(), Some(&b"k1"[..]));
    }
}
