//! End-to-end tests of Sluice against real Kafka-protocol brokers (librdkafka's mock cluster,
//! in-process and as a `host dev-broker` process, and Tansu), with results read back by clients
//! nobody here wrote (confluent-kafka, kafka-python, librdkafka).

/// Shared set-up: broker processes, running `host`, the Python clients, ETL fixtures.
mod harness;
/// In-process set-up: `MockCluster`, librdkafka clients, a job template.
mod mock_kafka;

/// The admin endpoint against floods, slow clients and idle connections.
mod admin;
/// Bad plugins, configurations and brokers: one clear error line, non-zero exit, no commit.
mod bad_input;
/// `host demo`, as the README runs it.
mod demo;
/// The same flow in-process against `MockCluster`, for fast iteration.
mod etl_in_process;
/// `host run` as a separate process against a `host dev-broker` process.
mod etl_process;
/// `--delivery exactly-once` on Tansu: kills at seeded moments and at every crash point,
/// fencing, all judged from the outputs' raw record batches.
mod exactly_once;
/// Broker faults through the mock cluster's fault API and from outside: every record once.
mod faults;
/// Rate limits, backpressure, topic discovery, lost offsets, commit failures.
mod flow_control;
/// SIGINT/SIGTERM: graceful stop, and immediate exit on a second signal.
mod graceful_stop;
/// Plugins written to hurt the host: aliasing and huge results, many memories, endless calls.
mod hostile;
/// Metrics, the Streaming page in a browser, and `host status` against the log and clients.
mod monitoring;
/// Records from foreign producers: any header bytes, odd keys, tombstones; panics named.
mod odd_records;
/// The PostgreSQL sink against a real server: transactions, upserts, bad databases.
mod postgres;
/// Restarts: a backlog batch replayed in pieces within smaller bounds; a one-time --start.
mod restarts;
/// Misbehaving plugins: limits, capabilities and failure policies.
mod sandbox;
/// Several hosts on one group: work split, hosts joining, leaving and dying; stateful refusal.
mod scale_out;
/// Stateful jobs on several hosts through the shuffle and changelog topics (`--shared-state`).
mod shared_state;
/// Word count with a checkpoint: exact state across restarts, crashes and kill -9.
mod stateful;
/// Tansu, an independent Kafka broker: committed transactions from its record batches, and
/// several hosts sharing a topic through its group coordinator.
mod tansu;
/// Outputs the sinks refuse: too large, or for a topic outside the allow-list.
mod undeliverable;
/// Hot upgrades through the admin endpoint: switch, rollback, refusals.
mod upgrade;
/// Windows and state timeouts against brute-force computations, across a restart.
mod windows;
