//! End-to-end benchmarks: Sluice against a native rdkafka baseline and Quix Streams, side by
//! side on one embedded broker and one input, each result a ratio to the native baseline of
//! the same run.
//!
//! `cargo run --release -p sluice-bench` prints the tables; `-- --write-docs docs/BENCHMARKS.md`
//! also regenerates the document's measured section.

mod boundary;
mod input;
mod kafka;
mod native;
mod quix;
mod report;
mod scrape;
mod sluice;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use sluice_sdk::Transform as _;

use kafka::{Broker, Topic};
use report::{Overhead, Report, Row, median};

/// The allocator of the `host` binary, so that the engine runs here as it runs there (the
/// baselines share it: they run in this process).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks Sluice against a native baseline and Quix Streams on the embedded mock cluster.
#[derive(Parser, Debug)]
struct Args {
    /// ETL input lines (the seeds' access log) for Sluice and the native baseline.
    #[arg(long, default_value_t = 320_000)]
    records: u64,
    /// Partitions of the ETL input. The mock cluster keeps at most 5 MB per partition, so a
    /// larger ETL run needs more partitions.
    #[arg(long, default_value_t = 32)]
    etl_partitions: i32,
    /// Word-count input lines (8 words each).
    #[arg(long, default_value_t = 200_000)]
    word_lines: u64,
    /// Distinct words in the word-count input: the keys in state.
    #[arg(long, default_value_t = 100_000)]
    vocabulary: u64,
    /// ETL input lines for Quix Streams (slower: a smaller run of the same input).
    #[arg(long, default_value_t = 200_000)]
    peer_records: u64,
    /// Word-count input lines for Quix Streams.
    #[arg(long, default_value_t = 25_000)]
    peer_word_lines: u64,
    /// Records in one batch, spread evenly over the partitions (Sluice gets the matching
    /// `--max-rate-per-partition`).
    #[arg(long, default_value_t = 40_000)]
    batch_records: i64,
    /// Batch interval of the throughput runs; batches of a backlog run back to back.
    #[arg(long, default_value = "25ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Plugin workers of the Sluice runs (the native baseline is single-threaded too).
    #[arg(long, default_value_t = 1)]
    parallelism: usize,
    /// Runs of each Sluice/native pair, alternating; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Batches of the 50 ms overhead run.
    #[arg(long, default_value_t = 100)]
    overhead_batches: u64,
    /// Skip Quix Streams.
    #[arg(long)]
    no_peer: bool,
    /// Run only these parts (for profiling one of them); the report then lists only those.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Where Quix Streams' virtual environment lives.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-venv"))]
    venv: PathBuf,
    /// Extra librdkafka settings for Sluice's runs, as KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    kafka: Vec<String>,
    /// Run only Sluice's side of the ETL and word-count pairs (for `perf record`; no ratios).
    #[arg(long)]
    sluice_only: bool,
    /// Where the engine's log goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/sluice-bench.log"))]
    log: PathBuf,
    /// Rewrite the measured section of this Markdown file (docs/BENCHMARKS.md).
    #[arg(long, value_name = "FILE")]
    write_docs: Option<PathBuf>,
}

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Etl,
    Wordcount,
    Peer,
    /// The ETL plugin and a pass-through plugin without Kafka: the plugin step on one core
    /// and the cost of the Wasm boundary.
    Plugin,
    Overhead,
}

/// Partitions of the word-count input: four, because that is what the mock cluster gives the
/// topics it creates on first use, Quix Streams' repartition and changelog topics among them.
const WORD_PARTITIONS: i32 = 4;

/// The batching every runner shares: the same offset ranges, batch after batch.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub interval: Duration,
    pub per_partition: i64,
}

impl Batching {
    fn new(interval: Duration, batch_records: i64, partitions: i32) -> Batching {
        Batching { interval, per_partition: (batch_records / i64::from(partitions)).max(1) }
    }

