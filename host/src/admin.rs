//! The admin endpoint of a running job: status and hot upgrades over HTTP on loopback, guarded
//! by a token that only someone who can read the checkpoint directory knows.
//!
//! The host writes `admin.json` (`{"address", "token"}`, mode 0600) into the checkpoint
//! directory when it starts and removes it when it stops; `host status` and `host upgrade`
//! read it. Requests carry `Authorization: Bearer <token>`:
//!
//! - `GET /status` → the running plugin, the last batch and the lag, as JSON;
//! - `POST /upgrade` with `{"plugin": PATH, "force": bool}` → waits for the outcome (refused,
//!   upgraded after its probation batches, rolled back, or the job stopping) and returns it.
//!
//! The listener's limits ([`crate::http::Limits::CONTROL`]) are checked before the token, so
//! anyone on loopback can at most get an error: not exhaust memory, threads or connections.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::{Status, UpgradeOutcome, UpgradeRequest};
use crate::http::{Limits, Listener};

/// The file, in the checkpoint directory, that tells clients where the endpoint is.
pub const ADMIN_FILE: &str = "admin.json";
/// How long a client waits for an upgrade's outcome (validation plus the probation batches).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client keeps asking an endpoint that is at its connection limit.
const BUSY_RETRY: Duration = Duration::from_secs(15);

/// Where the endpoint listens and the token it expects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminFile {
    pub address: SocketAddr,
    pub token: String,
}

/// The body of `POST /upgrade`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeBody {
    pub plugin: PathBuf,
    #[serde(default)]
    pub force: bool,
}

/// A running admin endpoint; stops (and removes `admin.json`) when dropped, answering the
/// upgrades still waiting "job stopping".
pub struct AdminServer {
    listener: Listener,
    file: PathBuf,
    stopping: watch::Sender<bool>,
    answering: Arc<AtomicUsize>,
}

/// What the handlers share.
#[derive(Clone)]
struct Admin {
    token: Arc<str>,
    status: Arc<Mutex<Status>>,
    upgrades: Sender<UpgradeRequest>,
    /// Becomes `true` when the job stops.
    stopping: watch::Receiver<bool>,
    /// Upgrade requests waiting for their answer.
    answering: Arc<AtomicUsize>,
}

/// How long a stopping endpoint gives waiting upgrade requests to receive their answer.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

