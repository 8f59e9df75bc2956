//! Stateful plugins: keyed state across batches, the seeds' `updateStateByKey`.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{BatchContext, Output, PluginError, Record, Reject};

/// How keys, values and state travel as bytes. Numbers and text are stored as readable text
/// (so `host checkpoint inspect` shows them as they are); wrap any serde type in [`Json`].
pub trait Codec: Sized {
    /// The bytes stored for this value.
    fn encode(&self) -> Vec<u8>;
    /// The value back from its bytes, or why they are not one.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

macro_rules! text_codec {
    ($($ty:ty),*) => {$(
        impl Codec for $ty {
            fn encode(&self) -> Vec<u8> {
                self.to_string().into_bytes()
            }
            fn decode(bytes: &[u8]) -> Result<Self, String> {
                let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
                text.parse().map_err(|e| format!("{text:?} is not a {}: {e}", stringify!($ty)))
            }
        }
    )*};
}

text_codec!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, String);

impl Codec for Vec<u8> {
    fn encode(&self) -> Vec<u8> {
        self.clone()
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        Ok(bytes.to_vec())
    }
}

/// Any serde type as state or value, stored as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Json<T>(pub T);

impl<T: Serialize + DeserializeOwned> Codec for Json<T> {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("serializing plain data to JSON cannot fail")
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map(Json).map_err(|e| e.to_string())
    }
}

/// A plugin that keeps state per key across batches.
///
/// `process` turns each record into keyed values; the host groups all of a batch's values by
/// key (across every input partition) and calls `update` with each key's new values and its
/// prior state. A word count, as in the seeds' `Option(seq.sum + option.getOrElse(0))`:
///
/// ```
/// use sluice_sdk::{BatchContext, Emit, Outputs, PluginError, Record, Reject, Stateful};
///
/// struct WordCount;
///
/// impl Stateful for WordCount {
///     type Config = ();
///     type Key = String;
///     type Value = u64;
///     type State = u64;
///
///     fn init((): ()) -> Result<Self, PluginError> {
///         Ok(WordCount)
///     }
///
///     fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, u64>) -> Result<(), Reject> {
///         for word in record.value_str()?.split_whitespace() {
///             out.emit(word.to_string(), 1);
///         }
///         Ok(())
///     }
///
///     fn update(&mut self, _key: &String, values: Vec<u64>, state: Option<u64>, _out: &mut Outputs) -> Option<u64> {
///         Some(values.iter().sum::<u64>() + state.unwrap_or(0))
///     }
/// }
///
/// sluice_sdk::export_stateful!(WordCount);
///
/// use sluice_sdk::testing;
/// let mut plugin = WordCount;
/// let mut state = std::collections::BTreeMap::new();
/// testing::run_stateful(&mut plugin, &mut state, vec![testing::record(0, "a b a")]).unwrap();
/// testing::run_stateful(&mut plugin, &mut state, vec![testing::record(1, "b")]).unwrap();
/// assert_eq!(state, [("a".to_string(), 2), ("b".to_string(), 2)].into());
/// ```
pub trait Stateful: Sized + 'static {
    /// Typed configuration, as for [`Transform`](crate::Transform).
    type Config: DeserializeOwned;
    /// What state is kept per (usually `String`).
    type Key: Codec + Ord + Clone;
    /// What `process` emits per key.
    type Value: Codec;
    /// The state kept per key.
    type State: Codec;

    /// Builds the plugin from its configuration, once per instance.
    fn init(config: Self::Config) -> Result<Self, PluginError>;

    /// Turns one record into keyed values (and, optionally, direct outputs), or rejects it.
    fn process(
        &mut self,
        ctx: &BatchContext,
        record: Record,
        out: &mut Emit<Self::Key, Self::Value>,
    ) -> Result<(), Reject>;

    /// A key's new state from its new values and prior state: `Some` keeps it, `None` removes
    /// it. Push outputs to `out` to deliver them (e.g. the new running total).
    fn update(
        &mut self,
        key: &Self::Key,
        values: Vec<Self::Value>,
        state: Option<Self::State>,
        out: &mut crate::Outputs,
    ) -> Option<Self::State>;

    /// Called instead of `update` for a key that has had no new values for the job's
    /// `--state-timeout` (Spark's `mapWithState` timeout), with its last state. The state is
    /// removed afterwards; push outputs to `out` to deliver a final result. The default does
    /// nothing.
    fn timeout(&mut self, key: &Self::Key, state: Self::State, out: &mut crate::Outputs) {
        let _ = (key, state, out);
    }

    /// Decodes state written by an older state schema version of this plugin (see
    /// [`export_stateful!`]'s `state_schema_version`), for a plugin that changed its encoding.
    /// The default migrates nothing: an old state is an error naming its version.
    fn migrate(from_version: u32, bytes: &[u8]) -> Result<Self::State, String> {
        let _ = bytes;
        Err(format!("this plugin cannot migrate state from schema version {from_version}"))
    }
}

