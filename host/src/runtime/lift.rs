//! Results lifted from a plugin within a byte budget.
//!
//! The component ABI lets a plugin return many records that all point at one buffer in its
//! memory: 50,000 outputs aliasing one 1 MiB buffer are 50 GB once copied into the host, and
//! the copy happens after the plugin returned, outside its call deadline. So the host's copy
//! of every result is counted as it is made, before each allocation: the byte strings, texts
//! and lists of a result go through [`Bytes`], [`Text`] and [`List`], which charge their length
//! to the call's budget ([`within`]) and refuse to allocate past it. A call that goes over
//! fails with [`OutputTooLarge`], which the runtime reports as a `memory` failure.
//!
//! The types below mirror the contract's result types field for field (the derives check them
//! against the component's own types when an instance is made); the runtime converts them into
//! the generated bindings' types without copying.

use std::cell::RefCell;
use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};
use wasmtime::{Result, ValRaw, bail};

use super::bindings::{
    BatchOutput, Header, KeyUpdate, KeyedOutput, KeyedValue, OutputRecord, PluginError, Rejection, StateChange,
};

/// What the host takes from plugin calls: at most `per_call` bytes from one call, and at most
/// what is left of the batch's budget, shared by the batch's calls on every thread.
#[derive(Debug)]
pub struct OutputBudget {
    per_call: usize,
    batch_limit: usize,
    batch_left: AtomicUsize,
}

impl OutputBudget {
    pub fn new(per_call: usize, batch: usize) -> OutputBudget {
        OutputBudget { per_call, batch_limit: batch, batch_left: AtomicUsize::new(batch) }
    }

    /// A new batch: its calls share the whole batch budget again.
    pub fn reset(&self) {
        self.batch_left.store(self.batch_limit, Ordering::Relaxed);
    }
}

thread_local! {
    /// The call being lifted on this thread: what it may still take, what it took, and the
    /// batch budget it draws from; `None` outside a call.
    static CALL: RefCell<Option<Call>> = const { RefCell::new(None) };
}

struct Call {
    left: usize,
    taken: usize,
    budget: Arc<OutputBudget>,
}

/// A result larger than the host takes from one plugin call, or than is left of the batch's
/// budget.
#[derive(Debug, thiserror::Error)]
#[error("returned more than {limit} bytes ({what}); the host refused to copy the rest")]
pub struct OutputTooLarge {
    pub limit: usize,
    pub what: &'static str,
}

/// Runs `call` (which lifts a plugin's result on this thread) within `budget`. A call that
/// fails gives back to the batch what its result took.
pub fn within<T>(budget: &Arc<OutputBudget>, call: impl FnOnce() -> wasmtime::Result<T>) -> wasmtime::Result<T> {
    let limit = budget.per_call;
    let previous = CALL.with(|current| current.replace(Some(Call { left: limit, taken: 0, budget: budget.clone() })));
    let result = call();
    let finished = CALL.with(|current| current.replace(previous)).expect("set above");
    if result.is_err() {
        finished.budget.batch_left.fetch_add(finished.taken, Ordering::Relaxed);
    }
    result
}

/// Takes `bytes` from the call's and the batch's budgets, or fails without taking anything.
fn charge(bytes: usize) -> Result<()> {
    CALL.with(|current| {
        let mut current = current.borrow_mut();
        let Some(call) = current.as_mut() else { return Ok(()) };
        if bytes > call.left {
            let limit = call.budget.per_call;
            // The rest of the result is refused too, whatever its size.
            call.left = 0;
            bail!(OutputTooLarge { limit, what: "--max-output-bytes, for one plugin call" });
        }
        let batch = &call.budget.batch_left;
        if batch.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(bytes)).is_err() {
            call.left = 0;
            bail!(OutputTooLarge {
                limit: call.budget.batch_limit,
                what: "--max-batch-output-bytes, for all the batch's plugin calls together",
            });
        }
        call.left -= bytes;
        call.taken += bytes;
        Ok(())
    })
}

/// A list's length as its flat form carries it: `(pointer, length)`.
fn flat_length(src: &[ValRaw; 2]) -> usize {
    src[1].get_u32() as usize
}

