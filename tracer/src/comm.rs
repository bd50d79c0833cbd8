//! A task's command name (`comm`), kept inline rather than in a `String`: one
//! comes with every event, and a `String` would be a heap allocation per event
//! (bench/notes.md has the profile).

use std::{fmt, ops::Deref};

use serde::{Serialize, Serializer};
use tracer_common::COMM_LEN;

/// At most `COMM_LEN - 1` bytes of UTF-8, as the kernel keeps it.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Comm {
    len: u8,
    bytes: [u8; COMM_LEN],
}

impl Comm {
    /// The name in a kernel `comm` buffer: up to its first NUL. Bytes that are
    /// not UTF-8 (a name set with `prctl(PR_SET_NAME)` can hold any) become
    /// `?`, one each, which keeps the name within its buffer, unlike U+FFFD.
    pub fn from_kernel(raw: &[u8; COMM_LEN]) -> Self {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        let mut comm = Self::default();
        for chunk in raw[..end].utf8_chunks() {
            comm.push(chunk.valid().as_bytes());
            if !chunk.invalid().is_empty() {
                comm.push(b"?");
            }
        }
        comm
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 sequences and `?` are ever pushed.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// Appends what fits, cutting only between characters.
    fn push(&mut self, bytes: &[u8]) {
        let start = usize::from(self.len);
        let mut take = bytes.len().min(COMM_LEN - 1 - start);
        while take < bytes.len() && (bytes[take] & 0xC0) == 0x80 {
            take -= 1;
        }
        self.bytes[start..start + take].copy_from_slice(&bytes[..take]);
        self.len += take as u8;
    }
}

/// For names that do not come from the kernel (a `/proc` comm file, tests):
/// cut to what the kernel would keep.
impl From<&str> for Comm {
    fn from(name: &str) -> Self {
        let mut comm = Self::default();
        comm.push(name.as_bytes());
        comm
    }
}

impl Deref for Comm {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for Comm {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Comm {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(bytes: &[u8]) -> [u8; COMM_LEN] {
        let mut raw = [0; COMM_LEN];
        raw[..bytes.len()].copy_from_slice(bytes);
        raw
    }

    #[test]
    fn a_kernel_name_ends_at_its_first_nul() {
        assert_eq!(Comm::from_kernel(&raw(b"curl\0junk")), "curl");
        assert_eq!(Comm::from_kernel(&raw(b"")), "");
        assert!(Comm::from_kernel(&raw(b"")).is_empty());
    }

    #[test]
    fn a_full_kernel_buffer_keeps_fifteen_bytes() {
        // The kernel NUL-terminates comm; a buffer without one is cut the same.
        let full = [b'a'; COMM_LEN];
        assert_eq!(Comm::from_kernel(&full).len(), COMM_LEN - 1);
        assert_eq!(
            Comm::from_kernel(&raw(b"kworker/u4:2-ev")),
            "kworker/u4:2-ev"
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_become_question_marks() {
        assert_eq!(Comm::from_kernel(&raw(b"a\xffb\xfe\xfd")), "a?b??");
        assert_eq!(Comm::from_kernel(&raw("café".as_bytes())), "café");
    }

    #[test]
    fn longer_names_are_cut_between_characters() {
        assert_eq!(Comm::from("a-very-long-process-name"), "a-very-long-pro");
        // 14 ASCII bytes, then a two-byte character that does not fit.
        assert_eq!(Comm::from("abcdefghijklmné"), "abcdefghijklmn");
    }

    #[test]
    fn serializes_and_formats_as_the_name() {
        let comm = Comm::from("nginx");
        assert_eq!(serde_json::to_string(&comm).unwrap(), "\"nginx\"");
        assert_eq!(comm.to_string(), "nginx");
        assert_eq!(format!("{comm:?}"), "\"nginx\"");
    }
}
