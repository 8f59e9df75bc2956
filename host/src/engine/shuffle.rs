//! The shuffle of stateful and windowed batches: keyed values from every partition task,
//! grouped by key within the key's state partition.

use std::collections::BTreeMap;

use crate::checkpoint::state_partition;
use crate::runtime::KeyedValue;

/// One state partition's keys, in key order, each with its values.
pub type Groups = BTreeMap<Vec<u8>, Vec<Vec<u8>>>;

/// Groups `values` (each partition task's keyed values, in task order) by key, one map per
/// state partition. Equal keys meet whichever input partition they came from, with their
/// values in input partition order, then offset order.
pub fn shuffle(values: Vec<Vec<KeyedValue>>, partitions: u32) -> Vec<Groups> {
    let mut shuffled = vec![Groups::new(); partitions as usize];
    for value in values.into_iter().flatten() {
        let partition = state_partition(&value.key, partitions) as usize;
        shuffled[partition].entry(value.key).or_default().push(value.value);
    }
    shuffled
}
