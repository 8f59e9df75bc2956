//! Graceful stop on SIGINT/SIGTERM: the batch in flight finishes, delivers and commits; a
//! second signal exits at once, leaving that batch to be replayed on the next start.

use tokio::sync::watch;

/// Tells the batch loop a stop was requested.
#[derive(Clone)]
pub struct Shutdown {
    requested: watch::Receiver<bool>,
}

impl Shutdown {
    /// A shutdown that only `trigger` (or nothing) requests: for jobs run in-process.
    pub fn manual() -> (Shutdown, watch::Sender<bool>) {
        let (sender, requested) = watch::channel(false);
        (Shutdown { requested }, sender)
    }

    /// Listens for SIGINT and SIGTERM. Must be called inside a tokio runtime.
    pub fn on_signals() -> Shutdown {
        let (shutdown, sender) = Shutdown::manual();
        let mut signals = Signals::install();
        tokio::spawn(async move {
            signals.next().await;
            tracing::info!("stop requested: finishing the batch in flight (signal again to exit at once)");
            let _ = sender.send(true);
            signals.next().await;
            tracing::warn!("second stop signal: exiting without committing the batch in flight");
            std::process::exit(130);
        });
        shutdown
    }

    pub fn is_requested(&self) -> bool {
        *self.requested.borrow()
    }

    /// Resolves once a stop is requested.
    pub async fn requested(&mut self) {
        let _ = self.requested.wait_for(|requested| *requested).await;
    }
}

/// SIGINT and SIGTERM, installed once so that no signal between two waits is lost.
struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Signals {
        Signals {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("cannot install the SIGTERM handler"),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