/// A list's length as its memory form carries it: pointer, then length, little-endian.
fn memory_length(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[4..8].try_into().expect("a pointer pair is 8 bytes")) as usize
}

/// Implements the component traits of a newtype by delegating to the wrapped type, charging
/// `$cost(length)` to the budget before the wrapped type allocates.
macro_rules! bounded {
    ($name:ident($inner:ty), $cost:expr) => {
        // SAFETY: the same lowered form, ABI and type check as the wrapped type, which is what
        // lifting delegates to.
        unsafe impl ComponentType for $name {
            type Lower = [ValRaw; 2];
            const ABI: CanonicalAbiInfo = <$inner as ComponentType>::ABI;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
                <$inner as ComponentType>::typecheck(ty, types)
            }
        }

        // SAFETY: delegates to the wrapped type's lifting after a check that allocates nothing.
        unsafe impl Lift for $name {
            fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> Result<Self> {
                charge($cost(flat_length(src)))?;
                <$inner as Lift>::linear_lift_from_flat(cx, ty, src).map($name)
            }

            fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> Result<Self> {
                charge($cost(memory_length(bytes)))?;
                <$inner as Lift>::linear_lift_from_memory(cx, ty, bytes).map($name)
            }
        }
    };
}

/// A `list<u8>` lifted within the budget.
pub struct Bytes(pub Vec<u8>);
bounded!(Bytes(Vec<u8>), |length: usize| length);

/// A `string` lifted within the budget (a UTF-16 string's length counts twice, as decoded).
pub struct Text(pub String);
bounded!(Text(String), |length: usize| length.saturating_mul(2));

/// A `list<T>` lifted within the budget: the host's vector of `T` is charged before it is
/// allocated, and each element charges what it holds itself.
pub struct List<T>(pub Vec<T>);

// SAFETY: the same lowered form, ABI and type check as `Vec<T>`, which lifting delegates to.
unsafe impl<T: ComponentType> ComponentType for List<T> {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = <Vec<T> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        <Vec<T> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: delegates to `Vec<T>`'s lifting after a check that allocates nothing.
unsafe impl<T: Lift> Lift for List<T> {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> Result<Self> {
        charge(flat_length(src).saturating_mul(size_of::<T>()))?;
        <Vec<T> as Lift>::linear_lift_from_flat(cx, ty, src).map(List)
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> Result<Self> {
        charge(memory_length(bytes).saturating_mul(size_of::<T>()))?;
        <Vec<T> as Lift>::linear_lift_from_memory(cx, ty, bytes).map(List)
    }
}

/// `header`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedHeader {
    key: Text,
    value: Option<Bytes>,
}

/// `output-record`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedOutput {
    topic: Option<Text>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: List<LiftedHeader>,
}

/// `rejection`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedRejection {
    offset: i64,
    reason: Text,
}

/// `batch-output`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedBatchOutput {
    outputs: List<LiftedOutput>,
    rejections: List<LiftedRejection>,
}

/// `keyed-value`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedKeyedValue {
    key: Bytes,
    value: Bytes,
}

/// `keyed-output`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedKeyedOutput {
    values: List<LiftedKeyedValue>,
    outputs: List<LiftedOutput>,
    rejections: List<LiftedRejection>,
}

/// `state-change`.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum LiftedStateChange {
    #[component(name = "keep")]
    Keep,
    #[component(name = "set")]
    Set(Bytes),
    #[component(name = "remove")]
    Remove,
}

/// `key-update`.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedKeyUpdate {
    change: LiftedStateChange,
    outputs: List<LiftedOutput>,
}

/// `plugin-error`.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum LiftedPluginError {
    #[component(name = "invalid-config")]
    InvalidConfig(Text),
    #[component(name = "failed")]
    Failed(Text),
}

impl From<LiftedPluginError> for PluginError {
    fn from(error: LiftedPluginError) -> PluginError {
        match error {
            LiftedPluginError::InvalidConfig(Text(message)) => PluginError::InvalidConfig(message),
            LiftedPluginError::Failed(Text(message)) => PluginError::Failed(message),
        }
    }
}

