//! Content-addressed bundle files under `data_dir/bundles/`.
//!
//! A bundle is stored as `bundles/<sha256 of the whole .outpost file>.outpost`.
//! Content addressing makes storing idempotent (the same bytes land at the
//! same name) and lets a device name exactly the bytes it downloads.
//!
//! Storing is crash-safe: the bytes are written to a temporary file in the
//! same directory, fsynced, renamed into place, and the directory is fsynced
//! so the rename itself survives a power cut. A crash leaves at worst a
//! `*.tmp*` file, which [`BundleStore::open`] removes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0:?} is not a sha256 (64 lowercase hex digits)")]
    BadDigest(String),
    #[error("no stored bundle {0}")]
    Missing(String),
}

/// A stored bundle's address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoredBundle {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Clone, Debug)]
pub struct BundleStore {
    dir: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` looks like a sha256 we handed out (guards file names built
/// from what devices send).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BundleStore {
    /// Opens (creating) the store directory and clears leftovers of
    /// interrupted writes.
    pub fn open(dir: &Path) -> Result<BundleStore, StoreError> {
        let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_name().to_string_lossy().contains(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BundleStore { dir: dir.to_path_buf() })
    }

    pub fn path_of(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::BadDigest(sha256.to_string()));
        }
        Ok(self.dir.join(format!("{sha256}.outpost")))
    }

    /// Copies the file at `src` into the store (streaming, never the whole
    /// file in memory) and returns its address.
    pub fn put_file(&self, src: &Path) -> Result<StoredBundle, StoreError> {
        let io_src = |source| StoreError::Io { path: src.to_path_buf(), source };
        let mut input = File::open(src).map_err(io_src)?;
        let tmp = self.dir.join(format!(".incoming.tmp{}-{}", std::process::id(), unique()));
        let io_tmp = |source| StoreError::Io { path: tmp.clone(), source };
        let result = (|| {
            let mut out = File::create(&tmp).map_err(io_tmp)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(io_src)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_tmp)?;
                size += n as u64;
            }
            out.sync_all().map_err(io_tmp)?;
            let sha256 = hex(&hasher.finalize());
            let path = self.path_of(&sha256)?;
            std::fs::rename(&tmp, &path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
            sync_dir(&self.dir).map_err(|source| StoreError::Io { path: self.dir.clone(), source })?;
            Ok(StoredBundle { sha256, size, path })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes a stored bundle (undoing a publish that was refused after
    /// its bundle was stored). Missing is fine.
    pub fn remove(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self.path_of(sha256)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Reads up to `len` bytes at `offset` of a stored bundle: only that
    /// range is read, so serving a chunk costs a chunk of memory, whatever
    /// the model's size. Returns the bytes and the bundle's total size.
    pub fn read_range(&self, sha256: &str, offset: u64, len: usize) -> Result<(Vec<u8>, u64), StoreError> {
        let path = self.path_of(sha256)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::Missing(sha256.into())),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let io = |source| StoreError::Io { path: path.clone(), source };
        let total = file.metadata().map_err(io)?.len();
        if offset >= total {
            return Ok((Vec::new(), total));
        }
        let want = len.min((total - offset) as usize);
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut buf = vec![0u8; want];
        file.read_exact(&mut buf).map_err(io)?;
        Ok((buf, total))
    }

    /// Whether a bundle is stored.
    pub fn contains(&self, sha256: &str) -> bool {
        self.path_of(sha256).map(|p| p.is_file()).unwrap_or(false)
    }
}

/// fsync of a directory, so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// A process-unique number for temporary names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 4];
    let _ = getrandom::getrandom(&mut r);
    (u64::from(u32::from_le_bytes(r)) << 24) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_content_and_reads_ranges() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BundleStore::open(&dir.path().join("bundles")).expect("open");
        let src = dir.path().join("b.outpost");
        std::fs::write(&src, b"hello bundle").expect("write");
        let stored = store.put_file(&src).expect("put");
        assert_eq!(stored.size, 12);
        assert_eq!(stored.sha256, hex(&Sha256::digest(b"hello bundle")));
        assert_eq!(store.read_range(&stored.sha256, 6, 100).expect("read"), (b"bundle".to_vec(), 12));
        assert_eq!(store.read_range(&stored.sha256, 12, 10).expect("eof").0, Vec::<u8>::new());
        assert!(matches!(store.read_range(&"0".repeat(64), 0, 1), Err(StoreError::Missing(_))));
        assert!(matches!(store.read_range("../../etc/passwd", 0, 1), Err(StoreError::BadDigest(_))));
        store.remove(&stored.sha256).expect("remove");
        assert!(!store.contains(&stored.sha256));
    }
}
