//! `host demo`: the seeds' online ETL end to end on an in-process broker, in one command.
//!
//! Starts a mock Kafka cluster, produces access-log lines in the seeds' format (some of them
//! malformed) in waves, runs the ETL plugin over a few micro-batches printing each batch's
//! outputs, and shows the offsets committed to the consumer group afterwards.

use std::time::Duration;

use anyhow::{Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::broker::DevBroker;
use crate::config::{JobConfig, JobOptions};
use crate::engine::{Engine, Shutdown};
use crate::offsets::AutoOffsetReset;

const INPUT: &str = "etl-input";
const OUTPUT: &str = "etl-output";
const GROUP: &str = "sluice-demo";
const PARTITIONS: i32 = 3;

/// Options of `host demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Batches to run.
    #[arg(long, default_value_t = 3)]
    pub batches: u64,
    /// Access-log lines produced for each batch (every seventh is malformed).
    #[arg(long, default_value_t = 20)]
    pub records_per_batch: usize,
    /// Time between batches.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let broker = DevBroker::start(1, &[(INPUT.into(), PARTITIONS), (OUTPUT.into(), PARTITIONS)])?;
    let brokers = broker.bootstrap_servers();
    eprintln!("mock Kafka cluster at {brokers}; topics {INPUT} and {OUTPUT} with {PARTITIONS} partitions each");

    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let plugin = dir.path().join("etl.wasm");
    std::fs::write(&plugin, sluice_plugin_artifacts::ETL_WASM).context("cannot write the demo plugin")?;

    // One wave of input is there before the job starts, and one more arrives after each batch.
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().context("cannot create the demo producer")?;
    let per_wave = args.records_per_batch;
    produce_wave(&producer, 0, per_wave)?;
    let mut waves = 1;

    let job = JobConfig::from_options(JobOptions {
        plugin: Some(plugin),
        plugin_config: vec![("timezone".into(), "Asia/Shanghai".into())],
        brokers: Some(brokers.clone()),
        topics: vec![INPUT.into()],
        group: Some(GROUP.into()),
        batch_interval: Some(args.batch_interval),
        output_topic: Some(OUTPUT.into()),
        print: Some(5),
        auto_offset_reset: Some(AutoOffsetReset::Earliest),
        max_batches: Some(args.batches),
        parallelism: Some(2),
        broker_timeout: Some(Duration::from_secs(10)),
        ..JobOptions::default()
    })?;
    let engine = tokio::task::block_in_place(|| Engine::start(job))?;
    let summary = engine
        .run_observed(Shutdown::on_signals(), |_| {
            if waves < args.batches as usize {
                produce_wave(&producer, waves * per_wave, per_wave)?;
                waves += 1;
            }
            Ok(())
        })
        .await?;

    println!(
        "{} batches: {} records in, {} outputs to {OUTPUT}, {} rejected (logged above with offset and reason)\n",
        summary.batches, summary.records_in, summary.outputs, summary.rejected
    );
    print_committed_offsets(&brokers)
}

/// Produces `count` lines numbered from `first`, keyed by user so a user's lines share a partition.
fn produce_wave(producer: &ThreadedProducer<DefaultProducerContext>, first: usize, count: usize) -> Result<()> {
    for n in first..first + count {
        let (key, line) = access_log_line(n);
        producer
            .send(BaseRecord::to(INPUT).key(&key).payload(&line))
            .map_err(|(error, _)| error)
            .context("cannot produce demo records")?;
    }
    producer.flush(Duration::from_secs(10)).context("cannot flush demo records")
}

/// The `n`th sample line in the seeds' format; every seventh is malformed, alternating a
/// missing field and an impossible time.
pub fn access_log_line(n: usize) -> (String, String) {
    let user = 200 + n % 9;
    let time = format!("20181111{:02}{:02}{:02}", 8 + n % 12, n % 60, (n * 7) % 60);
    let mut fields = vec![
        (3000 + n).to_string(),
        user.to_string(),
        time,
        format!("58.223.1.{}", n % 250),
        "202.102.92.18".into(),
        (40000 + n).to_string(),
        "80".into(),
        "www.sumecjob.com".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("http://www.sumecjob.com/page{n}.aspx"),
        (2556928066u64 + n as u64).to_string(),
    ];
    if n % 7 == 3 {
        if n.is_multiple_of(2) {
            fields[2] = "20181399250000".into();
        } else {
            fields.pop();
        }
    }
    let line = fields.iter().map(|field| format!("<<<!>>>{field}<<<!>>>")).collect::<Vec<_>>().join(",");
    (user.to_string(), line)
}

fn print_committed_offsets(brokers: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", GROUP)
        .create()
        .context("cannot create a consumer to read the committed offsets")?;
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(INPUT, partition);
    }
    let committed =
        consumer.committed_offsets(query, Duration::from_secs(10)).context("cannot read committed offsets")?;
    println!("committed offsets of consumer group {GROUP} (as Kafka's group tooling shows them):");
    println!("  {:<14} {:>9} {:>9} {:>5}", "PARTITION", "COMMITTED", "LOG-END", "LAG");
    for element in committed.elements() {
        let (_, end) = consumer
            .fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(10))
            .context("cannot read the log end")?;
        let committed = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        };
        let partition = format!("{}:{}", element.topic(), element.partition());
        println!("  {partition:<14} {committed:>9} {end:>9} {:>5}", end - committed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_have_fifteen_marked_fields_except_the_malformed_ones() {
        let fields = |n| access_log_line(n).1.split(',').count();
        assert_eq!(fields(0), 15);
        assert_eq!(fields(3), 14); // odd: a field is missing
        assert_eq!(fields(10), 15); // even: the time is impossible instead
        assert!(access_log_line(10).1.contains("20181399250000"));
    }
}
