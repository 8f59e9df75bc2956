//! A Kafka-protocol broker for trying Sluice and for tests: librdkafka's mock cluster, a real
//! server on loopback ports written by the librdkafka authors, with its fault API (brokers
//! down and up, leader moves, injected request errors, round-trip delays). It keeps data in
//! memory only.
//!
//! rdkafka's own `MockCluster` wraps only part of the fault API, so the cluster is driven
//! through librdkafka's C functions here. They post operations to the cluster's own thread
//! and are safe to call from any thread.

use std::ffi::{CStr, CString};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use rdkafka::ClientConfig;
use rdkafka::bindings as rdsys;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer as _};

/// The delay before a new consumer group's first assignment, as Kafka's
/// `group.initial.rebalance.delay.ms`. Brokers default to 3 s; a development broker answers
/// sooner so that a job (or a test) starts at once.
pub const DEV_INITIAL_REBALANCE_DELAY: Duration = Duration::from_millis(200);

/// A running mock cluster. Dropping it stops the brokers.
pub struct DevBroker {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    /// The client the cluster was created with; it must outlive the cluster.
    _handle: BaseProducer,
    brokers: i32,
}

// SAFETY: the mock cluster's functions hand their work to the cluster's thread over a queue;
// librdkafka documents them as callable from any thread.
unsafe impl Send for DevBroker {}
unsafe impl Sync for DevBroker {}

/// A Kafka request type, for error injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Produce = 0,
    Fetch = 1,
    ListOffsets = 2,
    Metadata = 3,
    OffsetCommit = 8,
    OffsetFetch = 9,
    FindCoordinator = 10,
    JoinGroup = 11,
    Heartbeat = 12,
    SyncGroup = 14,
    InitProducerId = 22,
    AddPartitionsToTxn = 24,
    AddOffsetsToTxn = 25,
    EndTxn = 26,
    TxnOffsetCommit = 28,
}

impl std::str::FromStr for Api {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Api> {
        Ok(match name {
            "Produce" => Api::Produce,
            "Fetch" => Api::Fetch,
            "ListOffsets" => Api::ListOffsets,
            "Metadata" => Api::Metadata,
            "OffsetCommit" => Api::OffsetCommit,
            "OffsetFetch" => Api::OffsetFetch,
            "FindCoordinator" => Api::FindCoordinator,
            "JoinGroup" => Api::JoinGroup,
            "Heartbeat" => Api::Heartbeat,
            "SyncGroup" => Api::SyncGroup,
            "InitProducerId" => Api::InitProducerId,
            "AddPartitionsToTxn" => Api::AddPartitionsToTxn,
            "AddOffsetsToTxn" => Api::AddOffsetsToTxn,
            "EndTxn" => Api::EndTxn,
            "TxnOffsetCommit" => Api::TxnOffsetCommit,
            other => bail!("unknown Kafka API {other:?}"),
        })
    }
}

