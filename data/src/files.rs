//! Files replaced whole: written beside their final name, synced, then renamed over it, so that a reader, a
//! crash or a full disk leaves the previous file or the new one, never a truncated mix.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name `path` is written under first: same directory (so the rename is atomic), same extension
/// (writers that pick the format by it, e.g. PNG, still do).
fn temporary(path: &Path) -> PathBuf {
    let stem = path.file_stem().map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let ext = path.extension().map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
    path.with_file_name(format!(".{stem}.tmp{}{ext}", std::process::id()))
}

/// Writes `path` through `write`, which gets the temporary path to create; the result replaces `path` whole.
pub fn replace_with<E: From<std::io::Error>>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let tmp = temporary(path);
    let written = write(&tmp).and_then(|()| Ok(std::fs::File::open(&tmp)?.sync_all()?));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Replaces `path` with `bytes` whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with(path, |tmp| std::fs::File::create(tmp)?.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.txt");
        write_atomic(&path, b"old").unwrap();
        let err = replace_with(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is removed");
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
