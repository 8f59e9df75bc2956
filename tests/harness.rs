//! Test harness: brokers as processes, `host` runs with captured output, independent clients.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// The `host` binary under test.
pub fn host() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_host"));
    command.env("SLUICE_LOG", "info").env_remove("RUST_LOG");
    // A killed host's partitions wait this long for it; the tests kill hosts often.
    command.env("SLUICE_SESSION_TIMEOUT", TEST_SESSION_TIMEOUT);
    command
}

/// The consumer-group session timeout of every host the tests start: short, so a restart after
/// a kill waits little for the dead member's partitions, but several heartbeats long, so a busy
/// machine does not evict a live member.
pub const TEST_SESSION_TIMEOUT: &str = "4s";

/// A topic or group name no other test uses.
pub fn unique(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `host dev-broker` as a child process, killed when dropped.
pub struct BrokerProcess {
    child: Child,
    pub brokers: String,
}

impl BrokerProcess {
    /// Starts a mock cluster with `topics` (name, partitions) and waits for its address.
    pub fn start(topics: &[(&str, i32)]) -> BrokerProcess {
        let mut command = host();
        command.arg("dev-broker");
        for (topic, partitions) in topics {
            command.arg("--topic").arg(format!("{topic}:{partitions}"));
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn host dev-broker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read the broker address");
        let brokers = line.trim().to_string();
        assert!(brokers.starts_with("127.0.0.1:"), "unexpected dev-broker output {line:?}");
        BrokerProcess { child, brokers }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tansu, an independent Kafka-compatible broker, as a child process on a loopback port with
/// its storage in memory; killed when dropped (it delays SIGTERM, and has nothing to flush).
/// Its quirks: the high watermark is the last record batch's base offset + 1 (produce input
/// with [`produce_one_by_one`], read outputs with [`committed_view`]), and Fetch carries no
/// aborted transactions (which [`committed_view`] works out from the markers).
pub struct TansuBroker {
    child: Child,
    pub brokers: String,
}

impl TansuBroker {
    /// Starts a broker and creates `topics` (name, partitions) on it.
    pub fn start(topics: &[(&str, i32)]) -> TansuBroker {
        let binary = match std::env::var_os("SLUICE_TANSU") {
            Some(path) => std::path::PathBuf::from(path),
            None => std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tools/tansu")).to_path_buf(),
        };
        assert!(
            binary.exists(),
            "no Tansu broker at {} (tests/run installs it; or set SLUICE_TANSU)",
            binary.display()
        );
        // A port taken between choosing and binding makes Tansu exit (with status 0): try another.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let url = format!("tcp://127.0.0.1:{port}");
            let mut child = Command::new(&binary)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            // It prints "ready in N ms" once listening; its log goes on to stdout, kept drained.
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let (send, ready) = mpsc::channel();
            std::thread::spawn(move || {
                let mut send = Some(send);
                for line in stdout.lines().map_while(Result::ok) {
                    if let Some(send) = send.take_if(|_| line.contains("ready in")) {
                        let _ = send.send(());
                    }
                }
            });
            match ready.recv_timeout(Duration::from_secs(30)) {
                Ok(()) => {
                    let broker = TansuBroker { child, brokers: format!("127.0.0.1:{port}") };
                    if !topics.is_empty() {
                        let mut args = vec!["create-topics".to_string(), "--brokers".into(), broker.brokers.clone()];
                        for (topic, partitions) in topics {
                            args.extend(["--topic".into(), format!("{topic}:{partitions}")]);
                        }
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        let _: serde_json::Value = kafka_check(&args, "");
                    }
                    return broker;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("Tansu was not ready within 30 s");
                }
            }
        }
        panic!("Tansu exited before it was ready, five times (ports in use?)");
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `host` whose stderr lines arrive on a channel.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(mut command: Command) -> Running {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, seen: Vec::new() }
    }

    /// Waits (a minute at most) for a log line containing `text`.
    pub fn wait_for(&mut self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {text:?}; saw:\n{}", self.seen.join("\n")));
            self.seen.push(line.clone());
            if line.contains(text) {
                return;
            }
        }
    }

    /// Takes the log lines that have arrived, without waiting; returns how many.
    pub fn drain(&mut self) -> usize {
        let before = self.seen.len();
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.len() - before
    }

    /// Kills the process with SIGKILL, as a machine failure would.
    /// Everything the process logged so far.
    pub fn drain_log(&mut self) -> &[String] {
        self.drain();
        &self.seen
    }

    /// Kills the process (SIGKILL) and returns what it logged.
    pub fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.drain();
        std::mem::take(&mut self.seen)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Stops the process gracefully (SIGTERM), asserts that it exits with success, and returns
    /// what it logged.
    pub fn stop(self) -> Vec<String> {
        self.signal();
        let (code, log) = self.finish();
        let tail = log[log.len().saturating_sub(40)..].join("\n");
        assert_eq!(code, Some(0), "host failed after SIGTERM; its last lines:\n{tail}");
        log
    }

    pub fn exit_code(self) -> Option<i32> {
        self.finish().0
    }

    /// Waits (a minute at most) for the process to exit; its exit code and everything it logged.
    pub fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let (done, finished) = mpsc::channel();
        let mut child = self.child;
        let waiter = std::thread::spawn(move || {
            let status = child.wait().unwrap();
            let _ = done.send(());
            status
        });
        if finished.recv_timeout(Duration::from_secs(60)).is_err() {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            let tail = self.seen[self.seen.len().saturating_sub(40)..].join("\n");
            panic!("host did not exit after the signal; its last lines:\n{tail}");
        }
        let code = waiter.join().unwrap().code();
        // The reader thread sends the last lines once the pipe closes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        (code, self.seen)
    }
}

/// A finished `host` run.
pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// Asserts the run succeeded, showing its output if not.
    pub fn assert_success(&self) -> &Run {
        assert!(self.success(), "host failed ({}):\n{}", self.output.status, self.stderr());
        self
    }

    /// The run's totals, from its final log line.
    pub fn summary(&self) -> Summary {
        let stderr = self.stderr();
        let pattern =
            regex::Regex::new(r"stopped after (\d+) batches: (\d+) records in, (\d+) out, (\d+) rejected").unwrap();
        let captures = pattern.captures(&stderr).unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
        let number = |i: usize| captures[i].parse().unwrap();
        Summary { batches: number(1), records_in: number(2), outputs: number(3), rejected: number(4) }
    }

    /// `(partition, offset)` of every rejection the run logged.
    pub fn rejections(&self) -> Vec<(i32, i64)> {
        let pattern = regex::Regex::new(r"rejected [^ ]+:(\d+) offset (\d+): ").unwrap();
        let mut rejected: Vec<(i32, i64)> =
            pattern.captures_iter(&self.stderr()).map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap())).collect();
        rejected.sort();
        rejected
    }

    /// Asserts the run failed with exactly one `error:` line containing each of `parts`.
    pub fn assert_error(&self, parts: &[&str]) {
        let stderr = self.stderr();
        assert!(!self.success(), "host should have failed:\n{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|line| line.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "expected one error line in:\n{stderr}");
        for part in parts {
            assert!(errors[0].contains(part), "error line lacks {part:?}:\n{}", errors[0]);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub batches: u64,
    pub records_in: u64,
    pub outputs: u64,
    pub rejected: u64,
}

/// Runs `host` to completion, killing it if it outlives `limit` (a hung run fails the test
/// instead of hanging the suite).
pub fn run_host(command: &mut Command, limit: Duration) -> Run {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn host");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output().expect("wait for host");
        let _ = done.send(());
        output
    });
    if finished.recv_timeout(limit).is_err() {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        let output = waiter.join().unwrap();
        panic!("host did not finish within {limit:?}:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    Run { output: waiter.join().unwrap() }
}

/// `host upgrade --plugin PLUGIN --checkpoint DIR [EXTRA]`, run to its answer.
pub fn upgrade(plugin: &str, dir: &std::path::Path, extra: &[&str]) -> Run {
    let mut command = host();
    command.args(["upgrade", "--plugin", plugin]).arg("--checkpoint").arg(dir).args(extra);
    run_host(&mut command, Duration::from_secs(120))
}

/// [`upgrade`] on another thread, for a test that drives the job meanwhile.
pub fn upgrade_in_background(
    plugin: &'static str,
    dir: &std::path::Path,
    extra: &'static [&'static str],
) -> std::thread::JoinHandle<Run> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || upgrade(plugin, &dir, extra))
}

