//! Logging from a plugin into the host's log.
//!
//! Inside the host, each line is tagged with the plugin and the partition task it came from.
//! Natively (in unit tests) lines go to standard error.

#[cfg(target_arch = "wasm32")]
use crate::wit::sluice::plugin::host;

/// Severity of a log line.
pub use crate::wit::sluice::plugin::host::Level;

/// Writes `message` to the host log at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {level:?}] {message}");
}

/// Logs at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
