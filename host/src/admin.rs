//! The admin endpoint of a running job: status and hot upgrades over HTTP on loopback, guarded
//! by a token that only someone who can read the checkpoint directory knows.
//!
//! The host writes `admin.json` (`{"address", "token"}`, mode 0600) into the checkpoint
//! directory when it starts and removes it when it stops; `host status` and `host upgrade`
//! read it. Requests carry `Authorization: Bearer <token>`:
//!
//! - `GET /status` → the running plugin, the last batch and the lag, as JSON;
//! - `POST /upgrade` with `{"plugin": PATH, "force": bool}` → waits for the outcome (refused,
//!   upgraded after its first batches, or rolled back) and returns it as JSON.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::engine::{Status, UpgradeOutcome, UpgradeRequest};

/// The file, in the checkpoint directory, that tells clients where the endpoint is.
pub const ADMIN_FILE: &str = "admin.json";
/// How long a client waits for an upgrade's outcome (validation plus the probation batches).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the server checks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

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

/// A running admin endpoint; stops (and removes `admin.json`) when dropped.
pub struct AdminServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    file: PathBuf,
    address: SocketAddr,
}

impl AdminServer {
    /// Listens on `address` (loopback unless the job says otherwise) and writes `admin.json`
    /// with a fresh token into `dir`.
    pub fn start(
        address: SocketAddr,
        dir: &Path,
        status: Arc<Mutex<Status>>,
        upgrades: Sender<UpgradeRequest>,
    ) -> Result<AdminServer> {
        let listener =
            TcpListener::bind(address).with_context(|| format!("cannot listen for admin requests on {address}"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let token = new_token()?;
        let file = dir.join(ADMIN_FILE);
        write_private(&file, &serde_json::to_vec(&AdminFile { address, token: token.clone() })?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("sluice-admin".into()).spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (token, status, upgrades) = (token.clone(), status.clone(), upgrades.clone());
                        // An upgrade request waits for its outcome; status requests must not.
                        std::thread::spawn(move || {
                            if let Err(error) = serve(stream, &token, &status, &upgrades) {
                                tracing::debug!("admin request failed: {error:#}");
                            }
                        });
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
                    Err(error) => tracing::warn!("admin endpoint: {error}"),
                }
            }
        })?;
        tracing::info!("admin endpoint on http://{address} (token in {})", file.display());
        Ok(AdminServer { stop, thread: Some(thread), file, address })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Answers one request.
fn serve(stream: TcpStream, token: &str, status: &Mutex<Status>, upgrades: &Sender<UpgradeRequest>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorized = false;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "authorization" => {
                    authorized = value.strip_prefix("Bearer ").is_some_and(|given| constant_eq(given, token))
                }
                "content-length" => length = value.parse().context("bad Content-Length")?,
                _ => {}
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;

    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, answer) = if !authorized {
        (401, serde_json::json!({ "error": "missing or wrong token (see admin.json in the checkpoint directory)" }))
    } else {
        match (method, path) {
            ("GET", "/status") => (200, status.lock().expect("not poisoned").to_json()),
            ("POST", "/upgrade") => match serde_json::from_slice::<UpgradeBody>(&body) {
                Ok(body) => {
                    let (reply, outcome) = std::sync::mpsc::channel();
                    upgrades
                        .send(UpgradeRequest { plugin: body.plugin, force: body.force, reply })
                        .context("the job is stopping")?;
                    let outcome =
                        outcome.recv().unwrap_or(UpgradeOutcome::Refused { reason: "the job stopped".into() });
                    (200, serde_json::to_value(outcome)?)
                }
                Err(error) => (400, serde_json::json!({ "error": format!("bad upgrade request: {error}") })),
            },
            _ => (404, serde_json::json!({ "error": format!("no {method} {path}; try GET /status or POST /upgrade") })),
        }
    };
    let body = serde_json::to_vec_pretty(&answer)?;
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    )?;
    stream.write_all(&body)?;
    Ok(())
}

/// Sends one request to the endpoint of the job whose checkpoint is `dir`: `(status code,
/// JSON body)`.
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
    let mut stream = TcpStream::connect_timeout(&admin.address, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the job's admin endpoint at {} (is it running?)", admin.address))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let body = body.map(serde_json::to_vec).transpose()?.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        admin.address,
        admin.token,
        body.len()
    )?;
    stream.write_all(&body)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("no answer from the admin endpoint")?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed answer from the admin endpoint")?;
    let code: u16 =
        head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).context("malformed status line")?;
    let body = serde_json::from_str(body).context("the admin endpoint did not answer JSON")?;
    Ok((code, body))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Not Found",
    }
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
