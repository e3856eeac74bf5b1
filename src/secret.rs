//! A secret value (API key, bearer token) that never prints itself, and the bounded reading
//! of the files that hold secrets.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest secret file read: keys and tokens are a few hundred bytes at most.
pub(crate) const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

/// Holds a secret. `Debug` and `Display` show `***`; only [`Secret::expose`] gives the value,
/// so every place that sends a secret anywhere is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `candidate` in time that does not depend on where they differ, so a
    /// token cannot be guessed byte by byte from response times.
    pub(crate) fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
        for (i, x) in a.iter().enumerate() {
            diff |= x ^ b.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// Replaces every occurrence of this secret in `text` with `***`.
    pub(crate) fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_string();
        }
        text.replace(&self.0, "***")
    }
}

/// Why a file was not read. The text never quotes the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A device, FIFO, socket or directory: reading it could block or never end.
    #[error("is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("is not UTF-8 text")]
    NotText,
    #[error("is empty")]
    Empty,
    #[error("cannot be read: {}", io_reason(*.0))]
    Io(std::io::ErrorKind),
}

fn io_reason(kind: std::io::ErrorKind) -> String {
    match kind {
        std::io::ErrorKind::NotFound => "no such file".into(),
        other => other.to_string(),
    }
}

impl Secret {
    /// Reads a secret from the file at `path`, surrounding whitespace removed. Only a regular
    /// file of at most [`MAX_SECRET_FILE_BYTES`] is read, so `/dev/zero`, a FIFO without a
    /// writer or a directory give an error at once instead of a hang or gigabytes.
    pub(crate) fn from_file(path: &Path) -> Result<Secret, ReadError> {
        let text = read_bounded_text(path, MAX_SECRET_FILE_BYTES)?;
        match text.trim() {
            "" => Err(ReadError::Empty),
            value => Ok(Secret::new(value)),
        }
    }
}

/// Reads the regular file at `path` as UTF-8 text of at most `limit` bytes. The file type is
/// checked before opening (opening a FIFO for reading blocks until a writer appears), the
/// open does not block should the path be swapped for a FIFO meanwhile, and the opened file
/// is checked again.
pub(crate) fn read_bounded_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    let io = |e: std::io::Error| ReadError::Io(e.kind());
    regular_file(&std::fs::metadata(path).map_err(io)?, limit)?;
    let mut file = open_nonblocking(path).map_err(io)?;
    regular_file(&file.metadata().map_err(io)?, limit)?;
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that grew since the check.
    (&mut file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|_| ReadError::NotText)
}

fn regular_file(meta: &std::fs::Metadata, limit: u64) -> Result<(), ReadError> {
    let kind = meta.file_type();
    let name = if kind.is_file() {
        return if meta.len() > limit {
            Err(ReadError::TooLarge { limit })
        } else {
            Ok(())
        };
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(ReadError::NotRegular(name))
}

/// `O_NONBLOCK` of Linux on the architectures that share the generic value.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
))]
const O_NONBLOCK: i32 = 0o4000;
#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
)))]
const O_NONBLOCK: i32 = 0;

fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_compares_exactly() {
        let s = Secret::new("sk-abc");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert!(s.matches("sk-abc"));
        assert!(!s.matches("sk-abd"));
        assert!(!s.matches("sk-ab"));
        assert!(!s.matches("sk-abcd"));
        assert!(!s.matches(""));
        assert_eq!(s.redact("key=sk-abc;"), "key=***;");
    }

    #[test]
    fn a_secret_file_is_read_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "  sk-file-value\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "sk-file-value");
        std::fs::write(&path, " \n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap_err(), ReadError::Empty);
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap_err(), ReadError::NotText);
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'k'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let limit = MAX_SECRET_FILE_BYTES;
        assert_eq!(
            Secret::from_file(&big).unwrap_err(),
            ReadError::TooLarge { limit }
        );
        std::fs::write(&big, vec![b'k'; MAX_SECRET_FILE_BYTES as usize]).unwrap();
        assert_eq!(
            Secret::from_file(&big).unwrap().expose().len() as u64,
            MAX_SECRET_FILE_BYTES
        );
        assert_eq!(
            Secret::from_file(Path::new("/dev/zero")).unwrap_err(),
            ReadError::NotRegular("character device")
        );
        assert_eq!(
            Secret::from_file(dir.path()).unwrap_err(),
            ReadError::NotRegular("directory")
        );
        let missing = Secret::from_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing, ReadError::Io(std::io::ErrorKind::NotFound));
        assert_eq!(missing.to_string(), "cannot be read: no such file");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // No writer ever opens it: a blocking open would hang this test.
        assert_eq!(
            Secret::from_file(&fifo).unwrap_err(),
            ReadError::NotRegular("FIFO")
        );
        // Even past the type check, the open itself does not wait for a writer.
        let file = open_nonblocking(&fifo).unwrap();
        assert_eq!(
            regular_file(&file.metadata().unwrap(), MAX_SECRET_FILE_BYTES),
            Err(ReadError::NotRegular("FIFO"))
        );
    }
}
