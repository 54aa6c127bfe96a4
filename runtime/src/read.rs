//! Reading the files a user names, with bounded memory and no hangs.
//!
//! `std::fs::read` trusts the path: `/dev/zero` grows a buffer until the kernel kills the process,
//! a FIFO named `x.jpg` blocks `open` forever, and a 5 GB file named `.jpg` costs 5 GB. Every file
//! graft reads whole (images, backbones and their external data, label lists, cache files) goes
//! through [`read_regular`] instead: the path must name a regular file (checked with `stat`
//! before it is opened, so a FIFO is never opened), its size must be within a limit given by the
//! caller, and the read itself stops one byte past the limit in case the file grows meanwhile.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Default largest image file read: 256 MiB, far above any photo (a 100-megapixel JPEG is about
/// 30 MB) and far below what hurts a 1 GB edge box. `GRAFT_MAX_IMAGE_BYTES` overrides it.
pub const DEFAULT_MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// The largest image file read: `$GRAFT_MAX_IMAGE_BYTES` when set to a positive number of bytes,
/// else [`DEFAULT_MAX_IMAGE_FILE_BYTES`]. Read once per process.
pub fn max_image_file_bytes() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("GRAFT_MAX_IMAGE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_MAX_IMAGE_FILE_BYTES)
    })
}

/// Checks that `path` names a regular file (following links) of at most `limit` bytes, without
/// opening it, and returns its size. `what` names the kind of file in errors ("image").
pub fn check_regular(path: &Path, limit: u64, what: &str) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotARegularFile {
            path: path.to_path_buf(),
            what: what.to_string(),
            kind: file_kind(&meta),
        });
    }
    if meta.len() > limit {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            what: what.to_string(),
            size: meta.len(),
            limit,
        });
    }
    Ok(meta.len())
}

/// Reads the whole regular file at `path` if it holds at most `limit` bytes (see
/// [`check_regular`]).
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let size = check_regular(path, limit, what)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            what: what.to_string(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Reads the image file at `path`, up to [`max_image_file_bytes`].
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    read_regular(path, max_image_file_bytes(), "image")
}

/// What a non-regular file is, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, [7u8; 100]).unwrap();
        assert_eq!(read_regular(&path, 100, "image").unwrap(), vec![7u8; 100]);
        let err = read_regular(&path, 99, "image").unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: image file is 100 bytes, more than the 99-byte limit (set GRAFT_MAX_IMAGE_BYTES to raise it)",
                path.display()
            )
        );
        let err = read_regular(dir.path(), 100, "image")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a regular file (a folder); expected an image file",
                dir.path().display()
            )
        );
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_fifos_are_refused_without_reading() {
        let err = read_regular(Path::new("/dev/zero"), 1 << 20, "image")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/dev/zero: not a regular file (a character device); expected an image file"
        );
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.jpg");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Would block forever in open() if the FIFO were opened.
        let err = read_image_file(&fifo).unwrap_err().to_string();
        assert!(err.ends_with("not a regular file (a FIFO); expected an image file"));
    }
}
