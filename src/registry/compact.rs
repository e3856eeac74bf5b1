//! Compact storage for the registry's per-task values: a task id in 24 bytes without a heap
//! allocation for the usual shapes, and a small interning table for upstream status words.
//!
//! At a million tracked tasks every byte of a task is a megabyte of resident memory, and a
//! heap allocation costs its size plus 8 to 16 bytes of allocator overhead.

use std::collections::HashMap;
use std::fmt;

/// Longest id kept inline (without a heap allocation) when it is not a UUID.
const INLINE: usize = 22;
/// Length of a UUID in its canonical text form (`8-4-4-4-12` hex digits).
pub(crate) const UUID_LEN: usize = 36;
const DASHES: [usize; 4] = [8, 13, 18, 23];
const ULID_LEN: usize = 26;
const MAX_ULID_PREFIX: usize = 6;
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A task id. Every string has exactly one representation, so the derived `Eq` and `Hash`
/// agree with the string's.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum TaskId {
    /// A canonical UUID whose hex letters are all lowercase (or which has none), as 16 bytes.
    Uuid([u8; 16]),
    /// A canonical UUID with at least one hex letter, all of them uppercase.
    UuidUpper([u8; 16]),
    /// A short prefix and a canonical ULID (26 Crockford base32 digits, uppercase), as
    /// apimall writes its ids (`img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M`).
    Ulid {
        prefix_len: u8,
        prefix: [u8; MAX_ULID_PREFIX],
        bytes: [u8; 16],
    },
    /// Any other id of at most [`INLINE`] bytes.
    Short { len: u8, bytes: [u8; INLINE] },
    /// Anything longer.
    Long(Box<str>),
}

impl TaskId {
    pub(crate) fn new(id: &str) -> TaskId {
        if let Some((bytes, upper)) = parse_uuid(id) {
            return if upper {
                TaskId::UuidUpper(bytes)
            } else {
                TaskId::Uuid(bytes)
            };
        }
        if let Some((prefix, value)) = parse_prefixed_ulid(id) {
            let mut p = [0; MAX_ULID_PREFIX];
            p[..prefix.len()].copy_from_slice(prefix.as_bytes());
            return TaskId::Ulid {
                prefix_len: prefix.len() as u8,
                prefix: p,
                bytes: value.to_be_bytes(),
            };
        }
        if id.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            TaskId::Short {
                len: id.len() as u8,
                bytes,
            }
        } else {
            TaskId::Long(id.into())
        }
    }

    /// The id as text; UUIDs and ULIDs are written into `buf`.
    pub(crate) fn as_str<'a>(&'a self, buf: &'a mut [u8; UUID_LEN]) -> &'a str {
        match self {
            TaskId::Ulid {
                prefix_len,
                prefix,
                bytes,
            } => {
                let n = usize::from(*prefix_len);
                buf[..n].copy_from_slice(&prefix[..n]);
                let value = u128::from_be_bytes(*bytes);
                for i in 0..ULID_LEN {
                    let digit = (value >> (5 * (ULID_LEN - 1 - i))) & 31;
                    buf[n + i] = CROCKFORD[digit as usize];
                }
                std::str::from_utf8(&buf[..n + ULID_LEN]).expect("ASCII")
            }
            TaskId::Uuid(bytes) => format_uuid(bytes, b"0123456789abcdef", buf),
            TaskId::UuidUpper(bytes) => format_uuid(bytes, b"0123456789ABCDEF", buf),
            TaskId::Short { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("built from a str")
            }
            TaskId::Long(s) => s,
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str(&mut [0; UUID_LEN]))
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str(&mut [0; UUID_LEN]))
    }
}

