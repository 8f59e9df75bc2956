//! A plugin instance's batch functions (`process`, `update`, `migrate`, `reduce`,
//! `inverse-reduce`, `present`), called so that their results are lifted within the call's
//! output budget ([`super::lift`]). The generated bindings lift results without limit, so
//! these calls go through typed functions whose result types are the bounded mirrors; the
//! types are checked against the component once, when the instance is made.

use anyhow::{Context as _, Result};
use wasmtime::AsContextMut;
use wasmtime::component::{ComponentNamedList, Func, Instance, Lift, Lower, TypedFunc};

use super::PluginKind;
use super::bindings::{
    BatchContext, BatchOutput, InputRecord, KeyGroup, KeyUpdate, KeyedOutput, KeyedValue, OutputRecord, PluginError,
};
use super::lift::{
    Bytes, LiftedBatchOutput, LiftedKeyUpdate, LiftedKeyedOutput, LiftedOutput, LiftedPluginError, List, byte_lists,
    key_updates, output_list,
};

/// A call's outcome: a trap (or a refused lift) outside, the plugin's own error inside.
pub type Outcome<T> = wasmtime::Result<Result<T, PluginError>>;

type Process = (Result<LiftedBatchOutput, LiftedPluginError>,);
type KeyedProcess = (Result<LiftedKeyedOutput, LiftedPluginError>,);
type Update = (Result<List<LiftedKeyUpdate>, LiftedPluginError>,);
type ByteLists = (Result<List<Bytes>, LiftedPluginError>,);
type MaybeByteLists = (Result<Option<List<Bytes>>, LiftedPluginError>,);
type Present = (Result<List<LiftedOutput>, LiftedPluginError>,);

/// The batch functions of one instance, by world.
pub enum Exports {
    Transform { process: Func },
    Stateful { process: Func, update: Func, migrate: Func },
    Windowed { process: Func, reduce: Func, inverse_reduce: Func, present: Func },
}

impl Exports {
    /// Finds the functions of `kind`'s interface in `instance` and checks their types.
    pub fn find(mut store: impl AsContextMut, instance: &Instance, kind: PluginKind) -> Result<Exports> {
        let mut store = store.as_context_mut();
        let interface = match kind {
            PluginKind::Transform => "sluice:plugin/transform@0.1.0",
            PluginKind::Stateful => "sluice:plugin/stateful@0.1.0",
            PluginKind::Windowed => "sluice:plugin/windowed@0.1.0",
        };
        let exported = instance.get_export_index(&mut store, None, interface).context("no exported interface")?;
        let mut func = |name: &str| -> Result<Func> {
            let index = instance
                .get_export_index(&mut store, Some(&exported), name)
                .with_context(|| format!("{interface} exports no `{name}`"))?;
            instance.get_func(&mut store, index).with_context(|| format!("`{name}` of {interface} is not a function"))
        };
        let exports = match kind {
            PluginKind::Transform => Exports::Transform { process: func("process")? },
            PluginKind::Stateful => {
                Exports::Stateful { process: func("process")?, update: func("update")?, migrate: func("migrate")? }
            }
            PluginKind::Windowed => Exports::Windowed {
                process: func("process")?,
                reduce: func("reduce")?,
                inverse_reduce: func("inverse-reduce")?,
                present: func("present")?,
            },
        };
        exports.check(&store)?;
        Ok(exports)
    }

    /// Checks every function against the bounded result types, so calls need no check.
    fn check(&self, store: impl wasmtime::AsContext) -> Result<()> {
        let store = store.as_context();
        match self {
            Exports::Transform { process } => {
                process.typed::<(&BatchContext, &[InputRecord]), Process>(&store)?;
            }
            Exports::Stateful { process, update, migrate } => {
                process.typed::<(&BatchContext, &[InputRecord]), KeyedProcess>(&store)?;
                update.typed::<(&BatchContext, &[KeyGroup]), Update>(&store)?;
                migrate.typed::<(u32, &[Vec<u8>]), ByteLists>(&store)?;
            }
            Exports::Windowed { process, reduce, inverse_reduce, present } => {
                process.typed::<(&BatchContext, &[InputRecord]), KeyedProcess>(&store)?;
                reduce.typed::<(&[Vec<Vec<u8>>],), ByteLists>(&store)?;
                inverse_reduce.typed::<(&[(Vec<u8>, Vec<u8>)],), MaybeByteLists>(&store)?;
                present.typed::<(&BatchContext, &[KeyedValue]), Present>(&store)?;
            }
        }
        Ok(())
    }