/// Where [`Stateful::process`] puts keyed values and direct outputs.
pub struct Emit<K, V> {
    pub(crate) values: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) outputs: Vec<Output>,
    _types: std::marker::PhantomData<fn(K, V)>,
}

impl<K: Codec, V: Codec> Emit<K, V> {
    pub(crate) fn new() -> Self {
        Emit { values: Vec::new(), outputs: Vec::new(), _types: std::marker::PhantomData }
    }

    /// Emits one value for `key`, to be grouped and passed to [`Stateful::update`].
    pub fn emit(&mut self, key: K, value: V) {
        self.values.push((key.encode(), value.encode()));
    }

    /// Delivers a record right away, without going through state.
    pub fn output(&mut self, output: Output) {
        self.outputs.push(output);
    }
}

impl<K: Codec, V: Codec> Default for Emit<K, V> {
    /// An empty `Emit`, for calling `process` directly in a plugin's tests.
    fn default() -> Self {
        Emit::new()
    }
}

impl<K, V> fmt::Debug for Emit<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emit").field("values", &self.values.len()).field("outputs", &self.outputs.len()).finish()
    }
}

/// The wire-level glue between [`Stateful`] and the `stateful` WIT interface.
pub(crate) mod glue {
    use super::{Codec, Emit, Stateful};
    use crate::wit::sluice::plugin::types::{KeyedOutput, KeyedValue};
    use crate::wit::updater::exports::sluice::plugin::stateful::{KeyGroup, KeyUpdate, StateChange};
    use crate::{BatchContext, Outputs, PluginError, Record, Rejection};

    /// `process` for a whole partition task of a stateful or windowed plugin, calling `each`
    /// per record.
    pub fn process_keyed<K: Codec, V: Codec>(
        ctx: &BatchContext,
        records: Vec<Record>,
        mut each: impl FnMut(&BatchContext, Record, &mut Emit<K, V>) -> Result<(), crate::Reject>,
    ) -> Result<KeyedOutput, PluginError> {
        let mut emit = Emit::<K, V>::new();
        let mut rejections = Vec::new();
        for record in records {
            let offset = record.offset;
            if let Err(reject) = each(ctx, record, &mut emit) {
                rejections.push(Rejection { offset, reason: reject.reason().to_string() });
            }
        }
        let values = emit.values.into_iter().map(|(key, value)| KeyedValue { key, value }).collect();
        Ok(KeyedOutput { values, outputs: emit.outputs, rejections })
    }

    /// `update` for one state partition's groups. Bytes that do not decode fail the task,
    /// naming the key: state written by an incompatible encoding must not be overwritten.
    pub fn update_groups<T: Stateful>(plugin: &mut T, groups: Vec<KeyGroup>) -> Result<Vec<KeyUpdate>, PluginError> {
        let mut updates = Vec::with_capacity(groups.len());
        for group in groups {
            let key = T::Key::decode(&group.key).map_err(|e| undecodable("key", &group.key, &e))?;
            let values = group
                .values
                .iter()
                .map(|value| T::Value::decode(value).map_err(|e| undecodable("value", &group.key, &e)))
                .collect::<Result<Vec<_>, _>>()?;
            let state = match &group.state {
                Some(bytes) => Some(T::State::decode(bytes).map_err(|e| undecodable("state", &group.key, &e))?),
                None => None,
            };
            let mut out = Outputs::default();
            if group.timing_out {
                if let Some(state) = state {
                    plugin.timeout(&key, state, &mut out);
                }
                updates.push(KeyUpdate { change: StateChange::Remove, outputs: out.into_vec() });
                continue;
            }
            let change = match plugin.update(&key, values, state, &mut out) {
                None => StateChange::Remove,
                Some(state) => {
                    let bytes = state.encode();
                    if group.state.as_deref() == Some(bytes.as_slice()) {
                        StateChange::Keep
                    } else {
                        StateChange::Set(bytes)
                    }
                }
            };
            updates.push(KeyUpdate { change, outputs: out.into_vec() });
        }
        Ok(updates)
    }

