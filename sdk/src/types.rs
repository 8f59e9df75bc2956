//! The contract's data types under plugin-author names, with helpers.
//!
//! These are the generated WIT types themselves (no conversion on the way in or out); this
//! module only names them for authors and adds constructors and accessors.

use crate::Reject;
use crate::wit::sluice::plugin::types;

/// One Kafka record of the partition task (WIT `input-record`).
pub type Record = types::InputRecord;
/// One partition's slice of one batch: topic, partition, offset range, batch time (WIT `batch-context`).
pub type BatchContext = types::BatchContext;
/// A record to deliver (WIT `output-record`).
pub type Output = types::OutputRecord;
/// A Kafka record header (WIT `header`).
pub type Header = types::Header;
/// A refused input record: offset and reason (WIT `rejection`).
pub type Rejection = types::Rejection;
/// Everything one partition task produced (WIT `batch-output`).
pub type BatchOutput = types::BatchOutput;
/// An error the plugin reports on purpose (WIT `plugin-error`).
pub type PluginError = types::PluginError;
/// The plugin's name and versions (WIT `plugin-info`).
pub type PluginInfo = types::PluginInfo;

impl Record {
    /// The value as UTF-8 text; a tombstone or invalid UTF-8 is a [`Reject`] with the reason.
    pub fn value_str(&self) -> Result<&str, Reject> {
        let value = self.value.as_deref().ok_or_else(|| Reject::new("record has no value (tombstone)"))?;
        std::str::from_utf8(value).map_err(|e| Reject::new(format!("value is not UTF-8: {e}")))
    }

    /// The key as UTF-8 text, if there is a key; invalid UTF-8 is a [`Reject`].
    pub fn key_str(&self) -> Result<Option<&str>, Reject> {
        match self.key.as_deref() {
            None => Ok(None),
            Some(key) => std::str::from_utf8(key).map(Some).map_err(|e| Reject::new(format!("key is not UTF-8: {e}"))),
        }
    }

    /// The value of the first header named `key`, if any.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.key == key).and_then(|h| h.value.as_deref())
    }
}

impl Output {
    /// An output with the given value, no key, to the job's default output topic.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Output { topic: None, key: None, value: Some(value.into()), headers: Vec::new() }
    }

    /// A tombstone (no value) for `key`: deletes the key on a compacted topic.
    pub fn tombstone(key: impl Into<Vec<u8>>) -> Self {
        Output { topic: None, key: Some(key.into()), value: None, headers: Vec::new() }
    }

    /// Sets the record key (Kafka partitions by it).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sends the record to `topic` instead of the job's default output topic.
    pub fn to_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Appends a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header { key: key.into(), value: Some(value.into()) });
        self
    }
}

impl BatchOutput {
    /// The output values as text (lossy for non-UTF-8), handy in tests.
    pub fn values_utf8(&self) -> Vec<String> {
        self.outputs
            .iter()
            .map(|o| o.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())
            .collect()
    }
}

impl PluginError {
    /// The configuration is unusable; say which key and why.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        PluginError::InvalidConfig(message.into())
    }

    /// The partition task failed as a whole.
    pub fn failed(message: impl Into<String>) -> Self {
        PluginError::Failed(message.into())
    }
}
