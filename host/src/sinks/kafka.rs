//! The Kafka sink: one idempotent producer shared by every partition task of the job.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message as _};

use crate::runtime::OutputRecord;

/// How long one wait for delivery reports blocks.
const DELIVERY_POLL: Duration = Duration::from_millis(1);

/// Sends outputs to Kafka and waits for every delivery report.
pub struct KafkaSink {
    producer: BaseProducer<DeliveryTracker>,
    default_topic: Option<String>,
}

/// Collects failed deliveries between two `flush`es.
#[derive(Default)]
struct DeliveryTracker {
    failures: Mutex<Vec<(String, KafkaError)>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            self.failures.lock().expect("not poisoned").push((message.topic().to_string(), error.clone()));
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

    /// Sends every output with a topic and waits until all are acknowledged. Any failed
    /// delivery fails the batch, so its offsets are not committed and it is replayed.
    pub fn send_all(&mut self, outputs: &[OutputRecord]) -> Result<()> {
        let mut sent = 0usize;
        for output in outputs {
            let Some(topic) = output.topic.as_deref().or(self.default_topic.as_deref()) else {
                continue;
            };
            let mut record = BaseRecord::to(topic);
            if let Some(key) = &output.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &output.value {
                record = record.payload(value.as_slice());
            }
            if !output.headers.is_empty() {
                let headers =
                    output.headers.iter().fold(OwnedHeaders::new_with_capacity(output.headers.len()), |headers, h| {
                        headers.insert(KafkaHeader { key: &h.key, value: h.value.as_deref() })
                    });
                record = record.headers(headers);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // The local queue is full: serve delivery reports to make room.
                        self.producer.poll(Duration::from_millis(10));
                        record = returned;
                    }
                    Err((error, _)) => {
                        return Err(error).with_context(|| format!("cannot send an output to topic `{topic}`"));
                    }
                }
            }
            sent += 1;
        }
        if sent == 0 {
            return Ok(());
        }
        // Not `flush`: rdkafka's flush polls in 100 ms steps, which would put a floor under
        // every batch. Every message resolves within `message.timeout.ms`, so this ends.
        while self.producer.in_flight_count() > 0 {
            self.producer.poll(DELIVERY_POLL);
        }
        let failures = std::mem::take(&mut *self.producer.context().failures.lock().expect("not poisoned"));
        if let Some((topic, error)) = failures.first() {
            bail!("{} of {sent} outputs were not delivered; first: topic `{topic}`: {error}", failures.len());
        }
        Ok(())
    }
}