/// Value of each byte as a hex digit, [`NOT_DIGIT`] for other bytes.
const HEX: [u8; 256] = {
    let mut t = [NOT_DIGIT; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};
/// Value of each byte as a Crockford base32 digit (uppercase only), or [`NOT_DIGIT`].
const BASE32: [u8; 256] = {
    let mut t = [NOT_DIGIT; 256];
    let mut i = 0;
    while i < 32 {
        t[CROCKFORD[i] as usize] = i as u8;
        i += 1;
    }
    t
};
const NOT_DIGIT: u8 = 0xff;
/// Where the two hex digits of each UUID byte start.
const UUID_DIGITS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// The 16 bytes of a canonical UUID and whether its letters are uppercase; `None` for
/// anything else, mixed case included (that keeps the text form exact).
fn parse_uuid(s: &str) -> Option<([u8; 16], bool)> {
    let s = s.as_bytes();
    if s.len() != UUID_LEN || DASHES.iter().any(|&i| s[i] != b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    let (mut lower, mut upper) = (false, false);
    for (byte, &i) in out.iter_mut().zip(&UUID_DIGITS) {
        let (a, b) = (s[i], s[i + 1]);
        let (hi, lo) = (HEX[usize::from(a)], HEX[usize::from(b)]);
        if hi == NOT_DIGIT || lo == NOT_DIGIT {
            return None;
        }
        // Valid digits: '0'-'9' < 'A'-'F' < 'a'-'f'.
        lower |= a >= b'a' || b >= b'a';
        upper |= (b'A'..=b'F').contains(&a) || (b'A'..=b'F').contains(&b);
        *byte = hi << 4 | lo;
    }
    if lower && upper {
        return None;
    }
    Some((out, upper))
}

/// A prefix of at most six ASCII bytes and a canonical ULID after it; `None` otherwise.
fn parse_prefixed_ulid(s: &str) -> Option<(&str, u128)> {
    if s.len() < ULID_LEN || s.len() > ULID_LEN + MAX_ULID_PREFIX || !s.is_ascii() {
        return None;
    }
    let (prefix, ulid) = s.split_at(s.len() - ULID_LEN);
    let mut value: u128 = 0;
    for (i, &c) in ulid.as_bytes().iter().enumerate() {
        let digit = BASE32[usize::from(c)];
        if digit == NOT_DIGIT {
            return None;
        }
        let digit = u128::from(digit);
        // The first digit carries 3 bits only (26 x 5 = 130 > 128).
        if i == 0 && digit > 7 {
            return None;
        }
        value = value << 5 | digit;
    }
    Some((prefix, value))
}

fn format_uuid<'a>(bytes: &[u8; 16], digits: &[u8; 16], buf: &'a mut [u8; UUID_LEN]) -> &'a str {
    let mut j = 0;
    for (n, b) in bytes.iter().enumerate() {
        if matches!(n, 4 | 6 | 8 | 10) {
            buf[j] = b'-';
            j += 1;
        }
        buf[j] = digits[usize::from(b >> 4)];
        buf[j + 1] = digits[usize::from(b & 0xf)];
        j += 2;
    }
    std::str::from_utf8(buf).expect("ASCII")
}

/// Upstream status words of one provider (`PROCESSING`, `completed`, ...): a handful of
/// distinct values shared by every task, so a task keeps a 2-byte index. Bounded: a
/// provider sending ever new words fills it, and further words are kept per task.
#[derive(Debug)]
pub(crate) struct Words {
    words: Vec<Box<str>>,
    index: HashMap<Box<str>, u16>,
}

/// Index meaning "not in the table": the word is kept with the task.
pub(crate) const WORD_OVERFLOW: u16 = u16::MAX;
const MAX_WORDS: usize = 1024;

impl Words {
    pub(crate) fn new() -> Self {
        let mut w = Words {
            words: Vec::new(),
            index: HashMap::new(),
        };
        w.intern("");
        w
    }

    /// Index of `word`, or [`WORD_OVERFLOW`] when the table is full.
    pub(crate) fn intern(&mut self, word: &str) -> u16 {
        if let Some(&i) = self.index.get(word) {
            return i;
        }
        if self.words.len() >= MAX_WORDS {
            return WORD_OVERFLOW;
        }
        let i = self.words.len() as u16;
        self.words.push(word.into());
        self.index.insert(word.into(), i);
        i
    }

