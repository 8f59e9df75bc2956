//! The host side of the WIT contract: the only `bindgen!` in the host. Everything else imports
//! the generated types from here, so a new contract version changes one file.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "transformer",
});

pub use sluice::plugin::host::Level;
pub use sluice::plugin::types::{
    BatchContext, BatchOutput, Header, InputRecord, OutputRecord, PluginError, PluginInfo, Rejection,
};

/// The fully qualified name of the world a transform plugin must implement.
pub const TRANSFORMER_WORLD: &str = "sluice:plugin/transformer@0.1.0";