    /// The `--max-rate-per-partition` that gives `per_partition` records per batch.
    fn max_rate_per_partition(&self) -> f64 {
        self.per_partition as f64 / self.interval.as_secs_f64()
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The engine logs as `host run` does (info, a line per batch and per rejected record), to a
    // file: that cost is part of what is measured, the terminal is spared.
    let log = std::fs::File::create(&args.log).with_context(|| format!("cannot create {}", args.log.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .init();
    let broker = Broker::start()?;
    let mut report = Report::new(&args);

    let bench = Bench { broker: &broker, args: &args };
    let wants = |part| args.only.is_empty() || args.only.contains(&part);
    // Ratios are to the native baseline of this run; a part run alone has none.
    let (mut native_etl, mut sluice_etl, mut native_words, mut sluice_words) = (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    if wants(Part::Etl) {
        eprintln!("loading {} ETL lines", args.records);
        let etl_in = Topic { name: "etl-in", partitions: args.etl_partitions };
        broker.load(etl_in, args.records, input::etl_line)?;
        let etl = bench.etl_pair(etl_in)?;
        (native_etl, sluice_etl) = (etl.native, etl.sluice);
        let rows = [
            ("native baseline (rdkafka, no Wasm)", native_etl),
            (report::SLUICE_ETL, sluice_etl),
            ("Sluice with `--task-deadline off`", etl.unbounded),
            (report::SLUICE_ETL_EXACTLY_ONCE, etl.exactly_once),
        ];
        report.exactly_once = Some(report::ExactlyOnceCost {
            rate: etl.exactly_once / etl.sluice,
            commit_ms: (etl.commit_ms, etl.exactly_once_commit_ms),
        });
        for (runner, rate) in rows {
            report.rows.push(Row::new("ETL", runner, args.records, rate, native_etl));
        }
    }
    if wants(Part::Wordcount) {
        eprintln!("loading {} word-count lines", args.word_lines);
        let words_in = Topic { name: "words-in", partitions: WORD_PARTITIONS };
        broker.load(words_in, args.word_lines, |n| input::word_line(n, args.vocabulary))?;
        let counts = input::word_counts(args.word_lines, args.vocabulary);
        (native_words, sluice_words) = bench.wordcount_pair(words_in, &counts)?;
        let rows = [("native baseline (redb)", native_words), (report::SLUICE_WORDCOUNT, sluice_words)];
        for (runner, rate) in rows {
            report.rows.push(Row::new("word count", runner, args.word_lines, rate, native_words));
        }
    }
    if wants(Part::Peer) && !args.no_peer {
        let quix = quix::Quix::prepare(&args.venv)?;
        report.quix_version = Some(quix.version.clone());
        let (etl, words) = bench.peer(&quix)?;
        report.rows.push(Row::new("ETL", "Quix Streams", args.peer_records, etl, native_etl));
        report.rows.push(Row::new("word count", "Quix Streams", args.peer_word_lines, words, native_words));
        report.peer_rows.push(("ETL", etl, sluice_etl));
        report.peer_rows.push(("word count", words, sluice_words));
    }
    if wants(Part::Plugin) {
        eprintln!("measuring the plugin step without Kafka");
        let records = boundary::TASK as u64;
        let etl = etl::Etl::init(etl::Config { timezone: "UTC".into() }).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let valid = input::etl_valid_count(records) as usize;
        let step = boundary::compare(sluice_plugin_artifacts::ETL_WASM, etl, valid, 15)?;
        report.rows.push(Row::new("ETL plugin alone", "native", records, step.native, step.native));
        report.rows.push(Row::new("ETL plugin alone", report::SLUICE_ETL_PLUGIN, records, step.wasm, step.native));
        let busy = busy::Busy::init(busy::Config { work_per_record: 0 }).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let boundary = boundary::compare(sluice_plugin_artifacts::BUSY_WASM, busy, records as usize, 15)?;
        report.rows.push(Row::new("Wasm boundary", "native pass-through", records, boundary.native, boundary.native));
        let runner = "Sluice pass-through (busy.wasm)";
        report.rows.push(Row::new("Wasm boundary", runner, records, boundary.wasm, boundary.native));
        report.boundary_ns = Some(boundary.cost_per_record());
    }
    if wants(Part::Overhead) {
        report.overhead = Some(bench.overhead()?);
    }
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &args.write_docs {
        report::write_into(path, &text)?;
        eprintln!("wrote the measured section of {}", path.display());
    }
    Ok(())
}

/// Records/s of the ETL runners, and the median deliver + commit time per batch (ms).
struct EtlRates {
    native: f64,
    sluice: f64,
    unbounded: f64,
    exactly_once: f64,
    commit_ms: f64,
    exactly_once_commit_ms: f64,
}

/// The runs, against one broker.
struct Bench<'a> {
    broker: &'a Broker,
    args: &'a Args,
}

impl Bench<'_> {
    /// The batching of the throughput runs over `input`.
    fn batching(&self, input: Topic<'_>) -> Batching {
        Batching::new(self.args.interval, self.args.batch_records, input.partitions)
    }

    /// `host run` flags of a backlog job on `input` writing to `output`.
    fn flags(&self, plugin: &str, batching: Batching, input: &str, output: &str, group: &str) -> Vec<String> {
        [
            "--plugin",
            plugin,
            "--brokers",
            &self.broker.bootstrap(),
            "--topic",
            input,
            "--group",
            group,
            "--output-topic",
            output,
            "--batch-interval",
            &format!("{}ms", batching.interval.as_millis()),
            "--max-rate-per-partition",
            &batching.max_rate_per_partition().to_string(),
            "--parallelism",
            &self.args.parallelism.to_string(),
            "--auto-offset-reset",
            "earliest",
            "--kafka",
            "fetch.wait.max.ms=20",
            "--stop-when-caught-up",
        ]
        .map(String::from)
        .into_iter()
        .chain(self.args.kafka.iter().flat_map(|setting| ["--kafka".to_string(), setting.clone()]))
        .collect()
    }

    /// ETL through the native baseline, through Sluice, through Sluice with unbounded plugin
    /// calls (no epoch checks) and through Sluice with `--delivery exactly-once`, alternating;
    /// median records/s of each, and the median per-batch deliver + commit time of the two
    /// delivery guarantees.
    fn etl_pair(&self, input: Topic<'_>) -> Result<EtlRates> {
        let valid = input::etl_valid_count(self.args.records);
        let ends = self.broker.log_ends(input.name)?;
        let batching = self.batching(input);
        let mut native = Vec::new();
        // Per Sluice variant (by its name suffix): records/s, and deliver + commit ms per batch.
        let variants: [(&str, &[&str]); 3] =
            [("", &[]), ("-off", &["--task-deadline", "off"]), ("-eos", &["--delivery", "exactly-once"])];
        let mut measured: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for round in 0..self.args.repeat.max(1) {
            if self.args.sluice_only {
                native.push(f64::NAN);
            } else {
                eprintln!("ETL round {}: native baseline", round + 1);
                let (output, group) = (format!("etl-native-out-{round}"), format!("etl-native-{round}"));
                self.broker.create_topic(Topic { name: &output, ..input })?;
                let run = native::etl(self.broker, input.name, &output, &group, batching)?;
                ensure!(run.outputs == valid && self.broker.count(&output)? == valid, "native ETL: wrong output count");
                ensure!(
                    self.broker.committed(&group, input.name)? == ends,
                    "native ETL: offsets not committed to the end"
                );
                native.push(rate(run.records, run.elapsed));
            }

            for (suffix, extra) in variants {
                eprintln!("ETL round {}: Sluice{suffix}", round + 1);
                let (output, group) =
                    (format!("etl-sluice{suffix}-out-{round}"), format!("etl-sluice{suffix}-{round}"));
                self.broker.create_topic(Topic { name: &output, ..input })?;
                let mut flags = self.flags(sluice_plugin_artifacts::ETL, batching, input.name, &output, &group);
                flags.extend(extra.iter().map(|flag| flag.to_string()));
                let run = sluice::run(&flags)?;
                ensure!(run.summary.outputs == valid, "Sluice ETL: {} outputs, expected {valid}", run.summary.outputs);
                ensure!(run.summary.rejected == self.args.records - valid, "Sluice ETL: wrong rejection count");
                ensure!(self.broker.count(&output)? == valid, "Sluice ETL: wrong output count in the topic");
                // The mock cluster acknowledges offsets sent in a transaction without storing
                // them; the exactly-once run's offsets are checked on Tansu by the tests.
                if suffix != "-eos" {
                    ensure!(self.broker.committed(&group, input.name)? == ends, "Sluice ETL: offsets not at the end");
                }
                let per_batch: Vec<f64> = run
                    .batches
                    .iter()
                    .filter(|batch| batch.records_in > 0)
                    .map(|batch| (batch.phases.deliver + batch.phases.commit).as_secs_f64() * 1000.0)
                    .collect();
                let (rates, commits) = measured.entry(suffix).or_default();
                rates.push(rate(run.summary.records_in, run.elapsed));
                commits.push(median(per_batch));
            }
        }
        let mut take = |suffix| measured.remove(suffix).map(|(r, c)| (median(r), median(c))).unwrap_or_default();
        let ((sluice, commit_ms), (unbounded, _), (exactly_once, exactly_once_commit_ms)) =
            (take(""), take("-off"), take("-eos"));
        Ok(EtlRates { native: median(native), sluice, unbounded, exactly_once, commit_ms, exactly_once_commit_ms })
    }

    /// Word count with a checkpoint every batch, native and Sluice; state checked exactly.
    fn wordcount_pair(&self, input: Topic<'_>, counts: &HashMap<String, u64>) -> Result<(f64, f64)> {
        let batching = self.batching(input);
        let ends = self.broker.log_ends(input.name)?;
        let (mut native, mut sluice) = (Vec::new(), Vec::new());
        for round in 0..self.args.repeat.max(1) {
            if self.args.sluice_only {
                native.push(f64::NAN);
            } else {
                eprintln!("word count round {}: native baseline", round + 1);
                let store = tempfile::tempdir()?;
                let output = format!("words-native-out-{round}");
                self.broker.create_topic(Topic { name: &output, ..input })?;
                let group = format!("words-native-{round}");
                let run = native::wordcount(self.broker, input.name, &output, &group, batching, store.path())?;
                check_counts(self.broker, &output, counts).context("native word count")?;
                ensure!(
                    self.broker.committed(&group, input.name)? == ends,
                    "native word count: offsets not at the end"
                );
                native.push(rate(run.records, run.elapsed));
            }

            eprintln!("word count round {}: Sluice", round + 1);
            let checkpoint = tempfile::tempdir()?;
            let output = format!("words-sluice-out-{round}");
            self.broker.create_topic(Topic { name: &output, ..input })?;
            let group = format!("words-sluice-{round}");
            let mut flags = self.flags(sluice_plugin_artifacts::WORDCOUNT, batching, input.name, &output, &group);
            flags.extend(["--checkpoint".into(), checkpoint.path().display().to_string()]);
            let run = sluice::run(&flags)?;
            check_counts(self.broker, &output, counts).context("Sluice word count")?;
            ensure!(self.broker.committed(&group, input.name)? == ends, "Sluice word count: offsets not at the end");
            sluice.push(rate(run.summary.records_in, run.elapsed));
        }
        Ok((median(native), median(sluice)))
    }

    /// Quix Streams over smaller runs of the same inputs: records/s of ETL and word count.
    fn peer(&self, quix: &quix::Quix) -> Result<(f64, f64)> {
        let args = self.args;
        eprintln!("Quix Streams: ETL over {} lines", args.peer_records);
        let etl_in = Topic { name: "quix-etl-in", partitions: args.etl_partitions };
        self.broker.load(etl_in, args.peer_records, input::etl_line)?;
        let valid = input::etl_valid_count(args.peer_records);
        let state = tempfile::tempdir()?;
        let bootstrap = self.broker.bootstrap();
        let elapsed =
            quix.run("etl", &bootstrap, ("quix-etl-in", "quix-etl-out"), (args.peer_records, valid), state.path())?;
        ensure!(self.broker.count("quix-etl-out")? == valid, "Quix ETL: wrong output count");
        let etl = args.peer_records as f64 / elapsed.as_secs_f64();

        eprintln!("Quix Streams: word count over {} lines", args.peer_word_lines);
        let words_in = Topic { name: "quix-words-in", partitions: WORD_PARTITIONS };
        self.broker.load(words_in, args.peer_word_lines, |n| input::word_line(n, args.vocabulary))?;
        let words = args.peer_word_lines * input::WORDS_PER_LINE;
        let elapsed = quix.run(
            "wordcount",
            &bootstrap,
            ("quix-words-in", "quix-words-out"),
            (args.peer_word_lines, words),
            state.path(),
        )?;
        let counts = input::word_counts(args.peer_word_lines, args.vocabulary);
        check_counts(self.broker, "quix-words-out", &counts).context("Quix word count")?;
        Ok((etl, args.peer_word_lines as f64 / elapsed.as_secs_f64()))
    }

    /// Per-batch host overhead of the ETL job with a checkpoint at a 50 ms interval, every
    /// batch carrying records.
    fn overhead(&self) -> Result<Overhead> {
        const INTERVAL: Duration = Duration::from_millis(50);
        const PER_PARTITION: u64 = 100;
        let input = Topic { name: "overhead-in", partitions: self.args.etl_partitions };
        let batches = self.args.overhead_batches;
        let per_batch = PER_PARTITION * input.partitions as u64;
        let records = batches * per_batch;
        eprintln!("overhead: {batches} batches of {} ms", INTERVAL.as_millis());
        self.broker.load(input, records, input::etl_line)?;
        self.broker.create_topic(Topic { name: "overhead-out", ..input })?;
        let checkpoint = tempfile::tempdir()?;
        let batching = Batching { interval: INTERVAL, per_partition: PER_PARTITION as i64 };
        let mut flags = self.flags(sluice_plugin_artifacts::ETL, batching, input.name, "overhead-out", "overhead");
        flags.extend(["--checkpoint".into(), checkpoint.path().display().to_string()]);
        flags.extend(["--max-batches".into(), batches.to_string()]);
        let run = sluice::run(&flags)?;
        ensure!(run.summary.records_in == records, "overhead run: {} of {records} records", run.summary.records_in);
        let overhead = Overhead::from_batches(INTERVAL, per_batch, &run.batches);

        // The same job again, serving its metrics and Streaming page to a scraper: once a
        // second (a page left open refreshes every 2 s, Prometheus scrapes every 15 s), and
        // back to back, the worst a monitoring setup can do.
        let mut overhead = overhead;
        for (name, pause) in [("every second", Some(Duration::from_secs(1))), ("back to back", None)] {
            let group = format!("scraped-{}", name.replace(' ', "-"));
            let input = Topic { name: &format!("{group}-in"), ..input };
            self.broker.load(input, records, input::etl_line)?;
            let output = format!("{group}-out");
            self.broker.create_topic(Topic { name: &output, ..input })?;
            let checkpoint = tempfile::tempdir()?;
            let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut flags = self.flags(sluice_plugin_artifacts::ETL, batching, input.name, &output, &group);
            flags.extend(["--checkpoint".into(), checkpoint.path().display().to_string()]);
            flags.extend(["--max-batches".into(), batches.to_string()]);
            flags.extend(["--metrics-address".into(), address.to_string()]);
            let scraper = scrape::Scraper::start(address, pause);
            let run = sluice::run(&flags)?;
            let scrapes = scraper.stop();
            ensure!(run.summary.records_in == records, "{group}: {} of {records} records", run.summary.records_in);
            ensure!(scrapes > 0, "{group}: the scraper never reached the metrics listener");
            overhead = overhead.with_scraped(name, &run.batches, scrapes);
        }

        // The case of a job with a rate limit: each batch takes a slice of what the partitions
        // hold, and the records of the next slice should already be local when it starts
        // (librdkafka's default fetch.wait.max.ms of 500 ms, as a user would run it).
        let limited = Topic { name: "limited-in", partitions: 3 };
        let limited_batches = batches.clamp(3, 10);
        self.broker.load(limited, limited_batches * 300, input::etl_line)?;
        self.broker.create_topic(Topic { name: "limited-out", ..limited })?;
        let flags: Vec<String> = [
            "--plugin",
            sluice_plugin_artifacts::ETL,
            "--brokers",
            &self.broker.bootstrap(),
            "--topic",
            limited.name,
            "--group",
            "limited",
            "--output-topic",
            "limited-out",
            "--batch-interval",
            "500ms",
            "--max-rate-per-partition",
            "200",
            "--auto-offset-reset",
            "earliest",
            "--max-batches",
            &limited_batches.to_string(),
        ]
        .map(String::from)
        .into();
        let run = sluice::run(&flags)?;
        ensure!(
            run.summary.records_in == limited_batches * 300,
            "rate-limited run: {} records",
            run.summary.records_in
        );
        Ok(overhead.with_rate_limited(&run.batches))
    }
}

/// The output topic's latest `(word,total)` per word must equal the independent count.
fn check_counts(broker: &Broker, topic: &str, counts: &HashMap<String, u64>) -> Result<()> {
    let (_, latest) = broker.latest_by_key(topic)?;
    ensure!(latest.len() == counts.len(), "{} words in the output, expected {}", latest.len(), counts.len());
    for (word, total) in counts {
        let expected = format!("({word},{total})");
        let found = latest.get(word).map(String::as_str);
        ensure!(found == Some(&expected), "word {word}: latest output {found:?}, expected {expected}");
    }
    Ok(())
}

/// Records per second of one run, also shown on the terminal (the report keeps the median).
fn rate(records: u64, elapsed: Duration) -> f64 {
    let rate = records as f64 / elapsed.as_secs_f64();
    eprintln!("  {records} records in {:.0} ms: {rate:.0} records/s", elapsed.as_secs_f64() * 1e3);
    rate
}
