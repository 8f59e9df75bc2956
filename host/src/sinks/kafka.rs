//! The Kafka sink: one idempotent producer shared by every partition task of the job, and with
//! `--delivery exactly-once` a transactional one: a batch's outputs, dead letters and input
//! offsets are one Kafka transaction.
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
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

use super::Outgoing;

/// How long the coordinator lets a transaction stay open (Kafka's default).
const DEFAULT_TRANSACTION_TIMEOUT_MS: u128 = 60_000;

/// How long one wait for delivery reports blocks.
const DELIVERY_POLL: Duration = Duration::from_millis(1);

/// Sends outputs to Kafka and waits for every delivery report.
pub struct KafkaSink {
    producer: BaseProducer<DeliveryTracker>,
    default_topic: Option<String>,
    /// With `--delivery exactly-once`: the transactional id, and whether a transaction is open.
    transactions: Option<Transactions>,
}

struct Transactions {
    id: String,
    open: bool,
    /// How long one transactional call may take (`--broker-timeout`).
    timeout: Duration,
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// The transaction was aborted (a refused output, a rebalance that fenced the group
    /// metadata, a coordinator error): nothing of it is visible; the batch runs again.
    #[error("the Kafka transaction was aborted: {0}")]
    Aborted(String),
    /// Another producer with this transactional id started (a restarted or second instance):
    /// this one must stop.
    #[error(
        "fenced: another instance with transactional id `{id}` took over (a restarted or duplicate host with the \
         same --group and --instance-id): {cause}"
    )]
    Fenced { id: String, cause: String },
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
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
    pub fn new(
        client: &ClientConfig,
        default_topic: Option<String>,
        delivery_timeout: Duration,
        transactional_id: Option<String>,
    ) -> Result<KafkaSink> {
        let mut config = client.clone();
        // Retries must not duplicate or reorder outputs.
        config.set("enable.idempotence", "true");
        if config.get("message.timeout.ms").is_none() {
            config.set("message.timeout.ms", delivery_timeout.as_millis().to_string());
        }
        let transactions = transactional_id.map(|id| Transactions { id, open: false, timeout: delivery_timeout });
        if let Some(transactions) = &transactions {
            config.set("transactional.id", &transactions.id);
            // A transaction left open by a host that died is aborted by the coordinator after
            // this long, unless a restarted instance fences it earlier. librdkafka refuses a
            // message timeout longer than it.
            if config.get("transaction.timeout.ms").is_none() {
                let timeout = delivery_timeout.as_millis().max(DEFAULT_TRANSACTION_TIMEOUT_MS);
                config.set("transaction.timeout.ms", timeout.to_string());
            }
        }
        let producer: BaseProducer<DeliveryTracker> =
            config.create_with_context(DeliveryTracker::default()).context("cannot create the Kafka producer")?;
        if let Some(transactions) = &transactions {
            // Fences the previous incarnation of this id and aborts its open transaction.
            producer.init_transactions(delivery_timeout).map_err(|error| {
                anyhow::Error::from(error).context(format!(
                    "cannot start transactions with transactional id `{}` (--delivery exactly-once needs brokers \
                     with transactions)",
                    transactions.id
                ))
            })?;
            tracing::info!("exactly-once delivery: transactional id `{}`", transactions.id);
        }
        Ok(KafkaSink { producer, default_topic, transactions })
    }

    /// Whether outputs go out in transactions (`--delivery exactly-once`).
    pub fn transactional(&self) -> bool {
        self.transactions.is_some()
    }

    /// The producer's fatal error, when another instance with its transactional id fenced it
    /// (librdkafka then purges everything queued).
    fn fenced(&self) -> Option<TransactionError> {
        let id = &self.transactions.as_ref()?.id;
        let (code, reason) = self.producer.client().fatal_error()?;
        Some(TransactionError::Fenced { id: id.clone(), cause: format!("{code:?}: {reason}") })
    }

    /// Whether a transaction is open.
    pub fn transaction_open(&self) -> bool {
        self.transactions.as_ref().is_some_and(|transactions| transactions.open)
    }

    /// Opens a transaction unless one is open (a build on probation keeps one open across the
    /// batches it holds). Without transactions, nothing.
    pub fn begin(&mut self) -> Result<(), TransactionError> {
        let Some(transactions) = &mut self.transactions else { return Ok(()) };
        if transactions.open {
            return Ok(());
        }
        self.producer.begin_transaction().map_err(|error| classify(&transactions.id, error))?;
        transactions.open = true;
        Ok(())
    }

    /// Adds `offsets` (with their metadata) to the open transaction as the consumer group's
    /// commit and commits the transaction: outputs and offsets become visible together.
    pub fn commit(
        &mut self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), TransactionError> {
        // Offsets alone (a batch without outputs) still need a transaction to go in.
        self.begin()?;
        let transactions = self.transactions.as_ref().context("no transactions without --delivery exactly-once")?;
        let (id, timeout) = (transactions.id.clone(), transactions.timeout);
        let result = retried(|| self.producer.send_offsets_to_transaction(offsets, group, timeout))
            .and_then(|()| retried(|| self.producer.commit_transaction(timeout)));
        match result {
            Ok(()) => {
                self.transactions.as_mut().expect("checked").open = false;
                Ok(())
            }
            Err(error) => Err(self.after_failure(&id, error)),
        }
    }

    /// Aborts the open transaction, if any: none of its records become visible.
    pub fn abort(&mut self) -> Result<(), TransactionError> {
        let Some(transactions) = &mut self.transactions else { return Ok(()) };
        if !transactions.open {
            return Ok(());
        }
        let (id, timeout) = (transactions.id.clone(), transactions.timeout);
        retried(|| self.producer.abort_transaction(timeout)).map_err(|error| classify(&id, error))?;
        self.transactions.as_mut().expect("checked").open = false;
        Ok(())
    }

    /// A failed transactional call: abortable errors abort (and report `Aborted`), fatal ones
    /// (fencing) are reported as such.
    fn after_failure(&mut self, id: &str, error: KafkaError) -> TransactionError {
        match classify(id, error) {
            TransactionError::Aborted(cause) => match self.abort() {
                Ok(()) => TransactionError::Aborted(cause),
                Err(error) => error,
            },
            other => other,
        }
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
            if let Some(partition) = output.partition() {
                record = record.partition(partition);
            }
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
            if let Some(fenced) = self.fenced() {
                return Err(fenced.into());
            }
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

/// Runs a transactional call again while librdkafka says the error is retriable (a
/// coordinator moving, a timeout).
fn retried(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut attempts = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(error)) if error.is_retriable() && attempts < 5 => {
                attempts += 1;
                tracing::warn!("transactional call failed ({error}); retrying");
                std::thread::sleep(Duration::from_millis(100 << attempts.min(4)));
            }
            other => return other,
        }
    }
}

fn classify(id: &str, error: KafkaError) -> TransactionError {
    match &error {
        KafkaError::Transaction(inner) if inner.is_fatal() => {
            TransactionError::Fenced { id: id.to_string(), cause: inner.to_string() }
        }
        KafkaError::Transaction(inner) if inner.txn_requires_abort() => TransactionError::Aborted(inner.to_string()),
        _ => TransactionError::Failed(anyhow::Error::from(error).context(format!("Kafka transaction of `{id}`"))),
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