impl AdminServer {
    /// Listens on `address` (loopback unless the job says otherwise) on the current tokio
    /// runtime and writes `admin.json` with a fresh token into `dir`.
    pub fn start(
        address: SocketAddr,
        dir: &Path,
        status: Arc<Mutex<Status>>,
        upgrades: Sender<UpgradeRequest>,
    ) -> Result<AdminServer> {
        let token = new_token()?;
        let (stopping, stopped) = watch::channel(false);
        let answering = Arc::new(AtomicUsize::new(0));
        let admin =
            Admin { token: token.clone().into(), status, upgrades, stopping: stopped, answering: answering.clone() };
        let router = Router::new()
            .route("/status", get(status_handler))
            .route("/upgrade", post(upgrade_handler))
            .fallback(|| async {
                reply(StatusCode::NOT_FOUND, serde_json::json!({"error": "try GET /status or POST /upgrade"}))
            })
            .with_state(admin);
        let listener = Listener::start(address, router, Limits::CONTROL)
            .with_context(|| format!("cannot listen for admin requests on {address}"))?;
        let address = listener.address();
        let file = dir.join(ADMIN_FILE);
        write_private(&file, &serde_json::to_vec(&AdminFile { address, token })?)?;
        tracing::info!("admin endpoint on http://{address} (token in {})", file.display());
        Ok(AdminServer { listener, file, stopping, answering })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener.address()
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = self.stopping.send(true);
        // The answers are written by the runtime's other threads; the process may exit soon
        // after this returns.
        let deadline = Instant::now() + ANSWER_GRACE;
        while self.answering.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn reply(code: StatusCode, body: serde_json::Value) -> Response {
    (code, axum::Json(body)).into_response()
}

/// Whether the request carries the bearer token (compared in constant time).
fn authorized(admin: &Admin, headers: &HeaderMap) -> bool {
    let given =
        headers.get("authorization").and_then(|value| value.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|given| constant_eq(given, &admin.token))
}

fn unauthorized() -> Response {
    reply(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({ "error": "missing or wrong token (see admin.json in the checkpoint directory)" }),
    )
}

async fn status_handler(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let status = admin.status.lock().expect("not poisoned").to_json();
    reply(StatusCode::OK, status)
}

async fn upgrade_handler(State(admin): State<Admin>, headers: HeaderMap, body: axum::body::Body) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    // The body (small, by the listener's limit) must arrive within the request deadline too.
    let body = match tokio::time::timeout(Limits::CONTROL.header_deadline, axum::body::to_bytes(body, usize::MAX)).await
    {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({ "error": format!("bad request body: {error}") }),
            );
        }
        Err(_) => return reply(StatusCode::REQUEST_TIMEOUT, serde_json::json!({ "error": "request body too slow" })),
    };
    let body: UpgradeBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(error) => {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": format!("bad upgrade request: {error}") }),
            );
        }
    };
    let _answering = Answering::start(&admin.answering);
    let mut stopping = admin.stopping.clone();
    if *stopping.borrow() {
        return outcome_reply(UpgradeOutcome::job_stopping());
    }
    let (answer, outcome) = tokio::sync::oneshot::channel();
    if admin.upgrades.send(UpgradeRequest { plugin: body.plugin, force: body.force, reply: answer }).is_err() {
        return outcome_reply(UpgradeOutcome::job_stopping());
    }
    // The outcome comes when the validator refuses, once the new version's probation batches
    // are committed or rolled back, or when the job stops (every pending upgrade is answered
    // then, and so is this request, whatever the validator is doing).
    let outcome = tokio::select! {
        outcome = outcome => outcome.unwrap_or_else(|_| UpgradeOutcome::job_stopping()),
        _ = stopping.wait_for(|stopping| *stopping) => UpgradeOutcome::job_stopping(),
    };
    outcome_reply(outcome)
}

fn outcome_reply(outcome: UpgradeOutcome) -> Response {
    reply(StatusCode::OK, serde_json::to_value(outcome).expect("plain enum"))
}

/// Counts upgrade requests waiting for their answer, so a stopping job can let them have it.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn start(count: &Arc<AtomicUsize>) -> Answering {
        count.fetch_add(1, Ordering::SeqCst);
        Answering(count.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends one request to the endpoint of the job whose checkpoint is `dir`: `(status code,
/// JSON body)`. An endpoint at its connection limit is asked again for a few seconds.
pub fn request(
    dir: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let file = dir.join(ADMIN_FILE);
    let admin: AdminFile = serde_json::from_slice(
        &std::fs::read(&file).with_context(|| format!("no running job found: cannot read {}", file.display()))?,
    )
    .with_context(|| format!("unreadable {}", file.display()))?;
    let body = body.map(serde_json::to_vec).transpose()?.unwrap_or_default();
    let deadline = Instant::now() + BUSY_RETRY;
    loop {
        let answer = send(&admin, method, path, &body);
        match answer {
            Ok((503, _)) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            answer => return answer,
        }
    }
}

fn send(admin: &AdminFile, method: &str, path: &str, body: &[u8]) -> Result<(u16, serde_json::Value)> {
    let mut stream = TcpStream::connect_timeout(&admin.address, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the job's admin endpoint at {} (is it running?)", admin.address))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        admin.address,
        admin.token,
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("no answer from the admin endpoint")?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed answer from the admin endpoint")?;
    let code: u16 =
        head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).context("malformed status line")?;
    let body = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).context("the admin endpoint did not answer JSON")?
    };
    Ok((code, body))
}

/// A 256-bit token from the operating system's random source.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` to `path`, readable and writable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fails unless the response is a 200.
pub fn check_ok(code: u16, body: &serde_json::Value) -> Result<()> {
    if code != 200 {
        bail!("{}", body["error"].as_str().unwrap_or("the admin endpoint refused the request"));
    }
    Ok(())
}
