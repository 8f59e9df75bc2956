//! A Kafka-protocol broker for trying Sluice and for tests: librdkafka's mock cluster, a real
//! server on loopback ports written by the librdkafka authors. It keeps data in memory only.

use anyhow::{Context as _, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running mock cluster. Dropping it stops the brokers.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts `brokers` brokers and creates `topics` (name, partitions). Other topics are
    /// created on first use with the mock cluster's default of 4 partitions.
    pub fn start(brokers: i32, topics: &[(String, i32)]) -> Result<DevBroker> {
        let cluster = MockCluster::new(brokers).context("cannot start the mock Kafka cluster")?;
        let broker = DevBroker { cluster };
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions)?;
        }
        Ok(broker)
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("cannot create topic `{topic}` with {partitions} partitions"))
    }

    /// The address clients connect to, e.g. `127.0.0.1:40123`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
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
