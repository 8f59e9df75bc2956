//! The shuffle of stateful and windowed batches: keyed values from every partition task,
//! grouped by key within the key's state partition.

use std::collections::{BTreeMap, HashMap};

use crate::checkpoint::state_partition;
use crate::runtime::KeyedValue;

/// One state partition's keys, in key order, each with its values.
pub type Groups = BTreeMap<Vec<u8>, Vec<Vec<u8>>>;

/// Groups `values` (each partition task's keyed values, in task order) by key, one map per
/// state partition. Equal keys meet whichever input partition they came from, with their
/// values in input partition order, then offset order.
pub fn shuffle(values: Vec<Vec<KeyedValue>>, partitions: u32) -> Vec<Groups> {
    // Grouped by hash first and ordered once at the end: a batch has many values per key
    // (a word count's every occurrence), and an ordered insert per value compared keys
    // ~17 times each at 100k keys (docs/BENCHMARKS.md).
    let mut grouped: Vec<HashMap<Vec<u8>, Vec<Vec<u8>>>> = vec![HashMap::new(); partitions as usize];
    for value in values.into_iter().flatten() {
        let partition = state_partition(&value.key, partitions) as usize;
        grouped[partition].entry(value.key).or_default().push(value.value);
    }
    // Collecting into a BTreeMap sorts once and builds the tree in bulk.
    grouped.into_iter().map(|groups| groups.into_iter().collect()).collect()
}
