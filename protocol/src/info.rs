//! The `name:value` text of a worker's `stats` and `status` answers: one pair per line, each
//! ended by `\r\n` (the format of Redis' INFO). Workers write it with [`Info`]; the
//! orchestrator reads it with [`get`] and [`pairs`].

use std::fmt::{Display, Write};

/// Builds an info text, a line at a time.
#[derive(Debug, Default, Clone)]
pub struct Info(String);

impl Info {
    pub fn new() -> Info {
        Info::default()
    }

    /// Appends `name:value`.
    pub fn add(&mut self, name: &str, value: impl Display) -> &mut Info {
        let _ = write!(self.0, "{name}:{value}\r\n");
        self
    }

    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from(self.0)
    }
}

/// Every `(name, value)` in `text`, values trimmed; lines without a `:` are skipped.
pub fn pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k, v.trim()))
}

/// The value of `name` in `text`.
pub fn get<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    pairs(text).find(|(k, _)| *k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_back() {
        let mut info = Info::new();
        info.add("keys", 3)
            .add("ratio", format_args!("{:.2}", 2.5))
            .add("error", "");
        let bytes = info.into_bytes();
        assert_eq!(&bytes[..], b"keys:3\r\nratio:2.50\r\nerror:\r\n");
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(get(text, "keys"), Some("3"));
        assert_eq!(get(text, "ratio"), Some("2.50"));
        assert_eq!(get(text, "error"), Some(""));
        assert_eq!(get(text, "key"), None, "whole names only");
        assert_eq!(pairs(text).count(), 3);
    }
}
