//! Where a batch's outputs go: Kafka topics, the stdout print sink and a PostgreSQL table.
//! Delivery is complete only when every sink has acknowledged, and only then may the batch's
//! offsets be committed. A record a sink refuses is reported back, not a reason to fail the
//! batch: the engine applies the job's failure policy to it.

mod kafka;
mod postgres;
mod print;

pub use kafka::{KafkaSink, TransactionError, Undelivered};
pub use postgres::{PostgresSink, RejectedRow, WriteError, Written};
pub use print::PrintSink;

use crate::runtime::OutputRecord;
use crate::source::RawHeader;

/// A record a sink can send: a plugin's output, or a dead letter.
pub trait Outgoing {
    /// Its own target topic, if it names one.
    fn topic(&self) -> Option<&str>;
    /// The partition it must go to; `None` lets the producer's partitioner choose.
    fn partition(&self) -> Option<i32> {
        None
    }
    fn key(&self) -> Option<&[u8]>;
    fn value(&self) -> Option<&[u8]>;
    fn header_count(&self) -> usize;
    /// Calls `f` with each header's name and value, in order.
    fn for_each_header(&self, f: impl FnMut(&[u8], Option<&[u8]>));
}

impl<T: Outgoing> Outgoing for &T {
    fn topic(&self) -> Option<&str> {
        (*self).topic()
    }
    fn partition(&self) -> Option<i32> {
        (*self).partition()
    }
    fn key(&self) -> Option<&[u8]> {
        (*self).key()
    }
    fn value(&self) -> Option<&[u8]> {
        (*self).value()
    }
    fn header_count(&self) -> usize {
        (*self).header_count()
    }
    fn for_each_header(&self, f: impl FnMut(&[u8], Option<&[u8]>)) {
        (*self).for_each_header(f)
    }
}

impl Outgoing for OutputRecord {
    fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    fn header_count(&self) -> usize {
        self.headers.len()
    }

    fn for_each_header(&self, mut f: impl FnMut(&[u8], Option<&[u8]>)) {
        for header in &self.headers {
            f(header.key.as_bytes(), header.value.as_deref());
        }
    }
}

/// A record that could not be processed or delivered, on its way to the dead-letter topic:
/// the original key, value and headers (names as bytes: a record the plugin could not be given
/// because of its header names keeps them), plus headers saying what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
}

impl DeadLetter {
    /// Adds a text header.
    pub fn header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push(RawHeader { name: name.as_bytes().to_vec(), value: Some(value.into().into_bytes()) });
    }
}

impl Outgoing for DeadLetter {
    fn topic(&self) -> Option<&str> {
        Some(&self.topic)
    }

    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    fn header_count(&self) -> usize {
        self.headers.len()
    }

    fn for_each_header(&self, mut f: impl FnMut(&[u8], Option<&[u8]>)) {
        for header in &self.headers {
            f(&header.name, header.value.as_deref());
        }
    }
}

/// The job's sinks.
pub struct Sinks {
    pub kafka: KafkaSink,
    pub print: Option<PrintSink>,
    /// Takes the outputs without a topic, with `--postgres-table`.
    pub postgres: Option<PostgresSink>,
}
