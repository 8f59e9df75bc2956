//! HTTP listeners of a running job (the admin endpoint, the metrics page): hyper's HTTP/1.1
//! server with axum routing, and limits that keep anyone who can reach the port from choking
//! the host. Every request must send its headers within a deadline, within a size and a count;
//! bodies are small; connections are capped (those over the cap get a 503 and are closed),
//! and none is kept alive. Each connection is a task on the job's runtime, not a thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};

/// What one listener lets a client do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must have arrived within this long of the connection opening.
    pub header_deadline: Duration,
    /// The request line and headers together, at most (hyper answers 431 beyond).
    pub max_header_bytes: usize,
    /// Headers per request, at most (hyper answers 431 beyond).
    pub max_headers: usize,
    /// A request body, at most (413 beyond); handlers read it within `header_deadline`.
    pub max_body_bytes: usize,
}

impl Limits {
    /// Limits for a loopback control endpoint: small requests, few clients.
    pub const CONTROL: Limits = Limits {
        max_connections: 1024,
        header_deadline: Duration::from_secs(5),
        max_header_bytes: 16 * 1024,
        max_headers: 32,
        max_body_bytes: 64 * 1024,
    };
}

/// A listener serving `router` until dropped.
pub struct Listener {
    address: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Listener {
    /// Binds `address` and serves `router` on the current tokio runtime.
    pub fn start(address: SocketAddr, router: Router, limits: Limits) -> Result<Listener> {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .context("cannot open a listening socket")?;
        socket.set_reuseaddr(true)?;
        socket.bind(address).with_context(|| format!("cannot listen on {address}"))?;
        // A burst of as many connections as are served at once waits in the accept queue
        // rather than in SYN retries of a second or more (std's default backlog is 128).
        let backlog = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        let listener = socket.listen(backlog).context("cannot serve HTTP on the job's runtime")?;
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, router, limits, stopped));
        Ok(Listener { address, stop })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(listener: TcpListener, router: Router, limits: Limits, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let router = router.layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes));
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!("HTTP listener: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(busy)).await;
            });
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                tower::ServiceExt::oneshot(router.clone(), request.map(axum::body::Body::new))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_deadline)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .max_headers(limits.max_headers)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!("HTTP connection: {error}");
            }
        });
    }
}
