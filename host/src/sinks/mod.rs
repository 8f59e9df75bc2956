//! Where a batch's outputs go: Kafka topics and the stdout print sink. Delivery is complete
//! only when every sink has acknowledged, and only then may the batch's offsets be committed.

mod kafka;
mod postgres;
mod print;

use anyhow::Result;

pub use kafka::KafkaSink;
pub use postgres::PostgresSink;
pub use print::PrintSink;

use crate::runtime::OutputRecord;

/// The job's sinks.
pub struct Sinks {
    pub kafka: KafkaSink,
    pub print: Option<PrintSink>,
    /// Takes the outputs without a topic, with `--postgres-table`.
    pub postgres: Option<PostgresSink>,
}

impl Sinks {
    /// Delivers one batch's outputs and dead letters (to Kafka only, never printed) and waits
    /// for every acknowledgement.
    pub fn deliver(&mut self, batch_time: i64, outputs: &[OutputRecord], dead_letters: &[OutputRecord]) -> Result<()> {
        if let Some(print) = &mut self.print {
            print.print(batch_time, outputs)?;
        }
        self.kafka.send_all(outputs)?;
        if !dead_letters.is_empty() {
            self.kafka.send_all(dead_letters)?;
        }
        Ok(())
    }

    /// Writes the batch's table rows (outputs without a topic) and, in transactional mode, its
    /// offsets, in one database transaction. Runs in the commit step, after `deliver`.
    pub fn write_rows(&mut self, outputs: &[OutputRecord], ranges: &[crate::source::OffsetRange]) -> Result<()> {
        if let Some(postgres) = &mut self.postgres {
            let rows: Vec<&OutputRecord> = outputs.iter().filter(|output| output.topic.is_none()).collect();
            postgres.write_batch(&rows, ranges)?;
        }
        Ok(())
    }
}
