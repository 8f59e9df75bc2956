//! Write Sluice plugins in Rust: implement [`Transform`], call [`export_transform!`], done.
//!
//! A Sluice plugin is a WebAssembly component that the `host` calls once per Kafka partition
//! per micro-batch, with every record of that partition's offset range. This crate hides the
//! component ABI: you write ordinary Rust over [`Record`]s and emit [`Output`]s, and you test
//! that logic natively with `cargo test` — no Wasm toolchain needed for the tests.
//!
//! # A complete plugin
//!
//! ```
//! use serde::Deserialize;
//! use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};
//!
//! /// Typed configuration, filled from the job's `--plugin-config KEY=VALUE` pairs.
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     #[serde(default = "default_separator")]
//!     separator: String,
//! }
//! fn default_separator() -> String { "|".into() }
//!
//! /// Upper-cases each line and tags it with where it came from.
//! struct Shout { separator: String }
//!
//! impl Transform for Shout {
//!     type Config = Config;
//!
//!     fn init(config: Config) -> Result<Self, PluginError> {
//!         if config.separator.is_empty() {
//!             return Err(PluginError::invalid_config("separator must not be empty"));
//!         }
//!         Ok(Shout { separator: config.separator })
//!     }
//!
//!     fn process(&mut self, ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
//!         let line = record.value_str()?; // a non-UTF-8 value is rejected with its offset
//!         if line.is_empty() {
//!             return Err(Reject::new("empty line"));
//!         }
//!         let sep = &self.separator;
//!         out.push(Output::new(format!("{}{sep}{}{sep}{}", line.to_uppercase(), ctx.partition, record.offset)));
//!         Ok(())
//!     }
//! }
//!
//! // Exports the plugin when built for wasm32-wasip2; natively it only checks the impl.
//! sluice_sdk::export_transform!(Shout);
//!
//! // Unit-test the logic natively, through the same configuration path the host uses.
//! use sluice_sdk::testing;
//! let mut shout: Shout = testing::init(&[("separator", "/")]).unwrap();
//! let output = testing::run(&mut shout, &testing::context("lines", 2), vec![
//!     testing::record(7, "hello"),
//!     testing::record(8, ""),
//! ]).unwrap();
//! assert_eq!(output.values_utf8(), ["HELLO/2/7"]);
//! assert_eq!(output.rejections[0].offset, 8);
//! assert_eq!(output.rejections[0].reason, "empty line");
//! ```
//!
//! Build it for the host with `cargo build --release --target wasm32-wasip2` (the crate needs
//! `crate-type = ["cdylib", "rlib"]`), then `host run --plugin target/wasm32-wasip2/release/NAME.wasm`.
//!
//! # Kinds of plugin
//!
//! | trait | macro | the seeds' operation | `host run` needs |
//! | --- | --- | --- | --- |
//! | [`Transform`] | [`export_transform!`] | `map`, `filter`, `transform` | |
//! | [`Stateful`] | [`export_stateful!`] | `updateStateByKey`, `mapWithState` | `--checkpoint` (and `--state-timeout`) |
//! | [`Windowed`] | [`export_windowed!`] | `reduceByKeyAndWindow` | `--checkpoint`, `--window`, `--slide` |
//!
//! Keys, values and state travel as bytes through [`Codec`]: integers and strings as text,
//! any serde type through [`Json`]. [`testing`] runs each kind natively.
//!
//! # Replays repeat
//!
//! A batch interrupted by a crash runs again with the same records and the same batch time,
//! and inside the host `std::time::SystemTime::now()` reads that batch time
//! (`ctx.batch_time`), `Instant::now()` does not move during a call, and random
//! numbers (`getrandom`, `rand`) come from a stream seeded with the job, the batch time and
//! the partition. So a plugin that uses them produces the same outputs on a replay — keep it
//! that way by emitting in a defined order (a `BTreeMap` rather than a `HashMap`, whose order
//! depends on the instance). Jobs that need the real clock or randomness grant them with
//! `--allow-wall-clock` and `--allow-random`.

#![deny(missing_docs)]

