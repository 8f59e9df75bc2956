//! A scraper of `/metrics` and the Streaming page's data, on fresh connections until stopped:
//! at a pace, or back to back (the worst a monitoring setup can do to a job).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Scraper {
    /// Starts scraping `address` (the job may not listen yet: refused connections are retried),
    /// pausing `pause` after each round, or never.
    pub fn start(address: SocketAddr, pause: Option<Duration>) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            while !stopping.load(Ordering::Relaxed) {
                let mut round = 0;
                for path in ["/metrics", "/api/streaming"] {
                    match get(address, path) {
                        Some(_) => round += 1,
                        None => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                answered += round;
                // The pace starts once the job answers (a short run may end within a pause).
                if let Some(pause) = pause.filter(|_| round > 0) {
                    std::thread::sleep(pause);
                }
            }
            answered
        });
        Scraper { stop, thread }
    }

    /// Stops and returns how many requests were answered with 200.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the scraper does not panic")
    }
}

/// The body of `GET path`, if the job answered 200.
fn get(address: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    answer.starts_with(b"HTTP/1.1 200").then_some(answer)
}
