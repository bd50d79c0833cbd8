//! Types shared by the kernel programs (`tracer-ebpf`) and the userspace agent
//! (`tracer`). Everything that crosses the kernel/user boundary — ring-buffer
//! events, load-time globals, map keys and values — is defined here once,
//! `#[repr(C)]`, without padding holes, with its size pinned by a const assertion.
#![no_std]

pub mod config;
pub mod event;
pub mod names;
pub mod state;
pub mod tcp;

/// `TASK_COMM_LEN`: a process command name as the kernel stores it.
pub const COMM_LEN: usize = 16;

/// A command name as read from `task_struct.comm`, as two little-endian words,
/// with every byte after its first NUL cleared. Before 6.x the kernel copies a
/// new name (exec, prctl) with `strlcpy`, which does not pad: the bytes after the
/// NUL are what remains of the previous name, and a name compared or hashed
/// whole would differ from the same name padded with zeros.
#[inline(always)]
pub fn comm_through_nul(words: [u64; 2]) -> [u64; 2] {
    match (through_nul(words[0]), through_nul(words[1])) {
        (Some(first), _) => [first, 0],
        (None, Some(second)) => [words[0], second],
        (None, None) => words,
    }
}

/// The word up to its first zero byte, if it has one. A byte borrows in the
/// subtraction only if it is zero or a lower byte borrowed, so the lowest flagged
/// byte is exactly the first zero.
#[inline(always)]
fn through_nul(word: u64) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
    if zeros == 0 {
        return None;
    }
    // The flag is bit 8k+7 of the first zero byte k; `1 << 8k` minus one keeps
    // the bytes below it.
    let first_zero = zeros & zeros.wrapping_neg();
    Some(word & ((first_zero >> 7) - 1))
}

/// Implements `aya::Pod` for types that travel through maps and globals.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($ty:ty),* $(,)?) => {
        // SAFETY: every listed type is `#[repr(C)]`, `Copy`, made only of integers and
        // integer arrays, and has no padding (checked by the size assertions).
        $(unsafe impl aya::Pod for $ty {})*
    };
}
#[cfg(feature = "user")]
pub(crate) use impl_pod;

#[cfg(test)]
mod tests {
    use super::comm_through_nul;

    fn words(bytes: &[u8; 16]) -> [u64; 2] {
        [
            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            u64::from_le_bytes(bytes[8..].try_into().unwrap()),
        ]
    }

    #[test]
    fn leftovers_of_a_longer_previous_name_are_cleared() {
        assert_eq!(
            comm_through_nul(words(b"nginx\0ive-7121c\0")),
            words(b"nginx\0\0\0\0\0\0\0\0\0\0\0")
        );
        assert_eq!(
            comm_through_nul(words(b"keepalive-7\0\xff\x80\x01\0")),
            words(b"keepalive-7\0\0\0\0\0")
        );
    }

    #[test]
    fn names_without_leftovers_are_unchanged() {
        for name in [
            b"nginx\0\0\0\0\0\0\0\0\0\0\0",
            b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            b"exactly-15-char\0",
            b"\x80\xff\x01abcdefghijk\0\0",
        ] {
            assert_eq!(comm_through_nul(words(name)), words(name));
        }
        // A name of 16 bytes without a NUL (never stored by the kernel) stays.
        assert_eq!(
            comm_through_nul(words(b"sixteen-bytes-xx")),
            words(b"sixteen-bytes-xx")
        );
    }

    #[test]
    fn an_empty_name_clears_everything() {
        assert_eq!(comm_through_nul(words(b"\0leftover-names\0")), [0, 0]);
    }
}