    /// `migrate` for a list of states of one old schema version.
    pub fn migrate_states<T: Stateful>(from_version: u32, states: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, PluginError> {
        states
            .iter()
            .map(|bytes| {
                T::migrate(from_version, bytes).map(|state| state.encode()).map_err(|error| {
                    PluginError::failed(format!(
                        "cannot migrate state {:?} from schema version {from_version}: {error}",
                        String::from_utf8_lossy(bytes)
                    ))
                })
            })
            .collect()
    }

    pub(crate) fn undecodable(what: &str, key: &[u8], error: &str) -> PluginError {
        PluginError::failed(format!("cannot decode the {what} of key {:?}: {error}", String::from_utf8_lossy(key)))
    }
}

/// Exports a [`Stateful`] implementation as the plugin's component interface (world
/// `updater`). Natively it only checks the impl, so `cargo test` runs the plugin's tests.
#[macro_export]
macro_rules! export_stateful {
    ($plugin:ty) => {
        $crate::export_stateful!($plugin, name = env!("CARGO_PKG_NAME"), state_schema_version = 1);
    };
    ($plugin:ty, state_schema_version = $schema:expr) => {
        $crate::export_stateful!($plugin, name = env!("CARGO_PKG_NAME"), state_schema_version = $schema);
    };
    ($plugin:ty, name = $name:expr, state_schema_version = $schema:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SluiceExport;

            ::std::thread_local! {
                static PLUGIN: $crate::__private::Slot<$plugin> = const { $crate::__private::Slot::new() };
            }

            impl $crate::wit::updater::Guest for SluiceExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), $crate::PluginError> {
                    PLUGIN.with(|slot| slot.init(&config, <$plugin as $crate::Stateful>::init))
                }

                fn describe() -> $crate::PluginInfo {
                    $crate::__describe!($name, $schema)
                }
            }

            impl $crate::wit::updater::exports::sluice::plugin::stateful::Guest for SluiceExport {
                fn migrate(
                    from_version: u32,
                    states: ::std::vec::Vec<::std::vec::Vec<u8>>,
                ) -> ::std::result::Result<::std::vec::Vec<::std::vec::Vec<u8>>, $crate::PluginError> {
                    $crate::__private::migrate_states::<$plugin>(from_version, states)
                }

                fn process(
                    ctx: $crate::BatchContext,
                    records: ::std::vec::Vec<$crate::Record>,
                ) -> ::std::result::Result<$crate::wit::sluice::plugin::types::KeyedOutput, $crate::PluginError>
                {
                    PLUGIN.with(|slot| {
                        slot.with(|plugin| {
                            $crate::__private::process_keyed(&ctx, records, |ctx, record, out| {
                                <$plugin as $crate::Stateful>::process(plugin, ctx, record, out)
                            })
                        })
                    })
                }

                fn update(
                    _ctx: $crate::BatchContext,
                    groups: ::std::vec::Vec<$crate::wit::updater::exports::sluice::plugin::stateful::KeyGroup>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::wit::updater::exports::sluice::plugin::stateful::KeyUpdate>,
                    $crate::PluginError,
                > {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::__private::update_groups(plugin, groups)))
                }
            }

    $crate::wit::updater::__export_updater_world!(SluiceExport with_types_in $crate::wit::updater);
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn assert_stateful<T: $crate::Stateful>() {}
            let _ = assert_stateful::<$plugin>;
        };
    };
}
