//! The Kafka sink: one idempotent producer shared by every partition task of the job.
//!
//! A record the brokers refuse (too large, a topic that cannot be written) is reported back
//! with its position in the batch, so the engine can apply the job's failure policy to that
//! output alone; only a producer that cannot work at all fails the batch.

use std::ffi::c_void;
use std::os::raw::c_char;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use rdkafka::bindings as rdsys;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use super::Outgoing;

/// How long one wait for delivery reports blocks.
const DELIVERY_POLL: Duration = Duration::from_millis(1);

/// Sends outputs to Kafka and waits for every delivery report.
pub struct KafkaSink {
    producer: BaseProducer<DeliveryTracker>,
    default_topic: Option<String>,
}

/// An output the brokers did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    /// Its index in the list given to [`KafkaSink::send_all`].
    pub index: usize,
    pub topic: String,
    pub reason: String,
}

/// Collects failed deliveries, by index, between two waits.
#[derive(Default)]
struct DeliveryTracker {
    failures: Mutex<Vec<(usize, KafkaError)>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        if let Err((error, _)) = result {
            self.failures.lock().expect("not poisoned").push((index, error.clone()));
        }
    }
}

impl KafkaSink {
    /// A producer on the job's client configuration. `default_topic` receives outputs that do
    /// not name a topic; without one such outputs only reach the print sink.
    pub fn new(client: &ClientConfig, default_topic: Option<String>, delivery_timeout: Duration) -> Result<KafkaSink> {
        let mut config = client.clone();
        // Retries must not duplicate or reorder outputs.
        config.set("enable.idempotence", "true");
        if config.get("message.timeout.ms").is_none() {
            config.set("message.timeout.ms", delivery_timeout.as_millis().to_string());
        }
        let producer =
            config.create_with_context(DeliveryTracker::default()).context("cannot create the Kafka producer")?;
        Ok(KafkaSink { producer, default_topic })
    }

    /// Where an output goes: its own topic, else the job's output topic.
    pub fn topic_of<'a>(&'a self, output: &'a impl Outgoing) -> Option<&'a str> {
        output.topic().or(self.default_topic.as_deref())
    }

    /// Sends every output that has a topic (and that `include` accepts, by index) and waits
    /// until each is acknowledged or refused. Returns the refused ones; an error means the
    /// producer itself failed.
    pub fn send_all<T: Outgoing>(
        &mut self,
        outputs: &[T],
        include: impl Fn(usize) -> bool,
    ) -> Result<Vec<Undelivered>> {
        let mut undelivered = Vec::new();
        let mut sent = 0usize;
        for (index, output) in outputs.iter().enumerate() {
            let Some(topic) = output.topic().or(self.default_topic.as_deref()) else {
                continue;
            };
            if !include(index) {
                continue;
            }
            let mut record = BaseRecord::with_opaque_to(topic, index);
            if let Some(key) = output.key() {
                record = record.key(key);
            }
            if let Some(value) = output.value() {
                record = record.payload(value);
            }
            if output.header_count() > 0 {
                record = record.headers(headers(output));
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => {
                        sent += 1;
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // The local queue is full: serve delivery reports to make room.
                        self.producer.poll(Duration::from_millis(10));
                        record = returned;
                    }
                    Err((error, _)) if is_record_level(&error) => {
                        undelivered.push(Undelivered { index, topic: topic.to_string(), reason: error.to_string() });
                        break;
                    }
                    Err((error, _)) => {
                        return Err(error).with_context(|| format!("cannot send an output to topic `{topic}`"));
                    }
                }
            }
        }
        if sent > 0 {
            self.wait_for_deliveries();
        }
        let failures = std::mem::take(&mut *self.producer.context().failures.lock().expect("not poisoned"));
        for (index, error) in failures {
            if !is_record_level(&error) {
                bail!("the Kafka producer failed: {error}");
            }
            let topic = outputs[index].topic().or(self.default_topic.as_deref()).unwrap_or_default().to_string();
            undelivered.push(Undelivered { index, topic, reason: error.to_string() });
        }
        undelivered.sort_by_key(|u| u.index);
        Ok(undelivered)
    }

    /// Waits until every message sent has a delivery report. Not `flush`: rdkafka's flush
    /// polls in 100 ms steps, which would put a floor under every batch. Every message
    /// resolves within `message.timeout.ms`, so this ends.
    fn wait_for_deliveries(&self) {
        while self.producer.in_flight_count() > 0 {
            self.producer.poll(DELIVERY_POLL);
        }
    }
}

/// Whether a produce error concerns one record (its size, its topic) rather than the producer:
/// such a record is undeliverable and goes through the failure policy; the others fail the batch.
fn is_record_level(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | UnknownTopicOrPartition
                | UnknownTopic
                | UnknownPartition
                | InvalidTopic
                | InvalidMessage
                | InvalidRecord
                | TopicAuthorizationFailed
                | PolicyViolation
                | MessageTimedOut
        )
    )
}

/// The record's headers as librdkafka headers. Names are bytes here (a dead letter keeps its
/// record's header names exactly, UTF-8 or not), so they are added through the C API: rdkafka's
/// `OwnedHeaders::insert` takes names as `&str`.
fn headers(output: &impl Outgoing) -> OwnedHeaders {
    let headers = OwnedHeaders::new_with_capacity(output.header_count());
    // `BorrowedHeaders` is rdkafka's zero-sized view whose address is the native header list.
    let native = headers.as_borrowed() as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
    output.for_each_header(|name, value| {
        let (value_ptr, value_len) = match value {
            Some(value) => (value.as_ptr().cast::<c_void>(), value.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the live list owned by `headers`; librdkafka copies name and
        // value, whose lengths are passed explicitly.
        let error = unsafe {
            rdsys::rd_kafka_header_add(
                native,
                name.as_ptr().cast::<c_char>(),
                name.len() as isize,
                value_ptr,
                value_len,
            )
        };
        debug_assert_eq!(error, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    });
    headers
}