pub mod config;
pub mod log;
mod stateful;
pub mod testing;
mod types;
mod windowed;

pub use stateful::{Codec, Emit, Json, Stateful};
pub use types::{BatchContext, BatchOutput, Header, Output, PluginError, PluginInfo, Record, Rejection};
pub use windowed::{Window, Windowed};

use std::fmt;

/// The generated component bindings. Plugin authors never need these; the export macro does.
#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        world: "transformer",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_transformer_world",
        default_bindings_module: "sluice_sdk::wit",
        additional_derives: [PartialEq, Eq],
    });

    /// Bindings of the stateful world, sharing the transform world's types.
    pub mod updater {
        wit_bindgen::generate!({
            world: "updater",
            path: "../wit",
            pub_export_macro: true,
            export_macro_name: "__export_updater_world",
            default_bindings_module: "sluice_sdk::wit::updater",
            additional_derives: [PartialEq, Eq],
            with: {
                "sluice:plugin/types@0.1.0": crate::wit::sluice::plugin::types,
                "sluice:plugin/host@0.1.0": crate::wit::sluice::plugin::host,
            },
        });
    }

    /// Bindings of the windowed world, sharing the other worlds' types.
    pub mod windower {
        wit_bindgen::generate!({
            world: "windower",
            path: "../wit",
            pub_export_macro: true,
            export_macro_name: "__export_windower_world",
            default_bindings_module: "sluice_sdk::wit::windower",
            additional_derives: [PartialEq, Eq],
            with: {
                "sluice:plugin/types@0.1.0": crate::wit::sluice::plugin::types,
                "sluice:plugin/host@0.1.0": crate::wit::sluice::plugin::host,
            },
        });
    }
}

/// A stateless batch transform: the plugin kind behind `host run --plugin`.
///
/// Implement [`init`](Transform::init) and [`process`](Transform::process); the SDK calls
/// `process` for every record of a partition task and gathers outputs and rejections. Override
/// [`process_batch`](Transform::process_batch) instead when the logic needs the whole batch at
/// once (sorting, per-batch aggregates).
pub trait Transform: Sized + 'static {
    /// Typed configuration, deserialized with serde from the job's `KEY=VALUE` pairs (see
    /// [`config`]). Use `()` for a plugin without configuration.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin from its configuration, once per instance. An error here refuses the
    /// job before any offset moves.
    fn init(config: Self::Config) -> Result<Self, PluginError>;

    /// Handles one record: push any number of outputs, or reject the record with a reason.
    /// A rejection is reported by the host with the record's offset; the rest of the batch
    /// goes on.
    fn process(&mut self, ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject>;

    /// Handles one partition task. The default calls [`process`](Transform::process) for each
    /// record in offset order. Returning an error fails the whole task (the host applies the
    /// job's failure policy and commits nothing past it); prefer per-record rejections.
    fn process_batch(&mut self, ctx: &BatchContext, records: Vec<Record>) -> Result<BatchOutput, PluginError> {
        let mut out = Outputs::with_capacity(records.len());
        let mut rejections = Vec::new();
        for record in records {
            let offset = record.offset;
            if let Err(reject) = self.process(ctx, record, &mut out) {
                rejections.push(Rejection { offset, reason: reject.reason });
            }
        }
        Ok(BatchOutput { outputs: out.records, rejections })
    }
}

/// Where [`Transform::process`] puts its results.
#[derive(Debug, Default)]
pub struct Outputs {
    records: Vec<Output>,
}

impl Outputs {
    /// An empty collection with room for `capacity` outputs.
    pub fn with_capacity(capacity: usize) -> Self {
        Outputs { records: Vec::with_capacity(capacity) }
    }

    /// Queues one output record for delivery.
    pub fn push(&mut self, output: Output) {
        self.records.push(output);
    }

    /// The outputs queued so far.
    pub fn as_slice(&self) -> &[Output] {
        &self.records
    }

    /// Takes the queued outputs.
    pub fn into_vec(self) -> Vec<Output> {
        self.records
    }
}

