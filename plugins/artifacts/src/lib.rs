//! The example plugins and test components, compiled to wasm32-wasip2 by this crate's build script.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
