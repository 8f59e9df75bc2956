//! Windowed plugins: keyed aggregates over sliding windows, the seeds' `reduceByKeyAndWindow`.

use serde::de::DeserializeOwned;

use crate::{BatchContext, Codec, Emit, Output, PluginError, Record, Reject};

/// The batches a window result covers: those with a batch time in `(start, end]`, in
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The window's start, exclusive.
    pub start: i64,
    /// The window's end, inclusive: the batch time of the slide that emits it.
    pub end: i64,
}

/// A plugin that aggregates keyed values over sliding windows.
///
/// The job fixes window and slide (`host run --window 3s --slide 2s`). `process` emits keyed
/// values; the host folds them with [`reduce`](Windowed::reduce) into one pane per key and
/// batch, keeps the panes in its checkpoint, and at every slide reduces each key's panes inside
/// the window and hands the result to [`present`](Windowed::present). The seeds' windowed
/// word count:
///
/// ```
/// use sluice_sdk::{BatchContext, Emit, Output, PluginError, Record, Reject, Window, Windowed};
///
/// struct WindowedCount;
///
/// impl Windowed for WindowedCount {
///     type Config = ();
///     type Key = String;
///     type Value = u64;
///     const INVERTIBLE: bool = true;
///
///     fn init((): ()) -> Result<Self, PluginError> {
///         Ok(WindowedCount)
///     }
///
///     fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Emit<String, u64>) -> Result<(), Reject> {
///         for word in record.value_str()?.split_whitespace() {
///             out.emit(word.to_string(), 1);
///         }
///         Ok(())
///     }
///
///     fn reduce(&mut self, a: u64, b: u64) -> u64 {
///         a + b
///     }
///
///     fn inverse_reduce(&mut self, total: u64, part: u64) -> u64 {
///         total - part
///     }
///
///     fn present(&mut self, word: &String, count: u64, _window: Window) -> Output {
///         Output::new(format!("({word},{count})")).with_key(word.as_str())
///     }
/// }
///
/// sluice_sdk::export_windowed!(WindowedCount);
/// ```
pub trait Windowed: Sized + 'static {
    /// Typed configuration, as for [`Transform`](crate::Transform).
    type Config: DeserializeOwned;
    /// What values are grouped by.
    type Key: Codec + Ord + Clone;
    /// What `process` emits per key, and what panes and window results hold.
    type Value: Codec;
    /// Whether [`inverse_reduce`](Windowed::inverse_reduce) is implemented. With it the host
    /// updates each window from the previous one (add entering panes, remove leaving ones)
    /// instead of reducing every pane of the window.
    const INVERTIBLE: bool = false;

    /// Builds the plugin from its configuration, once per instance.
    fn init(config: Self::Config) -> Result<Self, PluginError>;

    /// Turns one record into keyed values, or rejects it.
    fn process(
        &mut self,
        ctx: &BatchContext,
        record: Record,
        out: &mut Emit<Self::Key, Self::Value>,
    ) -> Result<(), Reject>;

    /// Combines two values into one. Must be associative: the host groups the calls as suits it.
    fn reduce(&mut self, a: Self::Value, b: Self::Value) -> Self::Value;

    /// Undoes `reduce`: `inverse_reduce(reduce(a, b), b) == a`. Only called when
    /// [`INVERTIBLE`](Windowed::INVERTIBLE) is `true`.
    fn inverse_reduce(&mut self, total: Self::Value, part: Self::Value) -> Self::Value {
        let _ = (total, part);
        unreachable!(
            "inverse_reduce called on a plugin that does not set INVERTIBLE: {}",
            std::any::type_name::<Self>()
        )
    }

    /// The record delivered for one key's result of one window.
    fn present(&mut self, key: &Self::Key, value: Self::Value, window: Window) -> Output;
}

/// The wire-level glue between [`Windowed`] and the `windowed` WIT interface.
pub(crate) mod glue {
    use super::{Window, Windowed};
    use crate::stateful::glue::undecodable;
    use crate::wit::sluice::plugin::types::KeyedValue;
    use crate::{BatchContext, Codec, Output, PluginError};

    /// The whole partition task's `process`, as for stateful plugins.
    pub fn process_windowed<T: Windowed>(
        plugin: &mut T,
        ctx: &BatchContext,
        records: Vec<crate::Record>,
    ) -> Result<crate::wit::sluice::plugin::types::KeyedOutput, PluginError> {
        crate::stateful::glue::process_keyed(ctx, records, |ctx, record, out| plugin.process(ctx, record, out))
    }

