//! Plugin calls in parallel: one thread per plugin instance, each instance used by one thread.
//! An instance whose call trapped is replaced by a fresh one before its next call.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::runtime::{FailureKind, PluginInstance, PluginRuntime, TaskError};

/// Runs `call` for every item on the instances, at most one thread per instance, and returns
/// every item's result in item order.
pub fn run_each<T: Sync, R: Send>(
    runtime: &PluginRuntime,
    instances: &mut [PluginInstance],
    items: &[T],
    call: impl Fn(&mut PluginInstance, &T) -> Result<R, TaskError> + Sync,
) -> Vec<Result<R, TaskError>> {
    let next_item = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<R, TaskError>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for instance in instances.iter_mut().take(items.len()) {
            let (next_item, results, call) = (&next_item, &results, &call);
            scope.spawn(move || {
                loop {
                    let index = next_item.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(index) else { break };
                    let result = call(instance, item);
                    let poisoned = result.as_ref().is_err_and(TaskError::poisons_instance);
                    *results[index].lock().expect("not poisoned") = Some(result);
                    if poisoned {
                        match runtime.instantiate() {
                            Ok(fresh) => *instance = fresh,
                            Err(error) => {
                                tracing::error!("cannot replace a trapped plugin instance: {error:#}");
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|result| {
            result.into_inner().expect("not poisoned").unwrap_or_else(|| {
                Err(TaskError {
                    kind: FailureKind::Trap,
                    plugin: runtime.identity().info.name.clone(),
                    task: "a queued task".into(),
                    message: "not run: no plugin instance could be made after a trap".into(),
                })
            })
        })
        .collect()
}

/// As [`run_each`], failing with the first error in item order.
pub fn run_parallel<T: Sync, R: Send>(
    runtime: &PluginRuntime,
    instances: &mut [PluginInstance],
    items: &[T],
    call: impl Fn(&mut PluginInstance, &T) -> Result<R, TaskError> + Sync,
) -> Result<Vec<R>, TaskError> {
    run_each(runtime, instances, items, call).into_iter().collect()
}
