//! The content-addressed blob store: `<state>/blobs/sha256/<hex>`, each file's content
//! hashed as it is written and renamed into place only when its digest is right. A blob is
//! stored once however many images use it. Partial writes live in `<state>/blobs/tmp/` and
//! are never mistaken for blobs: a crash leaves only files that reconcile removes.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Digest, OciError, file_error};

/// The store under one directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// How a blob got into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// False when the store had it already (nothing was kept of this copy).
    pub new: bool,
}

impl BlobStore {
    /// The store rooted at `root` (made on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BlobStore { root: root.into() }
    }

    /// Where the store lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob is (or would be).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Whether the store has the blob.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Starts writing a blob whose content arrives in pieces (from a registry).
    pub fn writer(&self) -> Result<BlobWriter, OciError> {
        let tmp_dir = self.tmp_dir();
        crate::host::fs::make_dir(&tmp_dir, 0o700)?;
        crate::host::fs::make_dir(&self.root.join("sha256"), 0o700)?;
        let tmp = tmp_dir.join(ulid::Ulid::generate().to_string());
        let file = std::fs::File::create(&tmp).map_err(file_error("create", &tmp))?;
        Ok(BlobWriter { store: self.clone(), tmp, file: Some(file), hasher: Sha256::new(), size: 0 })
    }

    /// Copies `reader` into the store, hashing it; with `expected`, a different digest is
    /// [`OciError::DigestMismatch`] and nothing is kept. `progress` is told the bytes copied.
    pub fn ingest(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Stored, OciError> {
        let mut writer = self.writer()?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(OciError::BadSource { what: "blob".into(), reason: format!("read failed: {e}") });
                }
            };
            writer.write(&buffer[..n])?;
            progress(writer.size);
        }
        writer.finish(expected)
    }

    /// Stores `bytes` (a manifest or a config, already read and checked).
    pub fn put(&self, bytes: &[u8]) -> Result<Stored, OciError> {
        self.ingest(bytes, None, &mut |_| {})
    }

    /// Reads a small blob (a manifest, a config, an index), checking its digest; at most
    /// `limit` bytes.
    pub fn read_small(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, OciError> {
        let path = self.path(digest);
        let file = std::fs::File::open(&path).map_err(file_error("open", &path))?;
        let mut bytes = Vec::new();
        file.take(limit + 1).read_to_end(&mut bytes).map_err(file_error("read", &path))?;
        if bytes.len() as u64 > limit {
            return Err(OciError::BadSource {
                what: format!("blob {digest}"),
                reason: format!("larger than {limit} bytes"),
            });
        }
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(OciError::DigestMismatch { expected: digest.to_string(), actual: actual.to_string() });
        }
        Ok(bytes)
    }

    /// Removes partial writes a crash left.
    pub fn clean_partials(&self) -> Result<usize, OciError> {
        remove_all_in(&self.tmp_dir())
    }

    /// Removes every blob not in `keep`; returns the digests removed.
    pub fn remove_except(&self, keep: &HashSet<Digest>) -> Result<Vec<Digest>, OciError> {
        let dir = self.root.join("sha256");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file_error("read", &dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(file_error("read", &dir))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok()) else {
                continue;
            };
            if !keep.contains(&digest) {
                std::fs::remove_file(entry.path()).map_err(file_error("remove", &entry.path()))?;
                removed.push(digest);
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// Every blob in the store.
    pub fn list(&self) -> Result<Vec<Digest>, OciError> {
        let dir = self.root.join("sha256");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file_error("read", &dir)(e)),
        };
        let mut out: Vec<Digest> = entries
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok()))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// A blob being written: hashed as it goes, a blob of the store only once [`finish`]ed with
/// the right digest; dropped unfinished, it leaves nothing.
///
/// [`finish`]: BlobWriter::finish
#[derive(Debug)]
pub struct BlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), OciError> {
        let file = self.file.as_mut().ok_or_else(|| OciError::Write { reason: "the blob is finished".into() })?;
        self.hasher.update(bytes);
        file.write_all(bytes).map_err(file_error("write", &self.tmp))?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks the digest (against `expected`, when given) and moves the blob into place.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<Stored, OciError> {
        drop(self.file.take());
        let digest = Digest(format!("sha256:{}", hex::encode(self.hasher.clone().finalize())));
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(OciError::DigestMismatch { expected: expected.to_string(), actual: digest.to_string() });
        }
        let path = self.store.path(&digest);
        let new = !path.is_file();
        if new {
            std::fs::rename(&self.tmp, &path).map_err(file_error("rename", &self.tmp))?;
        }
        Ok(Stored { digest, size: self.size, new })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Finished or not, the temporary file is not a blob (a rename moved it already).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn remove_all_in(dir: &Path) -> Result<usize, OciError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(file_error("read", dir)(e)),
    };
    let mut count = 0;
    for entry in entries {
        let path = entry.map_err(file_error("read", dir))?.path();
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(file_error("remove", &path))?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_stored_once_by_digest_and_a_wrong_digest_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(dir.path().join("blobs"));
        let first = store.put(b"layer").expect("put");
        assert!(first.new && store.contains(&first.digest));
        assert_eq!(first.digest, Digest::of(b"layer"));
        let again = store.ingest(&b"layer"[..], Some(&first.digest), &mut |_| {}).expect("again");
        assert!(!again.new, "a blob already stored is not stored twice");

        let wrong = Digest::of(b"something else");
        let err = store.ingest(&b"tampered"[..], Some(&wrong), &mut |_| {}).expect_err("mismatch");
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.list().expect("list"), vec![first.digest.clone()]);
        assert_eq!(std::fs::read_dir(dir.path().join("blobs/tmp")).expect("tmp").count(), 0);

        let other = store.put(b"other").expect("put");
        let removed = store.remove_except(&[other.digest.clone()].into_iter().collect()).expect("gc");
        assert_eq!(removed, vec![first.digest]);
        assert_eq!(store.list().expect("list"), vec![other.digest.clone()]);
        assert_eq!(store.read_small(&other.digest, 100).expect("read"), b"other");
        assert!(store.read_small(&other.digest, 2).is_err(), "the limit holds");
    }
}
