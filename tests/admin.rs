//! The admin endpoint against anyone on loopback without the token: idle connections past the
//! cap, a slowloris, a 100 MB header line and 10,000 headers. Each gets an error or a closed
//! connection, the host's memory and threads stay bounded, and an honest `host status` answers
//! throughout.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::{BrokerProcess, Running, host, run_host, unique};

const LIMIT: Duration = Duration::from_secs(60);

/// A field of /proc/PID/status, as a number (kB for memory).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What the server answered on `stream` (its status line), or why there is no answer.
fn answer(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) if bytes.is_empty() => "closed".into(),
        Ok(_) => String::from_utf8_lossy(&bytes).lines().next().unwrap_or_default().to_string(),
        Err(error) if bytes.is_empty() => format!("error: {error}"),
        Err(_) => String::from_utf8_lossy(&bytes).lines().next().unwrap_or_default().to_string(),
    }
}

/// Sends `head` and then `filler` repeatedly until `total` bytes went out or the server stops
/// reading; returns how many bytes it took.
fn flood(address: SocketAddr, head: &[u8], filler: &[u8], total: usize) -> (usize, TcpStream) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(head).unwrap();
    let mut sent = head.len();
    while sent < total {
        match stream.write(filler) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    (sent, stream)
}

fn status_answers(dir: &std::path::Path) {
    let status = run_host(host().args(["status", "--json"]).arg("--checkpoint").arg(dir), LIMIT);
    status.assert_success();
    assert!(status.stdout().contains(r#""name": "busy""#), "{}", status.stdout());
}

#[test]
fn the_admin_endpoint_holds_against_floods_slow_clients_and_idle_connections() {
    let topic = unique("admin");
    let broker = BrokerProcess::start(&[(&topic, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::BUSY, "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group", "admin", "--batch-interval", "200ms", "--checkpoint"])
        .arg(dir.path());
    let mut running = Running::start(command);
    running.wait_for("admin endpoint on");
    let admin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("admin.json")).unwrap()).unwrap();
    let address: SocketAddr = admin["address"].as_str().unwrap().parse().unwrap();
    let pid = running.pid();
    status_answers(dir.path());
    let (rss_before, threads_before) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));

    // 1,100 idle connections: past the cap of 1,024 they are answered 503 and closed. Which
    // ones are past it is the order the host accepts them in, not the order they were opened
    // (the kernel's accept queue overflows and handshakes complete late), so every one is
    // watched, without blocking on the idle ones.
    let idle: Vec<TcpStream> = (0..1100).map(|_| TcpStream::connect(address).unwrap()).collect();
    for stream in &idle {
        stream.set_nonblocking(true).unwrap();
    }
    let mut answered = vec![false; idle.len()];
    let started = Instant::now();
    while answered.iter().filter(|a| **a).count() < 76 && started.elapsed() < Duration::from_secs(4) {
        for (stream, answered) in idle.iter().zip(&mut answered).filter(|(_, a)| !**a) {
            let mut head = [0u8; 12];
            *answered = matches!(stream.peek(&mut head), Ok(12)) && &head == b"HTTP/1.1 503";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = answered.iter().filter(|a| **a).count();
    let warnings: Vec<&String> = running.drain_log().iter().filter(|line| line.contains("WARN")).collect();
    assert_eq!(refused, 1100 - 1024, "connections over the cap are refused; the host warned: {warnings:?}");
    // An honest client still gets through: it retries while the endpoint is at its cap, and
    // idle connections are closed at the header deadline.
    status_answers(dir.path());
    let peak_threads = proc_status(pid, "Threads:");

    // A 100 MB header line: refused (431) long before 100 MB are read.
    let (sent, mut huge) = flood(address, b"GET /status HTTP/1.1\r\nX-Huge: ", &[b'a'; 64 * 1024], 100 << 20);
    assert!(sent < 100 << 20, "the host read the whole 100 MB header");
    let huge_answer = answer(&mut huge);
    assert!(huge_answer.contains("431") || huge_answer.starts_with("closed") || huge_answer.starts_with("error"));

    // 10,000 headers: refused.
    let headers: String = (0..10_000).map(|n| format!("X-{n}: v\r\n")).collect();
    let mut many = TcpStream::connect(address).unwrap();
    let _ = many.write_all(format!("GET /status HTTP/1.1\r\n{headers}\r\n").as_bytes());
    let many_answer = answer(&mut many);
    assert!(many_answer.contains("431") || many_answer == "closed", "{many_answer}");

    // A slowloris, one header byte a second: cut off at the header deadline (5 s).
    let mut slow = TcpStream::connect(address).unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut cut_off = false;
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        if slow.write_all(b"X").is_err() {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "a request trickling its headers was never cut off");

    status_answers(dir.path());
    let rss_after = proc_status(pid, "VmRSS:");
    drop(idle);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the host's memory grew from {} to {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(peak_threads < threads_before + 8, "threads grew from {threads_before} to {peak_threads}");
    eprintln!(
        "admin endpoint under attack: RSS {} -> {} MiB, threads {threads_before} -> {peak_threads}; 100 MB header \
         line cut at {} KiB ({huge_answer}); 10,000 headers: {many_answer}",
        rss_before / 1024,
        rss_after / 1024,
        sent / 1024
    );
    running.stop();
}
