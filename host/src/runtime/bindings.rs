//! The host side of the WIT contract: the only `bindgen!`s in the host, one per plugin world.
//! Everything else imports the generated types from here, so a new contract version changes
//! one file. The worlds share the `types` and `host` interfaces, so those are generated once
//! (in `transformer`) and reused by the others.

pub mod transformer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transformer",
    });
}

pub mod updater {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "updater",
        with: {
            "sluice:plugin/types": super::transformer::sluice::plugin::types,
            "sluice:plugin/host": super::transformer::sluice::plugin::host,
        },
    });
}

pub mod windower {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "windower",
        with: {
            "sluice:plugin/types": super::transformer::sluice::plugin::types,
            "sluice:plugin/host": super::transformer::sluice::plugin::host,
        },
    });
}

pub use transformer::sluice::plugin::host::Level;
pub use transformer::sluice::plugin::types::{
    BatchContext, BatchOutput, Header, InputRecord, KeyedOutput, KeyedValue, OutputRecord, PluginError, PluginInfo,
    Rejection,
};
pub use updater::exports::sluice::plugin::stateful::{KeyGroup, KeyUpdate, StateChange};

/// The fully qualified names of the worlds a plugin may implement, for error messages.
pub const WORLDS: [&str; 3] =
    ["sluice:plugin/transformer@0.1.0", "sluice:plugin/updater@0.1.0", "sluice:plugin/windower@0.1.0"];
