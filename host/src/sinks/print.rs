//! The print sink: Spark's `DStream.print(n)` for a batch's outputs.

use std::io::Write as _;

use anyhow::{Context as _, Result};

use crate::runtime::OutputRecord;

/// Prints the first `limit` outputs of each batch under a header naming the batch time.
pub struct PrintSink {
    limit: usize,
}

impl PrintSink {
    pub fn new(limit: usize) -> PrintSink {
        PrintSink { limit }
    }

    pub fn print(&mut self, batch_time: i64, outputs: &[OutputRecord]) -> Result<()> {
        let mut text = String::new();
        render(&mut text, batch_time, outputs, self.limit);
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write to stdout")
    }
}

/// The exact text `DStream.print()` writes: a ruled header, one line per output value (UTF-8,
/// lossily), `...` when the batch has more than `limit` outputs, and a blank line.
fn render(text: &mut String, batch_time: i64, outputs: &[OutputRecord], limit: usize) {
    const RULE: &str = "-------------------------------------------";
    text.push_str(&format!("{RULE}\nTime: {batch_time} ms\n{RULE}\n"));
    for output in outputs.iter().take(limit) {
        match &output.value {
            Some(value) => text.push_str(&String::from_utf8_lossy(value)),
            None => text.push_str("null"),
        }
        text.push('\n');
    }
    if outputs.len() > limit {
        text.push_str("...\n");
    }
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(value: &str) -> OutputRecord {
        OutputRecord { topic: None, key: None, value: Some(value.as_bytes().to_vec()), headers: vec![] }
    }

    #[test]
    fn prints_like_dstream_print() {
        let mut text = String::new();
        render(&mut text, 1000, &[output("a"), output("b"), output("c")], 2);
        assert_eq!(
            text,
            "-------------------------------------------\nTime: 1000 ms\n-------------------------------------------\na\nb\n...\n\n"
        );
    }

    #[test]
    fn an_empty_batch_prints_its_header() {
        let mut text = String::new();
        render(&mut text, 2000, &[], 10);
        assert!(text.starts_with("-------------------------------------------\nTime: 2000 ms\n"));
        assert!(text.ends_with("-------------------------------------------\n\n"));
    }
}
