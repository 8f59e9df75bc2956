//! Panics on the batch path: a bug in the host (or in a library it calls) must not take the
//! job down silently or without saying where. Each thread that works on a batch says what it
//! is working on ([`working_on`]); a panic is recorded with that, and the batch loop turns it
//! into an error naming the batch and the partition ([`describe`]).

use std::cell::RefCell;
use std::sync::{Mutex, Once};

thread_local! {
    /// What this thread is doing, e.g. `fetching in:3` or `plugin call on in:3 [0, 40)`.
    static WORK: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The last panic's message and where it happened.
static LAST: Mutex<Option<String>> = Mutex::new(None);

/// Marks what the current thread works on until the guard is dropped.
pub fn working_on(work: impl FnOnce() -> String) -> WorkGuard {
    let previous = WORK.with(|current| current.borrow_mut().replace(work()));
    WorkGuard { previous }
}

/// Restores the thread's previous work when dropped.
pub struct WorkGuard {
    previous: Option<String>,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        WORK.with(|current| *current.borrow_mut() = previous);
    }
}

/// Installs the hook that records panics with the work they interrupted (once per process).
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let work = WORK.with(|current| current.borrow().clone());
            let described = match work {
                Some(work) => format!("while {work}: {message}{location}"),
                None => format!("{message}{location}"),
            };
            tracing::error!("internal error (panic) {described}");
            *LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(described);
            if std::env::var_os("RUST_BACKTRACE").is_some() {
                default(info);
            }
        }));
    });
}

/// What the last panic said, for the error that ends the batch.
pub fn describe() -> String {
    LAST.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
        .unwrap_or_else(|| "a panic with no message".into())
}