/// Runs the independent Kafka client script and parses its JSON answer.
fn kafka_check<T: for<'de> Deserialize<'de>>(args: &[&str], stdin: &str) -> T {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/kafka_check.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the end-to-end tests (see the README's test command)");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "kafka_check.py {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("kafka_check.py prints JSON")
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct Input {
    pub partition: i32,
    pub key: Option<String>,
    pub value: String,
}

/// Produces `records` with kafka-python.
pub fn produce(brokers: &str, topic: &str, records: &[Input]) {
    let lines: String = records
        .iter()
        .map(|r| serde_json::json!({"partition": r.partition, "key": r.key, "value": r.value}).to_string() + "\n")
        .collect();
    let answer: serde_json::Value = kafka_check(&["produce", "--brokers", brokers, "--topic", topic], &lines);
    assert_eq!(answer["produced"], records.len());
}

/// Produces `records` with kafka-python one per Produce request, each acknowledged before the
/// next: on Tansu, whose high watermark is the last batch's base offset + 1, a batch of several
/// records would make the log end look short.
pub fn produce_one_by_one(brokers: &str, topic: &str, records: &[Input]) {
    let lines: String = records
        .iter()
        .map(|r| serde_json::json!({"partition": r.partition, "key": r.key, "value": r.value}).to_string() + "\n")
        .collect();
    let answer: serde_json::Value =
        kafka_check(&["produce", "--brokers", brokers, "--topic", topic, "--one-per-request"], &lines);
    assert_eq!(answer["produced"], records.len());
}

/// Produces `values` to `partition` with Kafka's "no timestamp" (-1), which kafka-python can
/// write and librdkafka cannot.
pub fn produce_without_timestamps(brokers: &str, topic: &str, partition: i32, values: &[&str]) {
    let lines: String = values
        .iter()
        .map(|value| serde_json::json!({"partition": partition, "value": value, "timestamp": -1}).to_string() + "\n")
        .collect();
    let answer: serde_json::Value = kafka_check(&["produce", "--brokers", brokers, "--topic", topic], &lines);
    assert_eq!(answer["produced"], values.len());
}

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    /// Headers by name (a repeated name keeps its last value).
    pub headers: BTreeMap<String, Option<String>>,
}

/// Every record of `topic`, read with confluent-kafka.
pub fn consume(brokers: &str, topic: &str) -> Vec<Consumed> {
    kafka_check(&["consume", "--brokers", brokers, "--topic", topic], "")
}

/// What a `read_committed` consumer must see of a topic, worked out from its raw record batches
/// (Tansu's Fetch carries no aborted transactions, so no client there can filter them).
#[derive(Debug, Clone, Deserialize)]
pub struct CommittedView {
    /// Records of committed transactions and of non-transactional batches, in offset order per
    /// partition.
    pub records: Vec<Consumed>,
    /// Records of aborted transactions.
    pub aborted: usize,
    /// Records of transactions with no COMMIT or ABORT marker yet.
    pub open: usize,
}

/// The committed view of `topic`, read with a record-batch reader of the standard library's.
pub fn committed_view(brokers: &str, topic: &str) -> CommittedView {
    kafka_check(&["committed", "--brokers", brokers, "--topic", topic], "")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PartitionOffsets {
    pub committed: Option<i64>,
    pub end: i64,
}

/// The group's committed offset and the log end of each partition, read with confluent-kafka.
pub fn offsets(brokers: &str, topic: &str, group: &str) -> BTreeMap<i32, PartitionOffsets> {
    let answer: BTreeMap<String, PartitionOffsets> =
        kafka_check(&["offsets", "--brokers", brokers, "--topic", topic, "--group", group], "");
    answer.into_iter().map(|(p, o)| (p.parse().unwrap(), o)).collect()
}

/// Asserts that `group` has committed exactly the log end of every partition of `topic`.
pub fn assert_committed_at_end(brokers: &str, topic: &str, group: &str) {
    for (partition, offsets) in offsets(brokers, topic, group) {
        assert_eq!(offsets.committed, Some(offsets.end), "{topic}:{partition} committed vs log end");
    }
}

/// ETL input lines with the outputs they must produce, built independently of the plugin:
/// the operation time is formatted from a known instant, so its epoch milliseconds are known.
pub struct EtlCase {
    pub lines: Vec<Input>,
    /// Expected output values of the valid lines, in no particular order.
    pub expected: Vec<String>,
    /// How many lines are malformed.
    pub malformed: usize,
    /// `(partition, offset)` of each malformed line, if the topic was empty before.
    pub malformed_positions: Vec<(i32, i64)>,
}

/// `count` lines numbered from `first`; every fifth is malformed (cycling through a missing
/// field, an impossible date and a non-numeric time). Each line is keyed by its user, and a
/// user's lines all go to one of the `partitions`, so per-key order is checkable downstream.
pub fn etl_case(first: usize, count: usize, partitions: i32) -> EtlCase {
    let mut case = EtlCase { lines: Vec::new(), expected: Vec::new(), malformed: 0, malformed_positions: Vec::new() };
    let mut next_offset = vec![0i64; partitions as usize];
    for n in first..first + count {
        let partition = (n % 13) as i32 % partitions;
        let offset = next_offset[partition as usize];
        next_offset[partition as usize] += 1;
        let instant: DateTime<Utc> = DateTime::from_timestamp(1_541_942_942 + 61 * n as i64, 0).unwrap();
        let user = format!("u{}", n % 13);
        let client = format!("10.0.{}.{}", n / 250, n % 250);
        let url = format!("http://example.com/p/{n}?q=a,b");
        let mut fields: Vec<String> = vec![
            n.to_string(),
            user.clone(),
            instant.format("%Y%m%d%H%M%S").to_string(),
            client.clone(),
            "192.168.1.1".into(),
            (30000 + n).to_string(),
            "443".into(),
            "example.com".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            url.replace(',', "%2C"),
            "17".into(),
        ];
        if n % 5 == 4 {
            match (n / 5) % 3 {
                0 => drop(fields.remove(8)),
                1 => fields[2] = "20181331120000".into(),
                _ => fields[2] = "2018-11-11 12:00".into(),
            }
            case.malformed += 1;
            case.malformed_positions.push((partition, offset));
        } else {
            case.expected.push(format!(
                "{user}|{}|{client}:{}|192.168.1.1:443|{}",
                instant.timestamp_millis(),
                30000 + n,
                url.replace(',', "%2C")
            ));
        }
        let value = fields.iter().map(|f| format!("<<<!>>>{f}<<<!>>>")).collect::<Vec<_>>().join(",");
        case.lines.push(Input { partition, key: Some(user), value });
    }
    case.malformed_positions.sort();
    case
}

/// A PostgreSQL server from the Debian packages, on loopback and a free port, with its data in
/// a temporary directory; stopped when dropped. As root (PostgreSQL refuses to run as root) it
/// runs as the `postgres` user the package creates.
pub struct PgServer {
    data: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
    as_root: bool,
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = postgres_bin_dir();
        let data = tempfile::Builder::new().prefix("sluice-pg-").tempdir().unwrap();
        let as_root = Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        if as_root {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(data.path()).status().unwrap();
            assert!(status.success(), "chown the PostgreSQL data directory");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = PgServer { data, bin, port, as_root };
        let cluster = server.cluster();
        server.run("initdb", &["--auth=trust", "--username=postgres", "--encoding=UTF8", "-D", &cluster]);
        server.server("start");
        server
    }

    /// `pg_ctl restart`: the server goes away and comes back, as in a maintenance window.
    pub fn restart(&self) {
        self.server("restart");
    }

    /// `pg_ctl stop -m fast`: connections are closed and the server is gone until [`Self::resume`].
    pub fn stop(&self) {
        self.run("pg_ctl", &["stop", "-w", "-m", "fast", "-D", &self.cluster()]);
    }

    /// Starts a stopped server again.
    pub fn resume(&self) {
        self.server("start");
    }

    fn cluster(&self) -> String {
        self.data.path().join("cluster").to_str().unwrap().to_string()
    }

    fn server(&self, action: &str) {
        let options = format!("-p {} -c listen_addresses=127.0.0.1 -k {}", self.port, self.data.path().display());
        let log = self.data.path().join("server.log");
        self.run(
            "pg_ctl",
            &[action, "-w", "-m", "fast", "-D", &self.cluster(), "-l", log.to_str().unwrap(), "-o", &options],
        );
    }

    /// Runs one of PostgreSQL's programs and checks it succeeded.
    fn run(&self, program: &str, args: &[&str]) {
        let output = self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(output.status.success(), "{program} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }

    /// One of PostgreSQL's programs, as the `postgres` user when the tests run as root
    /// (PostgreSQL refuses to run as root).
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        }
    }

    /// The connection string for `host run --postgres`.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// Runs SQL with psql (a client nobody here wrote) and returns its unaligned output rows.
    pub fn psql(&self, sql: &str) -> Vec<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql {sql:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().lines().map(str::to_string).collect()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").args(["stop", "-m", "immediate", "-D", &self.cluster()]).output();
    }
}

/// Where the Debian package puts `initdb` and `pg_ctl` (not on PATH): the newest version.
fn postgres_bin_dir() -> std::path::PathBuf {
    let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is needed for the database tests (tests/run installs the Debian package)")
        .map(|entry| entry.unwrap().path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL version with initdb under /usr/lib/postgresql")
}

/// The values a `read_committed` reader of a correct broker sees in `topic`, sorted.
pub fn committed_values(brokers: &str, topic: &str) -> Vec<String> {
    sorted(committed_view(brokers, topic).records.into_iter().map(|r| r.value.unwrap()).collect())
}

/// `values`, sorted.
pub fn sorted(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values
}

// Several hosts in one group, watched through their logs.

/// Batches the hosts logged as abandoned uncommitted: fenced by a rebalance, their partitions'
/// new owners replay them — the one duplication at-least-once delivery allows without a crash.
pub fn abandoned_batches(logs: &[Vec<String>]) -> usize {
    logs.iter().flatten().filter(|line| line.contains("abandoned uncommitted")).count()
}

/// Asserts that `delivered` holds every `expected` value and nothing else, each exactly once
/// unless a host abandoned a batch (then at most twice).
pub fn assert_delivered_once(delivered: Vec<String>, expected: &[String], logs: &[Vec<String>]) {
    let abandoned = abandoned_batches(logs);
    let mut times: BTreeMap<String, usize> = BTreeMap::new();
    for value in delivered {
        *times.entry(value).or_default() += 1;
    }
    let distinct: BTreeSet<&String> = times.keys().collect();
    assert_eq!(distinct, expected.iter().collect::<BTreeSet<_>>(), "every expected value, nothing else");
    let most = if abandoned == 0 { 1 } else { 2 };
    let over: Vec<&String> = times.iter().filter(|(_, n)| **n > most).map(|(value, _)| value).collect();
    assert!(
        over.is_empty(),
        "{} values delivered more than {most}× with {abandoned} abandoned batches, e.g. {:?}",
        over.len(),
        &over[..over.len().min(3)]
    );
}

/// The partitions `running` owns now, from its assignment log lines.
pub fn owned(running: &mut Running) -> BTreeSet<String> {
    running.drain();
    let partition = regex::Regex::new(r"[\w.-]+:\d+").unwrap();
    let mut owned = BTreeSet::new();
    for line in &running.seen {
        let Some((_, change)) = line.split_once(": assigned ").map(|(a, b)| (a, (true, b))).or_else(|| {
            line.split_once(": revoked ").or_else(|| line.split_once(": lost ")).map(|(a, b)| (a, (false, b)))
        }) else {
            continue;
        };
        let (added, list) = change;
        let list = list.split(" (").next().unwrap_or_default();
        for found in partition.find_iter(list) {
            if added {
                owned.insert(found.as_str().to_string());
            } else {
                owned.remove(found.as_str());
            }
        }
    }
    owned
}

/// A batch as its log line reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedBatch {
    pub time: i64,
    pub records_in: u64,
    pub outputs: u64,
    pub rejected: u64,
    /// Given up uncommitted (fenced or rolled back): its ranges run again elsewhere.
    pub abandoned: bool,
    /// Non-empty ranges, as `topic:partition [from, until)`.
    pub ranges: Vec<String>,
}

/// Every batch line of `log`.
pub fn logged_batches(log: &[String]) -> Vec<LoggedBatch> {
    let line =
        regex::Regex::new(r"batch (\d+) ms on \S+(?: \(([^)]*)\))?: (\d+) in, (\d+) out, (\d+) rejected.*; ([^;]*)$")
            .unwrap();
    let range = regex::Regex::new(r"[\w.-]+:\d+ \[\d+, \d+\)").unwrap();
    log.iter()
        .filter_map(|l| line.captures(l))
        .map(|c| LoggedBatch {
            time: c[1].parse().unwrap(),
            abandoned: c.get(2).is_some_and(|outcome| outcome.as_str().starts_with("abandoned")),
            records_in: c[3].parse().unwrap(),
            outputs: c[4].parse().unwrap(),
            rejected: c[5].parse().unwrap(),
            ranges: range.find_iter(&c[6]).map(|m| m.as_str().to_string()).collect(),
        })
        .collect()
}

/// Records `running` has processed so far, from its batch log lines.
pub fn records_in(running: &mut Running) -> usize {
    logged_batches(running.drain_log()).iter().map(|batch| batch.records_in as usize).sum()
}

/// Waits until `done` holds, checking every 100 ms, for two minutes at most.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(120), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