    pub(crate) fn get(&self, i: u16) -> &str {
        self.words.get(usize::from(i)).map_or("", |w| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(id: &str) -> TaskId {
        let t = TaskId::new(id);
        assert_eq!(t.as_str(&mut [0; UUID_LEN]), id);
        assert_eq!(t.to_string(), id);
        t
    }

    #[test]
    fn ids_keep_their_exact_text() {
        assert!(matches!(
            round_trip("9db7d1ed-d1e5-4d11-9f3a-61f653b905ad"),
            TaskId::Uuid(_)
        ));
        assert!(matches!(
            round_trip("9DB7D1ED-D1E5-4D11-9F3A-61F653B905AD"),
            TaskId::UuidUpper(_)
        ));
        assert!(matches!(
            round_trip("12345678-1234-1234-1234-123456789012"),
            TaskId::Uuid(_)
        ));
        // Mixed case, wrong dashes, non-hex: kept as text.
        assert!(matches!(
            round_trip("9Db7d1ed-d1e5-4d11-9f3a-61f653b905ad"),
            TaskId::Long(_)
        ));
        assert!(matches!(
            round_trip("9db7d1ed-d1e5-4d11-9f3a-61f653b905a-"),
            TaskId::Long(_)
        ));
        assert!(matches!(
            round_trip("9db7d1ed0d1e5-4d11-9f3a-61f653b905ad"),
            TaskId::Long(_)
        ));
        assert!(matches!(
            round_trip("g9b7d1ed-d1e5-4d11-9f3a-61f653b905ad"),
            TaskId::Long(_)
        ));
        assert!(matches!(round_trip("a"), TaskId::Short { .. }));
        assert!(matches!(
            round_trip("img_01HQ9M7XJQ7PZ3GQ9F"),
            TaskId::Short { .. }
        ));
        assert!(matches!(
            round_trip("img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M"),
            TaskId::Ulid { .. }
        ));
        assert!(matches!(
            round_trip("01HQ9M7XJQ7PZ3GQ9F6C5W3N2M"),
            TaskId::Ulid { .. }
        ));
        assert!(matches!(
            round_trip("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"),
            TaskId::Ulid { .. }
        ));
        // Lowercase, an I, a first digit past 7, a long prefix: kept as text.
        for id in [
            "img_01hq9m7xjq7pz3gq9f6c5w3n2m",
            "img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2I",
            "img_81HQ9M7XJQ7PZ3GQ9F6C5W3N2M",
            "images_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M",
        ] {
            assert!(matches!(round_trip(id), TaskId::Long(_)), "{id}");
        }
        round_trip("");
        assert_eq!(std::mem::size_of::<TaskId>(), 24);
    }

    #[test]
    fn equal_text_is_equal_id() {
        let a = TaskId::new("9db7d1ed-d1e5-4d11-9f3a-61f653b905ad");
        let b = TaskId::new("9db7d1ed-d1e5-4d11-9f3a-61f653b905ad");
        let upper = TaskId::new("9DB7D1ED-D1E5-4D11-9F3A-61F653B905AD");
        assert_eq!(a, b);
        assert_ne!(a, upper, "ids are case-sensitive");
    }

    #[test]
    fn words_are_bounded() {
        let mut w = Words::new();
        assert_eq!(w.intern(""), 0);
        let p = w.intern("PROCESSING");
        assert_eq!(w.intern("PROCESSING"), p);
        assert_eq!(w.get(p), "PROCESSING");
        for i in 0..2000 {
            w.intern(&format!("w{i}"));
        }
        assert_eq!(w.intern("new"), WORD_OVERFLOW);
        assert_eq!(w.get(p), "PROCESSING");
    }
}
