//! Plugin calls in parallel: one thread per plugin instance, each instance used by one thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::runtime::{PluginInstance, TaskError};

/// Runs `call` for every item on the instances, at most one thread per instance. Results come
/// back in item order; the first failure (in item order) is returned instead.
pub fn run_parallel<T: Sync, R: Send>(
    instances: &mut [PluginInstance],
    items: &[T],
    call: impl Fn(&mut PluginInstance, &T) -> Result<R, TaskError> + Sync,
) -> Result<Vec<R>, TaskError> {
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
                    let failed = result.is_err();
                    *results[index].lock().expect("not poisoned") = Some(result);
                    if failed {
                        // A trapped instance is unusable; leave the remaining items to others.
                        break;
                    }
                }
            });
        }
    });
    // Items are taken in order, so every item without a result comes after a failed one and
    // the first error is returned before one is reached.
    results.into_iter().map_while(|result| result.into_inner().expect("not poisoned")).collect::<Result<Vec<_>, _>>()
}
