//! End-to-end tests of Sluice against real Kafka-protocol brokers (librdkafka's mock cluster,
//! in-process and as a `host dev-broker` process), with results read back by clients nobody
//! here wrote (confluent-kafka, kafka-python, librdkafka).

/// Shared set-up: broker processes, running `host`, the Python clients, ETL fixtures.
mod harness;

/// `host run` as a separate process against a `host dev-broker` process.
mod etl_process;
/// The same flow in-process against `MockCluster`, for fast iteration.
mod etl_in_process;
/// Bad plugins, configurations and brokers: one clear error line, non-zero exit, no commit.
mod bad_input;
/// `host demo`, as the README runs it.
mod demo;
