//! Records as Kafka holds them, and what the host can hand to a plugin.
//!
//! Kafka allows header names that are not UTF-8 (Go, C and Java producers may write any bytes),
//! while the plugin contract has `string` header keys. So a record is first read exactly as it
//! is, bytes everywhere ([`SourceRecord`]), and only then converted to the contract's
//! [`InputRecord`]. A record that cannot be converted is not a crash and not a silent drop: it
//! becomes an [`Unreadable`] record with its offset and reason, which the job's failure policy
//! logs or dead-letters like a plugin's rejection.

use std::ffi::c_void;
use std::fmt;

use rdkafka::Message as _;
use rdkafka::bindings as rdsys;
use rdkafka::message::BorrowedMessage;

use crate::runtime::{Header, InputRecord};

/// One Kafka header, as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    pub name: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// One record exactly as it was read: nothing is interpreted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    pub offset: i64,
    /// Milliseconds since the Unix epoch, if the record has a timestamp.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
}

/// A record the host could not hand to the plugin, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub record: SourceRecord,
    pub reason: String,
}

impl SourceRecord {
    /// Copies a record out of librdkafka's buffers. Headers are read through librdkafka's C
    /// API, because rdkafka's `Headers` accessors insist on UTF-8 names and panic otherwise.
    pub fn read(message: &BorrowedMessage<'_>) -> SourceRecord {
        SourceRecord {
            offset: message.offset(),
            // Kafka writes -1 for "no timestamp"; librdkafka reports it as a create time.
            timestamp: message.timestamp().to_millis().filter(|millis| *millis >= 0),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers: raw_headers(message),
        }
    }

    /// Bytes the record takes in memory, roughly: what batch bounds count.
    pub fn size(&self) -> usize {
        let headers: usize =
            self.headers.iter().map(|h| h.name.len() + h.value.as_ref().map_or(0, Vec::len) + 16).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers + 64
    }

    /// The record as the plugin contract carries it, or why it cannot be. Moves the bytes; a
    /// readable record is not copied.
    pub fn into_input(self) -> Result<InputRecord, Unreadable> {
        if let Some((index, header)) =
            self.headers.iter().enumerate().find(|(_, h)| std::str::from_utf8(&h.name).is_err())
        {
            let reason = format!(
                "header {index} has a name that is not UTF-8 ({}); the plugin contract carries header names as strings",
                Escaped(&header.name)
            );
            return Err(Unreadable { record: self, reason });
        }
        let headers = self
            .headers
            .into_iter()
            .map(|h| Header { key: String::from_utf8(h.name).expect("checked above"), value: h.value })
            .collect();
        Ok(InputRecord { offset: self.offset, timestamp: self.timestamp, key: self.key, value: self.value, headers })
    }
}

impl From<&InputRecord> for SourceRecord {
    fn from(record: &InputRecord) -> SourceRecord {
        SourceRecord {
            offset: record.offset,
            timestamp: record.timestamp,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record
                .headers
                .iter()
                .map(|h| RawHeader { name: h.key.clone().into_bytes(), value: h.value.clone() })
                .collect(),
        }
    }
}

/// Bytes shown as text where they are printable ASCII and as `\xNN` escapes elsewhere, so a
/// log line or error header never carries raw binary.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for chunk in self.0.escape_ascii() {
            fmt::Write::write_char(f, chunk as char)?;
        }
        f.write_str("\"")
    }
}

/// Every header of `message`, names and values as bytes.
fn raw_headers(message: &BorrowedMessage<'_>) -> Vec<RawHeader> {
    let mut headers_ptr: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is a live message for the borrow's lifetime; librdkafka owns the
    // headers it returns and keeps them alive with the message.
    let found = unsafe { rdsys::rd_kafka_message_headers(message.ptr(), &mut headers_ptr) };
    if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers_ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: as above; the pointer is non-null.
    let count = unsafe { rdsys::rd_kafka_header_cnt(headers_ptr) };
    let mut headers = Vec::with_capacity(count);
    for index in 0..count {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `index` is below the count; librdkafka fills the out-parameters with
        // pointers into its own buffer, valid while the message is.
        let error = unsafe { rdsys::rd_kafka_header_get_all(headers_ptr, index, &mut name, &mut value, &mut size) };
        if error != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka stores header names NUL-terminated; `value` spans `size` bytes.
        let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes().to_vec();
        let value =
            (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        headers.push(RawHeader { name, value });
    }
    headers
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arbitrary_record() -> impl Strategy<Value = SourceRecord> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
        let header = (bytes(), proptest::option::of(bytes())).prop_map(|(name, value)| RawHeader { name, value });
        (
            any::<i64>(),
            proptest::option::of(any::<i64>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2048)),
            proptest::option::of(bytes()),
            proptest::collection::vec(header, 0..6),
        )
            .prop_map(|(offset, timestamp, key, value, headers)| SourceRecord {
                offset,
                timestamp,
                key,
                value,
                headers,
            })
    }

    proptest! {
        /// Whatever a producer wrote, the conversion either hands the plugin exactly that record
        /// or refuses it with its offset and a reason: it never panics and never alters bytes.
        #[test]
        fn any_record_is_converted_exactly_or_refused_with_its_offset(record in arbitrary_record()) {
            let names_are_text = record.headers.iter().all(|h| std::str::from_utf8(&h.name).is_ok());
            match record.clone().into_input() {
                Ok(input) => {
                    prop_assert!(names_are_text);
                    prop_assert_eq!(SourceRecord::from(&input), record);
                }
                Err(unreadable) => {
                    prop_assert!(!names_are_text);
                    prop_assert_eq!(unreadable.record.offset, record.offset);
                    prop_assert!(unreadable.reason.contains("not UTF-8"));
                    prop_assert!(unreadable.reason.is_ascii(), "reasons travel in headers and logs");
                }
            }
        }
    }

    #[test]
    fn escaped_bytes_are_printable() {
        assert_eq!(Escaped(b"ok\xff\x00").to_string(), "\"ok\\xff\\x00\"");
    }
}