impl DevBroker {
    /// Starts `brokers` brokers (ids 1 to `brokers`) and creates `topics` (name, partitions).
    /// Other topics are created on first use with the mock cluster's default of 4 partitions.
    pub fn start(brokers: i32, topics: &[(String, i32)]) -> Result<DevBroker> {
        ensure!(brokers > 0, "a cluster needs at least one broker");
        let handle: BaseProducer = ClientConfig::new().create().context("cannot create the mock cluster's client")?;
        // SAFETY: the handle is a live client, kept alive by the returned value.
        let cluster = unsafe { rdsys::rd_kafka_mock_cluster_new(handle.client().native_ptr(), brokers) };
        ensure!(!cluster.is_null(), "cannot start the mock Kafka cluster");
        let broker = DevBroker { cluster, _handle: handle, brokers };
        broker.set_initial_rebalance_delay(DEV_INITIAL_REBALANCE_DELAY);
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions)?;
        }
        Ok(broker)
    }

    /// The address clients connect to, e.g. `127.0.0.1:40123,127.0.0.1:40125`.
    pub fn bootstrap_servers(&self) -> String {
        // SAFETY: the cluster is live; the string is owned by it.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(self.cluster)) }.to_string_lossy().into_owned()
    }

    /// How many brokers the cluster has (ids 1 to this).
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let name = CString::new(topic)?;
        let replication = self.brokers.min(3);
        // SAFETY: the cluster is live and the name a valid C string.
        let error = unsafe { rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, replication) };
        check(error).with_context(|| format!("cannot create topic `{topic}` with {partitions} partitions"))
    }

    /// Disconnects `broker` (or every broker with -1) and refuses new connections, as a
    /// broker that went down; its partitions keep their leader.
    pub fn broker_down(&self, broker: i32) -> Result<()> {
        // SAFETY: the cluster is live.
        check(unsafe { rdsys::rd_kafka_mock_broker_set_down(self.cluster, broker) })
            .with_context(|| format!("cannot take broker {broker} down"))
    }

    /// Lets `broker` (or every broker with -1) accept connections again.
    pub fn broker_up(&self, broker: i32) -> Result<()> {
        // SAFETY: the cluster is live.
        check(unsafe { rdsys::rd_kafka_mock_broker_set_up(self.cluster, broker) })
            .with_context(|| format!("cannot bring broker {broker} up"))
    }

    /// Makes `broker` the leader of `topic`'s `partition`.
    pub fn set_leader(&self, topic: &str, partition: i32, broker: i32) -> Result<()> {
        let name = CString::new(topic)?;
        // SAFETY: the cluster is live and the name a valid C string.
        check(unsafe { rdsys::rd_kafka_mock_partition_set_leader(self.cluster, name.as_ptr(), partition, broker) })
            .with_context(|| format!("cannot move the leader of {topic}:{partition} to broker {broker}"))
    }

    /// Delays every answer of `broker` (or of all with -1) by `delay`.
    pub fn set_round_trip_time(&self, broker: i32, delay: Duration) -> Result<()> {
        let delay = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the cluster is live.
        check(unsafe { rdsys::rd_kafka_mock_broker_set_rtt(self.cluster, broker, delay) })
            .with_context(|| format!("cannot delay broker {broker}"))
    }

    /// Makes the next requests of kind `api` (to any broker) fail with `errors`, one each.
    pub fn push_request_errors(&self, api: Api, errors: &[RDKafkaErrorCode]) {
        let errors: Vec<rdsys::rd_kafka_resp_err_t> = errors.iter().map(|error| to_native(*error)).collect();
        // SAFETY: the cluster is live and the array holds `errors.len()` codes.
        unsafe {
            rdsys::rd_kafka_mock_push_request_errors_array(self.cluster, api as i16, errors.len(), errors.as_ptr())
        };
    }

    /// Makes metadata answers report `error` for `topic` (`None` clears it), as a broker whose
    /// view of a topic is briefly broken does.
    pub fn set_topic_error(&self, topic: &str, error: Option<RDKafkaErrorCode>) -> Result<()> {
        let name = CString::new(topic)?;
        let error = error.map_or(rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, to_native);
        // SAFETY: the cluster is live and the name a valid C string.
        unsafe { rdsys::rd_kafka_mock_topic_set_error(self.cluster, name.as_ptr(), error) };
        Ok(())
    }

    /// The delay before a new consumer group's first assignment.
    pub fn set_initial_rebalance_delay(&self, delay: Duration) {
        let delay = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the cluster is live.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(self.cluster, delay) };
    }

    /// Runs one control command, as `host dev-broker` reads them on stdin:
    /// `down BROKER`, `up BROKER` (-1: all), `leader TOPIC PARTITION BROKER`,
    /// `rtt BROKER MILLISECONDS`, `errors API ERROR[,ERROR...]` (API and errors by name, e.g.
    /// `errors Fetch NotLeaderForPartition,RequestTimedOut`), `topic NAME PARTITIONS`.
    pub fn control(&self, command: &str) -> Result<()> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let number = |word: &str| word.parse::<i32>().with_context(|| format!("{word:?} is not a number"));
        match words.as_slice() {
            ["down", broker] => self.broker_down(number(broker)?),
            ["up", broker] => self.broker_up(number(broker)?),
            ["leader", topic, partition, broker] => self.set_leader(topic, number(partition)?, number(broker)?),
            ["rtt", broker, millis] => {
                self.set_round_trip_time(number(broker)?, Duration::from_millis(number(millis)?.max(0) as u64))
            }
            ["errors", api, errors] => {
                let errors = errors.split(',').map(parse_error_code).collect::<Result<Vec<_>>>()?;
                self.push_request_errors(api.parse()?, &errors);
                Ok(())
            }
            ["topic", name, partitions] => self.create_topic(name, number(partitions)?),
            _ => bail!(
                "unknown command {command:?}; try: down N, up N, leader TOPIC PARTITION N, rtt N MS, \
                 errors API ERROR[,ERROR], topic NAME PARTITIONS"
            ),
        }
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        // SAFETY: the cluster is live and destroyed once; the handle outlives it.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// Parses `NAME:PARTITIONS` (partitions default to 1 when omitted).
pub fn parse_topic_spec(text: &str) -> Result<(String, i32)> {
    match text.rsplit_once(':') {
        None => Ok((text.to_string(), 1)),
        Some((name, partitions)) => {
            let partitions = partitions
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("expected NAME:PARTITIONS with a positive count, got {text:?}"))?;
            Ok((name.to_string(), partitions))
        }
    }
}

/// An error code by its rdkafka name, e.g. `NotLeaderForPartition`: the ones fault tests use.
fn parse_error_code(name: &str) -> Result<RDKafkaErrorCode> {
    use RDKafkaErrorCode::*;
    const KNOWN: &[RDKafkaErrorCode] = &[
        NotLeaderForPartition,
        LeaderNotAvailable,
        RequestTimedOut,
        BrokerNotAvailable,
        NetworkException,
        NotCoordinator,
        CoordinatorNotAvailable,
        CoordinatorLoadInProgress,
        UnknownTopicOrPartition,
        KafkaStorageError,
        NotEnoughReplicas,
        NotEnoughReplicasAfterAppend,
        RebalanceInProgress,
        IllegalGeneration,
        UnknownMemberId,
        MessageSizeTooLarge,
        OffsetOutOfRange,
        ConcurrentTransactions,
        InvalidTransactionalState,
        InvalidProducerEpoch,
        ProducerFenced,
        OutOfOrderSequenceNumber,
        UnknownProducerId,
    ];
    KNOWN
        .iter()
        .copied()
        .find(|error| format!("{error:?}") == name)
        .with_context(|| format!("unknown Kafka error {name:?} (known: {KNOWN:?})"))
}

fn to_native(error: RDKafkaErrorCode) -> rdsys::rd_kafka_resp_err_t {
    // SAFETY: both enums are generated from librdkafka's one list of error codes, so every
    // `RDKafkaErrorCode` value is a valid `rd_kafka_resp_err_t`.
    unsafe { std::mem::transmute::<i32, rdsys::rd_kafka_resp_err_t>(error as i32) }
}

fn check(error: rdsys::rd_kafka_resp_err_t) -> Result<()> {
    if error == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        bail!("{}", RDKafkaErrorCode::from(error))
    }
}