    /// `reduce` over each list, left to right.
    pub fn reduce_lists<T: Windowed>(plugin: &mut T, lists: Vec<Vec<Vec<u8>>>) -> Result<Vec<Vec<u8>>, PluginError> {
        lists
            .into_iter()
            .map(|list| {
                let mut values = list.iter().map(|bytes| decode::<T>(bytes));
                let first =
                    values.next().ok_or_else(|| PluginError::failed("the host asked to reduce an empty list"))??;
                values.try_fold(first, |total, value| Ok(plugin.reduce(total, value?))).map(|total| total.encode())
            })
            .collect()
    }

    /// `inverse-reduce` over each pair, or `None` for a plugin without an inverse.
    pub fn inverse_reduce_pairs<T: Windowed>(
        plugin: &mut T,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Option<Vec<Vec<u8>>>, PluginError> {
        if !T::INVERTIBLE {
            return Ok(None);
        }
        pairs
            .into_iter()
            .map(|(total, part)| Ok(plugin.inverse_reduce(decode::<T>(&total)?, decode::<T>(&part)?).encode()))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `present` for one state partition's window results.
    pub fn present_results<T: Windowed>(
        plugin: &mut T,
        ctx: &BatchContext,
        results: Vec<KeyedValue>,
    ) -> Result<Vec<Output>, PluginError> {
        let window = Window { start: ctx.from_offset, end: ctx.until_offset };
        results
            .into_iter()
            .map(|result| {
                let key = T::Key::decode(&result.key).map_err(|e| undecodable("key", &result.key, &e))?;
                let value = T::Value::decode(&result.value).map_err(|e| undecodable("value", &result.key, &e))?;
                Ok(plugin.present(&key, value, window))
            })
            .collect()
    }

    fn decode<T: Windowed>(bytes: &[u8]) -> Result<T::Value, PluginError> {
        T::Value::decode(bytes).map_err(|e| PluginError::failed(format!("cannot decode a window value: {e}")))
    }
}

/// Exports a [`Windowed`] implementation as the plugin's component interface (world
/// `windower`). Natively it only checks the impl, so `cargo test` runs the plugin's tests.
#[macro_export]
macro_rules! export_windowed {
    ($plugin:ty) => {
        $crate::export_windowed!($plugin, state_schema_version = 1);
    };
    ($plugin:ty, state_schema_version = $schema:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use ::std::vec::Vec;
            use $crate::wit::sluice::plugin::types::{KeyedOutput, KeyedValue};

            struct SluiceExport;

            ::std::thread_local! {
                static PLUGIN: $crate::__private::Slot<$plugin> = const { $crate::__private::Slot::new() };
            }

            impl $crate::wit::windower::Guest for SluiceExport {
                fn init(
                    config: Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), $crate::PluginError> {
                    PLUGIN.with(|slot| slot.init(&config, <$plugin as $crate::Windowed>::init))
                }

                fn describe() -> $crate::PluginInfo {
                    $crate::__describe!($schema)
                }
            }

            impl $crate::wit::windower::exports::sluice::plugin::windowed::Guest for SluiceExport {
                fn process(
                    ctx: $crate::BatchContext,
                    records: Vec<$crate::Record>,
                ) -> ::std::result::Result<KeyedOutput, $crate::PluginError> {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::__private::process_windowed(plugin, &ctx, records)))
                }

                fn reduce(lists: Vec<Vec<Vec<u8>>>) -> ::std::result::Result<Vec<Vec<u8>>, $crate::PluginError> {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::__private::reduce_lists(plugin, lists)))
                }

                fn inverse_reduce(
                    pairs: Vec<(Vec<u8>, Vec<u8>)>,
                ) -> ::std::result::Result<Option<Vec<Vec<u8>>>, $crate::PluginError> {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::__private::inverse_reduce_pairs(plugin, pairs)))
                }

                fn present(
                    ctx: $crate::BatchContext,
                    results: Vec<KeyedValue>,
                ) -> ::std::result::Result<Vec<$crate::Output>, $crate::PluginError> {
                    PLUGIN.with(|slot| slot.with(|plugin| $crate::__private::present_results(plugin, &ctx, results)))
                }
            }

    $crate::wit::windower::__export_windower_world!(SluiceExport with_types_in $crate::wit::windower);
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn assert_windowed<T: $crate::Windowed>() {}
            let _ = assert_windowed::<$plugin>;
        };
    };
}