/// Why a record was refused. Converts from any error, so `?` works on parsing:
/// `let n: u32 = field.parse()?;` rejects the record with the parse error as its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    reason: String,
}

impl Reject {
    /// A rejection with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Reject { reason: reason.into() }
    }

    /// The reason reported to the host.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl<E: std::error::Error> From<E> for Reject {
    fn from(error: E) -> Self {
        Reject::new(error.to_string())
    }
}

/// Exports a [`Transform`] implementation as the plugin's component interface.
///
/// Use it once, at the crate root of the plugin. Built for `wasm32`, it generates the
/// component exports (`init`, `describe`, `process`), reporting the crate's package name and
/// version from `describe` (`export_transform!(T, name = "etl")` reports another name, for a
/// new build of an existing plugin). Built natively, it only checks that the type implements
/// [`Transform`], so the same crate runs its unit tests with plain `cargo test`.
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        $crate::export_transform!($plugin, name = env!("CARGO_PKG_NAME"));
    };
    ($plugin:ty, name = $name:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SluiceExport;

            ::std::thread_local! {
                static PLUGIN: $crate::__private::Slot<$plugin> = const { $crate::__private::Slot::new() };
            }

            impl $crate::wit::Guest for SluiceExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), $crate::PluginError> {
                    PLUGIN.with(|slot| slot.init(&config, <$plugin as $crate::Transform>::init))
                }

                fn describe() -> $crate::PluginInfo {
                    $crate::__describe!($name, 0)
                }
            }

            impl $crate::wit::exports::sluice::plugin::transform::Guest for SluiceExport {
                fn process(
                    ctx: $crate::BatchContext,
                    records: ::std::vec::Vec<$crate::Record>,
                ) -> ::std::result::Result<$crate::BatchOutput, $crate::PluginError> {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::Transform::process_batch(plugin, &ctx, records)))
                }
            }

    $crate::wit::__export_transformer_world!(SluiceExport with_types_in $crate::wit);
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn assert_transform<T: $crate::Transform>() {}
            let _ = assert_transform::<$plugin>;
        };
    };
}

/// Support for the export macros; not a public API.
#[doc(hidden)]
pub mod __private {
    use crate::PluginError;
    use std::cell::RefCell;

    pub use crate::stateful::glue::{migrate_states, process_keyed, update_groups};
    pub use crate::windowed::glue::{inverse_reduce_pairs, present_results, process_windowed, reduce_lists};

    /// Holds the plugin instance between calls. Components are single-threaded, so a
    /// thread-local cell is the whole of the synchronisation needed.
    pub struct Slot<T>(RefCell<Option<T>>);

    impl<T> Default for Slot<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<T> Slot<T> {
        /// An empty slot, filled by `init`.
        pub const fn new() -> Self {
            Slot(RefCell::new(None))
        }

        /// Parses the configuration and builds the plugin with `make`.
        pub fn init<C: serde::de::DeserializeOwned>(
            &self,
            config: &[(String, String)],
            make: impl FnOnce(C) -> Result<T, PluginError>,
        ) -> Result<(), PluginError> {
            let config = crate::config::from_pairs(config)?;
            *self.0.borrow_mut() = Some(make(config)?);
            Ok(())
        }

        /// Runs `f` on the initialised plugin.
        pub fn with<R>(&self, f: impl FnOnce(&mut T) -> Result<R, PluginError>) -> Result<R, PluginError> {
            match self.0.borrow_mut().as_mut() {
                Some(plugin) => f(plugin),
                None => Err(PluginError::failed("the host called the plugin before `init`")),
            }
        }
    }

    /// `describe` for a plugin crate: its package name and version.
    #[macro_export]
    #[doc(hidden)]
    macro_rules! __describe {
        ($schema:expr) => {
            $crate::__describe!(env!("CARGO_PKG_NAME"), $schema)
        };
        ($name:expr, $schema:expr) => {
            $crate::PluginInfo {
                name: ::std::string::String::from($name),
                version: ::std::string::String::from(env!("CARGO_PKG_VERSION")),
                state_schema_version: $schema,
            }
        };
    }
}