impl From<LiftedOutput> for OutputRecord {
    fn from(output: LiftedOutput) -> OutputRecord {
        OutputRecord {
            topic: output.topic.map(|Text(topic)| topic),
            key: output.key.map(|Bytes(key)| key),
            value: output.value.map(|Bytes(value)| value),
            headers: output
                .headers
                .0
                .into_iter()
                .map(|header| Header { key: header.key.0, value: header.value.map(|Bytes(value)| value) })
                .collect(),
        }
    }
}

fn outputs(list: List<LiftedOutput>) -> Vec<OutputRecord> {
    list.0.into_iter().map(OutputRecord::from).collect()
}

fn rejections(list: List<LiftedRejection>) -> Vec<Rejection> {
    list.0.into_iter().map(|r| Rejection { offset: r.offset, reason: r.reason.0 }).collect()
}

impl From<LiftedBatchOutput> for BatchOutput {
    fn from(output: LiftedBatchOutput) -> BatchOutput {
        BatchOutput { outputs: outputs(output.outputs), rejections: rejections(output.rejections) }
    }
}

impl From<LiftedKeyedOutput> for KeyedOutput {
    fn from(output: LiftedKeyedOutput) -> KeyedOutput {
        KeyedOutput {
            values: output.values.0.into_iter().map(|v| KeyedValue { key: v.key.0, value: v.value.0 }).collect(),
            outputs: outputs(output.outputs),
            rejections: rejections(output.rejections),
        }
    }
}

impl From<LiftedKeyUpdate> for KeyUpdate {
    fn from(update: LiftedKeyUpdate) -> KeyUpdate {
        let change = match update.change {
            LiftedStateChange::Keep => StateChange::Keep,
            LiftedStateChange::Set(Bytes(bytes)) => StateChange::Set(bytes),
            LiftedStateChange::Remove => StateChange::Remove,
        };
        KeyUpdate { change, outputs: outputs(update.outputs) }
    }
}

/// Converts a lifted `list<list<u8>>`.
pub fn byte_lists(list: List<Bytes>) -> Vec<Vec<u8>> {
    list.0.into_iter().map(|Bytes(bytes)| bytes).collect()
}

/// Converts a lifted `list<key-update>`.
pub fn key_updates(list: List<LiftedKeyUpdate>) -> Vec<KeyUpdate> {
    list.0.into_iter().map(KeyUpdate::from).collect()
}

/// Converts a lifted `list<output-record>`.
pub fn output_list(list: List<LiftedOutput>) -> Vec<OutputRecord> {
    outputs(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_takes_at_most_its_budget_and_the_batchs() {
        let budget = Arc::new(OutputBudget::new(100, 150));
        let first: wasmtime::Result<()> = within(&budget, || {
            charge(60)?;
            let refused = charge(50).unwrap_err();
            assert!(refused.downcast_ref::<OutputTooLarge>().is_some_and(|e| e.limit == 100));
            assert!(charge(1).is_err(), "once over, the rest of the result is refused");
            Ok(())
        });
        assert!(first.is_ok());
        // 90 of the batch's 150 are left: a second call may not take its full 100.
        let second: wasmtime::Result<()> = within(&budget, || {
            let refused = charge(95).unwrap_err();
            assert!(refused.downcast_ref::<OutputTooLarge>().unwrap().what.contains("--max-batch-output-bytes"));
            Ok(())
        });
        assert!(second.is_ok());
        // A failed call gives back what it took.
        let failed: wasmtime::Result<()> = within(&budget, || {
            charge(80)?;
            bail!("trapped")
        });
        assert!(failed.is_err());
        assert_eq!(budget.batch_left.load(Ordering::Relaxed), 90);
        budget.reset();
        assert_eq!(budget.batch_left.load(Ordering::Relaxed), 150);
        assert!(charge(usize::MAX).is_ok(), "outside a call nothing is counted");
    }

    #[test]
    fn lengths_are_read_from_both_forms() {
        let flat = [ValRaw::u32(16), ValRaw::u32(1234)];
        assert_eq!(flat_length(&flat), 1234);
        let memory = [16, 0, 0, 0, 0xd2, 0x04, 0, 0];
        assert_eq!(memory_length(&memory), 1234);
    }
}
