//! Watching a running job: Prometheus metrics and the Streaming page, served read-only by one
//! listener (`--metrics-address`), and progress reports of long work. The engine reports to an
//! [`Observer`] whether or not anyone listens; mutating actions stay on the admin endpoint.

mod board;
pub mod metrics;
pub mod progress;
pub mod summary;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use board::Board;
pub use board::JobFacts;
pub use metrics::Metrics;

use crate::checkpoint::PluginRun;
use crate::control::{Status, UpgradeOutcome};
use crate::http::{Limits, Listener};
use crate::offsets::TopicPartition;
use crate::report::{BatchReport, RunSummary};
use crate::runtime::{PluginIdentity, PluginKind};

/// What the engine reports as it runs, for the metrics, the page and the admin endpoint's
/// status.
pub struct Observer {
    pub metrics: Metrics,
    board: Mutex<Board>,
    job: JobFacts,
    /// Shared with the admin endpoint, which serves it.
    status: Arc<Mutex<Status>>,
}

impl Observer {
    /// An observer keeping the last `history` batches for the page.
    pub fn new(job: JobFacts, status: Status, history: usize) -> Observer {
        let metrics = Metrics::new(&status.plugin, status.kind);
        Observer { metrics, board: Mutex::new(Board::new(history)), job, status: Arc::new(Mutex::new(status)) }
    }

    /// The job's status, to read or change.
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().expect("not poisoned")
    }

    /// The status, for the admin endpoint to serve.
    pub fn status_handle(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    pub fn batch(&self, report: &BatchReport) {
        self.metrics.batch(report);
        let mut board = self.board();
        board.batch(report);
        let rate = board.input_rate(self.job.batch_interval_ms);
        drop(board);
        let mut status = self.status();
        status.last_batch = Some(report.batch_time);
        status.input_rate = rate;
    }

    /// What each partition has left after the batch just planned.
    pub fn planned<'a>(&self, lags: impl IntoIterator<Item = (&'a TopicPartition, i64)>) {
        let mut board = self.board();
        for (partition, lag) in lags {
            self.metrics.lag(&partition.topic, partition.partition, lag);
            board.lag(partition, lag);
        }
        let total = board.lag_total();
        drop(board);
        self.status().lag = Some(total as i64);
    }

    /// The build the job runs now (switched to, or back to).
    pub fn running(&self, plugin: &PluginIdentity, kind: PluginKind) {
        self.metrics.running(plugin, kind);
        let mut status = self.status();
        status.plugin = plugin.clone();
        status.kind = kind;
    }

    /// The run's totals so far.
    pub fn totals(&self) -> RunSummary {
        self.board().totals()
    }

    /// Records left behind the last planned batches, over every partition this host reads.
    pub fn lag_total(&self) -> u64 {
        self.board().lag_total()
    }

    /// A partition moved to another member.
    pub fn revoked(&self, partition: &TopicPartition) {
        self.metrics.forget_partition(&partition.topic, partition.partition);
        self.board().forget_partition(partition);
    }

    /// Whether the lineage's newest build is `build`.
    pub fn lineage_ends_with(&self, build: &str) -> bool {
        self.board().lineage_ends_with(build)
    }

    /// The builds the checkpoint has run, oldest first.
    pub fn lineage(&self, runs: &[PluginRun]) {
        self.board().lineage(runs);
    }

    /// How an upgrade ended.
    pub fn upgrade(&self, outcome: &UpgradeOutcome) {
        self.metrics.upgrade(outcome.name());
        self.board().upgrade(now_ms(), outcome);
    }

    /// The Streaming page's data.
    pub fn streaming_json(&self) -> serde_json::Value {
        let status = self.status().clone();
        self.board().to_json(&self.job, &status)
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().expect("not poisoned")
    }
}

/// The Streaming page, compiled into the binary: nothing is fetched from elsewhere.
const PAGE: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/streaming.js");
const STYLE: &str = include_str!("page/streaming.css");

/// Serves `/metrics`, the Streaming page (`/`) and its data (`/api/streaming`) on `address`
/// until the returned listener is dropped.
pub fn serve(address: SocketAddr, observer: Arc<Observer>) -> Result<Listener> {
    let router = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/api/streaming", get(streaming_handler))
        .route("/", get(|| async { asset("text/html; charset=utf-8", PAGE) }))
        .route("/streaming.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/streaming.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /, /metrics or /api/streaming\n") })
        .with_state(observer);
    let listener = Listener::start(address, router, Limits::CONTROL)
        .with_context(|| format!("cannot listen for metrics on {address}"))?;
    tracing::info!(
        "metrics on http://{}/metrics, the Streaming page on http://{}/",
        listener.address(),
        listener.address()
    );
    Ok(listener)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn metrics_handler(State(observer): State<Arc<Observer>>) -> Response {
    let text = observer.metrics.encode();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn streaming_handler(State(observer): State<Arc<Observer>>) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(observer.streaming_json())).into_response()
}
