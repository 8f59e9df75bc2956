//! The seeds' first Kafka example (seed 001, `Lesson05_Spark_Kafka_Consumer`) as a plugin.
//!
//! Each record becomes the text of the Scala tuple the seed prints with `dStream.print()`:
//! `(key,(value,topic,partition,offset))`, with `null` for a missing key or value. The output
//! keeps the input key. Run it with `host run --plugin print.wasm --print 10` to watch a topic.

use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};

/// The print transform; it has no configuration.
pub struct Print;

/// Text of optional bytes as Scala would print a `String` that may be null.
fn text(bytes: Option<&[u8]>) -> std::borrow::Cow<'_, str> {
    match bytes {
        Some(bytes) => String::from_utf8_lossy(bytes),
        None => "null".into(),
    }
}

impl Transform for Print {
    type Config = ();

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(Print)
    }

    fn process(&mut self, ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        let line = format!(
            "({},({},{},{},{}))",
            text(record.key.as_deref()),
            text(record.value.as_deref()),
            ctx.topic,
            ctx.partition,
            record.offset
        );
        let output = Output::new(line);
        out.push(match record.key {
            Some(key) => output.with_key(key),
            None => output,
        });
        Ok(())
    }
}

sluice_sdk::export_transform!(Print);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing;

    #[test]
    fn prints_the_scala_tuple() {
        let mut print: Print = testing::init(&[]).unwrap();
        let mut keyed = testing::record(41, "hello");
        keyed.key = Some(b"k".to_vec());
        let mut tombstone = testing::record(42, "");
        tombstone.value = None;
        let out = testing::run(&mut print, &testing::context("test", 2), vec![keyed, tombstone]).unwrap();
        assert_eq!(out.values_utf8(), ["(k,(hello,test,2,41))", "(null,(null,test,2,42))"]);
        assert_eq!(out.outputs[0].key.as_deref(), Some(&b"k"[..]));
    }

    #[test]
    fn takes_no_configuration() {
        assert!(testing::init::<Print>(&[("verbose", "true")]).is_err());
    }
}