    /// `process` of a transform: its outputs and rejections.
    pub fn process(
        &self,
        store: impl AsContextMut,
        ctx: &BatchContext,
        records: &[InputRecord],
    ) -> Option<Outcome<BatchOutput>> {
        let Exports::Transform { process } = self else { return None };
        Some(call::<_, LiftedBatchOutput, _>(*process, store, (ctx, records), BatchOutput::from))
    }

    /// `process` of a stateful or windowed plugin: keyed values, outputs and rejections.
    pub fn keyed_process(
        &self,
        store: impl AsContextMut,
        ctx: &BatchContext,
        records: &[InputRecord],
    ) -> Option<Outcome<KeyedOutput>> {
        let (Exports::Stateful { process, .. } | Exports::Windowed { process, .. }) = self else { return None };
        Some(call::<_, LiftedKeyedOutput, _>(*process, store, (ctx, records), KeyedOutput::from))
    }

    pub fn update(
        &self,
        store: impl AsContextMut,
        ctx: &BatchContext,
        groups: &[KeyGroup],
    ) -> Option<Outcome<Vec<KeyUpdate>>> {
        let Exports::Stateful { update, .. } = self else { return None };
        Some(call::<_, List<LiftedKeyUpdate>, _>(*update, store, (ctx, groups), key_updates))
    }

    pub fn migrate(&self, store: impl AsContextMut, from: u32, states: &[Vec<u8>]) -> Option<Outcome<Vec<Vec<u8>>>> {
        let Exports::Stateful { migrate, .. } = self else { return None };
        Some(call::<_, List<Bytes>, _>(*migrate, store, (from, states), byte_lists))
    }

    pub fn reduce(&self, store: impl AsContextMut, lists: &[Vec<Vec<u8>>]) -> Option<Outcome<Vec<Vec<u8>>>> {
        let Exports::Windowed { reduce, .. } = self else { return None };
        Some(call::<_, List<Bytes>, _>(*reduce, store, (lists,), byte_lists))
    }

    pub fn inverse_reduce(
        &self,
        store: impl AsContextMut,
        pairs: &[(Vec<u8>, Vec<u8>)],
    ) -> Option<Outcome<Option<Vec<Vec<u8>>>>> {
        let Exports::Windowed { inverse_reduce, .. } = self else { return None };
        Some(call::<_, Option<List<Bytes>>, _>(*inverse_reduce, store, (pairs,), |values: Option<List<Bytes>>| {
            values.map(byte_lists)
        }))
    }

    pub fn present(
        &self,
        store: impl AsContextMut,
        ctx: &BatchContext,
        results: &[KeyedValue],
    ) -> Option<Outcome<Vec<OutputRecord>>> {
        let Exports::Windowed { present, .. } = self else { return None };
        Some(call::<_, List<LiftedOutput>, _>(*present, store, (ctx, results), output_list))
    }
}

/// Calls `func` (checked against `Params -> (Result<L, plugin-error>,)` when the exports were
/// found) and converts its result with `convert`.
fn call<Params, L, T>(
    func: Func,
    mut store: impl AsContextMut,
    params: Params,
    convert: impl FnOnce(L) -> T,
) -> Outcome<T>
where
    Params: ComponentNamedList + Lower,
    L: Lift,
{
    // SAFETY: `Exports::check` type-checked this function with these parameter and result
    // types when the instance was made.
    let typed = unsafe { TypedFunc::<Params, (Result<L, LiftedPluginError>,)>::new_unchecked(func) };
    let (result,) = typed.call(store.as_context_mut(), params)?;
    Ok(result.map(convert).map_err(PluginError::from))
}
