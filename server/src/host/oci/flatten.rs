//! Layers applied in order into one tree, in memory, then written out as one tar stream:
//! OCI's rules (whiteouts, opaque directories, hard links across layers), nothing mounted and
//! nothing written to the host's file system.
//!
//! Two passes over the layers. The first reads every header (and hashes every blob: a layer
//! is verified before anything of it is written) and builds the merged tree. The second
//! streams the result: every directory first, parents before children (what `mke2fs -d -`
//! needs), then symlinks, devices and FIFOs, then regular files straight from their layers,
//! then hard links, whose targets then exist.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::{Digest, OciError};

/// One layer to apply: its blob in the store.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The blob's digest, as the manifest names it.
    pub digest: Digest,
    /// Where the blob is.
    pub path: PathBuf,
}

/// Which entry of which layer a node came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EntryId {
    layer: usize,
    ordinal: u64,
}

/// What a header says about ownership, mode, time and extended attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// A directory a layer implies without listing it.
    fn implied_dir() -> Self {
        Meta { mode: 0o755, uid: 0, gid: 0, mtime: 0, xattrs: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    /// A regular file: its content is entry `id`'s data.
    File {
        size: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to the content of entry `source` (a regular file of this or a lower
    /// layer), whatever happened to that file's path since.
    Hardlink {
        source: EntryId,
        size: u64,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone)]
struct Node {
    id: EntryId,
    kind: Kind,
    meta: Meta,
}

/// The merged tree of an image's layers, ready to be written.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every path (relative, `/`-separated, no `.` or `..`) and what is there.
    nodes: BTreeMap<Vec<u8>, Node>,
    /// Per layer, the number of bytes of its blob (what pass two reads again).
    layer_bytes: Vec<u64>,
}

/// What a plan holds, for sizing the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Entries in the merged tree.
    pub entries: u64,
    /// Bytes of regular-file content (each hard-linked content once).
    pub file_bytes: u64,
    /// Directories.
    pub dirs: u64,
}

/// An entry that breaks a rule: the caller's input is refused.
fn refuse(layer: usize, digest: &Digest, entry: &[u8], reason: impl Into<String>) -> OciError {
    OciError::Layer {
        layer: layer + 1,
        digest: digest.to_string(),
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.into(),
    }
}

/// A layer whose bytes are not a readable tar stream.
fn corrupt(layer: usize, digest: &Digest, err: impl std::fmt::Display) -> OciError {
    OciError::CorruptLayer { layer: layer + 1, digest: digest.to_string(), reason: err.to_string() }
}

/// Splits a tar name into clean components; refuses `..` and absolute names.
fn clean_path(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute paths are refused");
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("`..` components are refused"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(component);
            }
        }
    }
    Ok(out)
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = parent.to_vec();
    if !out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// A reader that hashes what passes through it and counts it (the count is shared, for
/// progress while a tar reader owns this one).
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
}

type RawLayer = io::BufReader<Hashing<std::fs::File>>;

/// A layer's tar stream: its blob as is, or gunzipped.
enum Decoded {
    Plain(RawLayer),
    Gzip(Box<flate2::bufread::MultiGzDecoder<RawLayer>>),
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
        }
    }
}

impl Decoded {
    /// Opens a layer blob; the compression is told by its first bytes (docker archives name
    /// no media types).
    fn open(index: usize, layer: &Layer) -> Result<(Decoded, std::rc::Rc<std::cell::Cell<u64>>), OciError> {
        use io::BufRead;
        let file = std::fs::File::open(&layer.path).map_err(super::file_error("open", &layer.path))?;
        let bytes = std::rc::Rc::new(std::cell::Cell::new(0));
        let hashing = Hashing { inner: file, hasher: Sha256::new(), bytes: bytes.clone() };
        let mut raw = io::BufReader::with_capacity(256 * 1024, hashing);
        let head = raw.fill_buf().map_err(|e| corrupt(index, &layer.digest, e))?;
        let decoded = if head.starts_with(&[0x1f, 0x8b]) {
            Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(raw)))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(OciError::Unsupported {
                what: format!("layer {} ({}) is zstd-compressed", index + 1, layer.digest),
            });
        } else {
            Decoded::Plain(raw)
        };
        Ok((decoded, bytes))
    }

    /// Reads the rest of the blob (tar padding, the gzip trailer and its CRC: the digest
    /// covers every byte) and returns its digest.
    fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        let mut raw = match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(r) => r.into_inner(),
        };
        io::copy(&mut raw, &mut io::sink())?;
        let hashing = raw.into_inner();
        Ok(format!("sha256:{}", hex::encode(hashing.hasher.finalize())))
    }
}

/// Reads PAX records banger honours: uid, gid and mtime beyond the header's range, and
/// `SCHILY.xattr.*`.
fn pax_overrides<R: Read>(entry: &mut tar::Entry<'_, R>, meta: &mut Meta) -> io::Result<()> {
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(());
    };
    for extension in extensions {
        let extension = extension?;
        let Ok(key) = extension.key() else { continue };
        let value = extension.value_bytes();
        let number = || std::str::from_utf8(value).ok().and_then(|v| v.split('.').next()?.parse::<u64>().ok());
        match key {
            "uid" => meta.uid = number().unwrap_or(meta.uid),
            "gid" => meta.gid = number().unwrap_or(meta.gid),
            "mtime" => meta.mtime = number().unwrap_or(meta.mtime),
            _ => {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    meta.xattrs.push((name.to_owned(), value.to_vec()));
                }
            }
        }
    }
    meta.xattrs.sort();
    Ok(())
}

/// What pass one needs of an entry, read from its headers.
struct Header1 {
    path: Vec<u8>,
    kind: EntryType,
    link: Option<Vec<u8>>,
    size: u64,
    meta: Meta,
    device: (u32, u32),
}

fn read_header<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Header1> {
    let header = entry.header();
    let mut meta = Meta {
        mode: header.mode()? & 0o7777,
        uid: header.uid()?,
        gid: header.gid()?,
        mtime: header.mtime()?,
        xattrs: Vec::new(),
    };
    let kind = header.entry_type();
    // Many writers leave the device fields of other entries empty: read them only for devices.
    let device = match kind {
        EntryType::Char | EntryType::Block => {
            (header.device_major()?.unwrap_or(0), header.device_minor()?.unwrap_or(0))
        }
        _ => (0, 0),
    };
    pax_overrides(entry, &mut meta)?;
    Ok(Header1 {
        path: entry.path_bytes().into_owned(),
        kind,
        link: entry.link_name_bytes().map(|l| l.into_owned()),
        size: entry.size(),
        meta,
        device,
    })
}

impl Plan {
    /// Pass one: reads every layer's headers, in order, into the merged tree, and checks each
    /// blob's digest. `progress` is told the bytes of blobs read so far.
    pub fn build(layers: &[Layer], progress: &mut dyn FnMut(u64)) -> Result<Plan, OciError> {
        let mut plan = Plan::default();
        let mut done = 0u64;
        for (index, layer) in layers.iter().enumerate() {
            let (decoded, bytes) = Decoded::open(index, layer)?;
            let mut archive = tar::Archive::new(decoded);
            let entries = archive.entries().map_err(|e| corrupt(index, &layer.digest, e))?;
            for (ordinal, entry) in (1u64..).zip(entries) {
                let mut entry = entry.map_err(|e| corrupt(index, &layer.digest, e))?;
                let header = read_header(&mut entry).map_err(|e| corrupt(index, &layer.digest, e))?;
                plan.apply(EntryId { layer: index, ordinal }, layer, header)?;
                progress(done + bytes.get());
            }
            let actual = archive.into_inner().finish().map_err(|e| corrupt(index, &layer.digest, e))?;
            if actual != layer.digest.as_str() {
                return Err(OciError::DigestMismatch { expected: layer.digest.to_string(), actual });
            }
            done += bytes.get();
            plan.layer_bytes.push(bytes.get());
        }
        Ok(plan)
    }

    /// Applies one entry of layer `id.layer` to the tree.
    fn apply(&mut self, id: EntryId, layer: &Layer, header: Header1) -> Result<(), OciError> {
        let refused = |reason: &str| refuse(id.layer, &layer.digest, &header.path, reason);
        let path = clean_path(&header.path).map_err(refused)?;
        if path.is_empty() {
            return Ok(()); // the root itself: mke2fs makes it, owned by root
        }
        let (parent, name) = split_parent(&path);
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                // An opaque directory: what lower layers had inside it is gone; it stays.
                self.check_parents(id, layer, &header.path, &path)?;
                self.remove_below(parent, id.layer);
                if let Some(node) = self.nodes.get(parent)
                    && node.kind != Kind::Dir
                {
                    return Err(refused("an opaque marker inside something that is not a directory"));
                }
            } else if !hidden.starts_with(b".wh.") {
                let target = join(parent, hidden);
                if self.nodes.get(&target).is_some_and(|node| node.id.layer < id.layer) {
                    self.nodes.remove(&target);
                }
                self.remove_below(&target, id.layer);
            }
            // Other `.wh..wh.*` names are aufs bookkeeping: never part of the result.
            return Ok(());
        }
        self.check_parents(id, layer, &header.path, &path)?;
        let kind = match header.kind {
            EntryType::Regular | EntryType::Continuous => Kind::File { size: header.size },
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => {
                Kind::Symlink { target: header.link.clone().ok_or_else(|| refused("a symlink without a target"))? }
            }
            EntryType::Link => {
                let raw = header.link.as_deref().ok_or_else(|| refused("a hard link without a target"))?;
                let target = clean_path(raw).map_err(|why| refused(&format!("hard link target: {why}")))?;
                match self.nodes.get(&target).map(|node| (&node.kind, node)) {
                    Some((Kind::File { size }, node)) => {
                        let (source, size, meta) = (node.id, *size, node.meta.clone());
                        self.insert(path, Node { id, kind: Kind::Hardlink { source, size }, meta });
                        return Ok(());
                    }
                    Some((Kind::Hardlink { source, size }, node)) => {
                        let (source, size, meta) = (*source, *size, node.meta.clone());
                        self.insert(path, Node { id, kind: Kind::Hardlink { source, size }, meta });
                        return Ok(());
                    }
                    Some(_) => return Err(refused("a hard link to something that is not a regular file")),
                    None => return Err(refused("a hard link to a path that does not exist")),
                }
            }
            EntryType::Char => Kind::Char { major: header.device.0, minor: header.device.1 },
            EntryType::Block => Kind::Block { major: header.device.0, minor: header.device.1 },
            EntryType::Fifo => Kind::Fifo,
            EntryType::XGlobalHeader => return Ok(()),
            other => return Err(refused(&format!("unsupported entry type {:?}", other.as_byte() as char))),
        };
        self.insert(path, Node { id, kind, meta: header.meta });
        Ok(())
    }

    /// Every parent of `path` must be a directory (made if a layer implies it without
    /// listing it); a symlink among them would make this entry write through it.
    fn check_parents(&mut self, id: EntryId, layer: &Layer, raw: &[u8], path: &[u8]) -> Result<(), OciError> {
        let mut end = 0;
        loop {
            let next = path[end..].iter().position(|b| *b == b'/').map(|i| end + i);
            let Some(prefix_end) = next else {
                return Ok(());
            };
            let prefix = &path[..prefix_end];
            match self.nodes.get(prefix).map(|node| &node.kind) {
                Some(Kind::Dir) => {}
                Some(Kind::Symlink { .. }) => {
                    return Err(refuse(
                        id.layer,
                        &layer.digest,
                        raw,
                        format!("writes through the symlink {}", String::from_utf8_lossy(prefix)),
                    ));
                }
                Some(_) => {
                    return Err(refuse(
                        id.layer,
                        &layer.digest,
                        raw,
                        format!("{} is not a directory", String::from_utf8_lossy(prefix)),
                    ));
                }
                None => {
                    self.nodes.insert(prefix.to_vec(), Node { id, kind: Kind::Dir, meta: Meta::implied_dir() });
                }
            }
            end = prefix_end + 1;
        }
    }

    /// Removes everything below `dir` that came from a layer lower than `layer`.
    fn remove_below(&mut self, dir: &[u8], layer: usize) {
        let prefix = if dir.is_empty() { Vec::new() } else { join(dir, b"") };
        let doomed: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .filter(|(_, node)| node.id.layer < layer)
            .map(|(path, _)| path.clone())
            .collect();
        for path in doomed {
            self.nodes.remove(&path);
        }
    }

    /// Puts a node at `path`: a directory over a directory keeps what is inside; anything
    /// else replaces what was there, and what was below it.
    fn insert(&mut self, path: Vec<u8>, node: Node) {
        let keeps_children = node.kind == Kind::Dir && self.nodes.get(&path).is_some_and(|old| old.kind == Kind::Dir);
        if !keeps_children {
            self.remove_below(&path, usize::MAX);
        }
        self.nodes.insert(path, node);
    }

    /// What the merged tree holds.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        let mut linked: std::collections::HashSet<EntryId> = std::collections::HashSet::new();
        for node in self.nodes.values() {
            totals.entries += 1;
            match node.kind {
                Kind::Dir => totals.dirs += 1,
                Kind::File { size } if linked.insert(node.id) => totals.file_bytes += size,
                Kind::Hardlink { source, size } if linked.insert(source) => totals.file_bytes += size,
                _ => {}
            }
        }
        totals
    }

    /// Extended attributes that `mke2fs -d -` does not copy (it keeps only
    /// `security.capability`): (path, name, value), for a pass with debugfs.
    pub fn other_xattrs(&self) -> Vec<(Vec<u8>, String, Vec<u8>)> {
        let mut out = Vec::new();
        for (path, node) in &self.nodes {
            for (name, value) in &node.meta.xattrs {
                if name != MKE2FS_XATTR {
                    out.push((path.clone(), name.clone(), value.clone()));
                }
            }
        }
        out
    }

    /// Pass two: writes the merged tree as one tar stream to `out`.
    pub fn write_tar(&self, layers: &[Layer], out: impl Write) -> Result<(), OciError> {
        let mut builder = tar::Builder::new(out);
        let write_err = |e: io::Error| OciError::Write { reason: e.to_string() };
        // Which entry's content lands at which path: a file's own entry, or, for hard links
        // whose source's path has gone, the first link; the others link to it.
        let mut content_at: HashMap<EntryId, &[u8]> = HashMap::new();
        for (path, node) in &self.nodes {
            if let Kind::File { .. } = node.kind {
                content_at.insert(node.id, path);
            }
        }
        let mut links: Vec<(&[u8], &Node, &[u8])> = Vec::new();
        let mut content_meta: HashMap<EntryId, &Meta> = HashMap::new();
        for (path, node) in &self.nodes {
            if let Kind::Hardlink { source, .. } = node.kind {
                match content_at.get(&source) {
                    Some(primary) => links.push((path, node, primary)),
                    None => {
                        content_at.insert(source, path);
                        content_meta.insert(source, &node.meta);
                    }
                }
            }
        }
        // Directories, parents first (a parent's path sorts before its children's), then
        // symlinks, devices and FIFOs.
        for (path, node) in &self.nodes {
            if node.kind == Kind::Dir {
                append(&mut builder, path, node, &mut io::empty()).map_err(write_err)?;
            }
        }
        for (path, node) in &self.nodes {
            if matches!(node.kind, Kind::Symlink { .. } | Kind::Char { .. } | Kind::Block { .. } | Kind::Fifo) {
                append(&mut builder, path, node, &mut io::empty()).map_err(write_err)?;
            }
        }
        // Regular files, layer by layer, straight from the layers' streams.
        let mut by_entry: HashMap<EntryId, (&[u8], Node)> = HashMap::new();
        for (id, path) in &content_at {
            let node = &self.nodes[*path];
            let meta = content_meta.get(id).copied().unwrap_or(&node.meta).clone();
            let size = match node.kind {
                Kind::File { size } | Kind::Hardlink { size, .. } => size,
                _ => 0,
            };
            by_entry.insert(*id, (*path, Node { id: *id, kind: Kind::File { size }, meta }));
        }
        for (index, layer) in layers.iter().enumerate() {
            if !by_entry.keys().any(|id| id.layer == index) {
                continue;
            }
            let (decoded, _) = Decoded::open(index, layer)?;
            let mut archive = tar::Archive::new(decoded);
            let entries = archive.entries().map_err(|e| corrupt(index, &layer.digest, e))?;
            for (ordinal, entry) in (1u64..).zip(entries) {
                let mut entry = entry.map_err(|e| corrupt(index, &layer.digest, e))?;
                if let Some((path, node)) = by_entry.get(&EntryId { layer: index, ordinal }) {
                    let mut exact = CheckedLength { inner: &mut entry, left: entry_size(node) };
                    append(&mut builder, path, node, &mut exact).map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => corrupt(index, &layer.digest, e),
                        _ => write_err(e),
                    })?;
                }
            }
        }
        // Hard links last: their targets exist now. Each carries its target's metadata, which
        // mke2fs applies to the shared inode.
        for (path, node, primary) in links {
            append_hardlink(&mut builder, path, &node.meta, primary).map_err(write_err)?;
        }
        builder.into_inner().map_err(write_err)?.flush().map_err(write_err)?;
        Ok(())
    }
}

/// The one extended attribute `mke2fs -d -` copies from a tar stream.
pub const MKE2FS_XATTR: &str = "security.capability";

fn entry_size(node: &Node) -> u64 {
    match node.kind {
        Kind::File { size } => size,
        _ => 0,
    }
}

/// Reads exactly `left` bytes from a tar entry: a short entry is a corrupt layer, not a
/// short file.
struct CheckedLength<'a, R> {
    inner: &'a mut R,
    left: u64,
}

impl<R: Read> Read for CheckedLength<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the layer ends inside a file"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn header_for(node: &Node) -> Header {
    let mut header = Header::new_gnu();
    let (kind, size) = match &node.kind {
        Kind::Dir => (EntryType::Directory, 0),
        Kind::File { size } => (EntryType::Regular, *size),
        Kind::Symlink { .. } => (EntryType::Symlink, 0),
        Kind::Hardlink { .. } => (EntryType::Link, 0),
        Kind::Char { .. } => (EntryType::Char, 0),
        Kind::Block { .. } => (EntryType::Block, 0),
        Kind::Fifo => (EntryType::Fifo, 0),
    };
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(node.meta.mode);
    header.set_uid(node.meta.uid);
    header.set_gid(node.meta.gid);
    header.set_mtime(node.meta.mtime);
    if let Kind::Char { major, minor } | Kind::Block { major, minor } = node.kind {
        // Always representable: the octal fields hold 21 bits, Linux device numbers 20 and 12.
        let _ = header.set_device_major(major);
        let _ = header.set_device_minor(minor);
    }
    header
}

/// A PAX extended header carrying `security.capability`, which mke2fs copies.
fn append_capability<W: Write>(builder: &mut tar::Builder<W>, meta: &Meta) -> io::Result<()> {
    let Some((name, value)) = meta.xattrs.iter().find(|(name, _)| name == MKE2FS_XATTR) else {
        return Ok(());
    };
    let key = format!("SCHILY.xattr.{name}");
    // A record is "LEN KEY=VALUE\n", LEN counting its own digits.
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::XHeader);
    header.set_size(record.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, "PaxHeader", record.as_slice())
}

fn append<W: Write>(builder: &mut tar::Builder<W>, path: &[u8], node: &Node, data: &mut dyn Read) -> io::Result<()> {
    let mut header = header_for(node);
    append_capability(builder, &node.meta)?;
    let path = Path::new(std::ffi::OsStr::from_bytes(path));
    match &node.kind {
        Kind::Symlink { target } => {
            builder.append_link(&mut header, path, Path::new(std::ffi::OsStr::from_bytes(target)))
        }
        _ => builder.append_data(&mut header, path, data),
    }
}

fn append_hardlink<W: Write>(builder: &mut tar::Builder<W>, path: &[u8], meta: &Meta, target: &[u8]) -> io::Result<()> {
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Link);
    header.set_size(0);
    header.set_mode(meta.mode);
    header.set_uid(meta.uid);
    header.set_gid(meta.gid);
    header.set_mtime(meta.mtime);
    builder.append_link(
        &mut header,
        Path::new(std::ffi::OsStr::from_bytes(path)),
        Path::new(std::ffi::OsStr::from_bytes(target)),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use banger_tests::oci::{Entry as E, layer};

    use super::*;

    /// Writes layers as blobs in `dir`; returns them in order.
    pub(crate) fn write_layers(dir: &Path, layers: &[Vec<u8>]) -> Vec<Layer> {
        layers
            .iter()
            .map(|bytes| {
                let digest = Digest::of(bytes);
                let path = dir.join(digest.hex());
                std::fs::write(&path, bytes).expect("write layer");
                Layer { digest, path }
            })
            .collect()
    }

    /// The rule fixture with three of its many small files.
    pub(crate) fn rule_layers() -> Vec<Vec<u8>> {
        banger_tests::oci::rule_layers_with(3)
    }

    fn plan_of(layers: &[Vec<u8>]) -> Result<(tempfile::TempDir, Plan, Vec<Layer>), OciError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let layers = write_layers(dir.path(), layers);
        let plan = Plan::build(&layers, &mut |_| {})?;
        Ok((dir, plan, layers))
    }

    fn kind_at<'a>(plan: &'a Plan, path: &str) -> Option<&'a Kind> {
        plan.nodes.get(path.as_bytes()).map(|node| &node.kind)
    }

    #[test]
    fn layers_merge_by_oci_rules() {
        let (_dir, plan, _) = plan_of(&rule_layers()).expect("plan");
        assert_eq!(kind_at(&plan, "etc/doomed"), None, "a whiteout deletes");
        assert_eq!(kind_at(&plan, "opaque/lower"), None, "an opaque directory hides the lower layer");
        assert!(matches!(kind_at(&plan, "opaque/upper"), Some(Kind::File { .. })));
        assert_eq!(kind_at(&plan, "opaque"), Some(&Kind::Dir), "the opaque directory stays");
        assert!(plan.nodes.keys().all(|path| !path.windows(4).any(|w| w == b".wh.")), "no whiteout survives");
        assert!(matches!(kind_at(&plan, "etc/cross-layer"), Some(Kind::Hardlink { .. })));
        assert_eq!(kind_at(&plan, "shared"), Some(&Kind::Dir), "implied directories exist");
        assert_eq!(plan.nodes[b"usr/bin/setuid".as_slice()].meta.mode, 0o4755);
        let owned = &plan.nodes[b"etc/owned".as_slice()].meta;
        assert_eq!((owned.uid, owned.gid), (1234, 5678));
        assert_eq!(plan.other_xattrs(), vec![(b"etc/user-xattr".to_vec(), "user.banger".into(), b"fixture".to_vec())]);
        let totals = plan.totals();
        assert_eq!((totals.entries, totals.dirs), (23, 6), "{totals:?}");
    }

    /// Writes the plan's stream and reads it back as (path, type, link, content).
    fn stream_of(plan: &Plan, layers: &[Layer]) -> Vec<(String, EntryType, String, Vec<u8>)> {
        let mut out = Vec::new();
        plan.write_tar(layers, &mut out).expect("write");
        let mut archive = tar::Archive::new(out.as_slice());
        archive
            .entries()
            .expect("entries")
            .map(|entry| {
                let mut entry = entry.expect("entry");
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("read");
                let link = entry.link_name().expect("link").map(|l| l.display().to_string()).unwrap_or_default();
                (entry.path().expect("path").display().to_string(), entry.header().entry_type(), link, data)
            })
            .collect()
    }

    #[test]
    fn the_stream_puts_parents_first_and_hard_links_after_their_targets() {
        let (_dir, plan, layers) = plan_of(&rule_layers()).expect("plan");
        let stream = stream_of(&plan, &layers);
        let position =
            |path: &str| stream.iter().position(|(p, ..)| p == path).unwrap_or_else(|| panic!("{path} missing"));
        for (index, (path, ..)) in stream.iter().enumerate() {
            if let Some((parent, _)) = path.rsplit_once('/') {
                assert!(position(parent) < index, "{parent} after {path}");
            }
        }
        let (_, kind, target, _) = &stream[position("etc/cross-layer")];
        assert_eq!((*kind, target.as_str()), (EntryType::Link, "shared/original"));
        assert!(position("shared/original") < position("etc/cross-layer"));
        // The file a later layer replaced: its old content stays with the hard link to it.
        let (_, kind, _, data) = &stream[position("etc/keeps-old")];
        assert_eq!((*kind, data.as_slice()), (EntryType::Regular, b"old".as_slice()));
        assert_eq!(stream[position("etc/replaced")].3, b"new");
        assert_eq!(stream.iter().filter(|(p, ..)| p.contains(".wh.")).count(), 0);
    }

    fn refusal(layers: &[Vec<u8>]) -> String {
        match plan_of(layers) {
            Ok(_) => panic!("accepted"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn entries_that_escape_the_root_are_refused_naming_layer_and_entry() {
        let dotdot = refusal(&[layer(&[E::Raw(b"../../etc/x".to_vec(), EntryType::Regular)])]);
        assert!(dotdot.contains("layer 1") && dotdot.contains("../../etc/x") && dotdot.contains(".."), "{dotdot}");
        let absolute = refusal(&[layer(&[E::Raw(b"/etc/passwd".to_vec(), EntryType::Regular)])]);
        assert!(absolute.contains("absolute"), "{absolute}");
        let through = refusal(&[layer(&[E::Sym("escape", "/")]), layer(&[E::File("escape/etc/x", b"x", 0o644)])]);
        assert!(through.contains("layer 2") && through.contains("symlink escape"), "{through}");
        let link = refusal(&[layer(&[E::Link("x", "../../etc/shadow")])]);
        assert!(link.contains("hard link target"), "{link}");
    }

    #[test]
    fn a_wrong_digest_or_a_truncated_gzip_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut layers = write_layers(dir.path(), &[layer(&[E::File("a", b"a", 0o644)])]);
        layers[0].digest = Digest::of(b"another blob");
        let err = Plan::build(&layers, &mut |_| {}).expect_err("mismatch");
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");

        let whole = layer(&[E::File("big", &[7u8; 4096], 0o644), E::File("b", b"b", 0o644)]);
        let truncated = whole[..whole.len() / 2].to_vec();
        let layers = write_layers(dir.path(), &[truncated]);
        let err = Plan::build(&layers, &mut |_| {}).expect_err("truncated");
        assert!(matches!(err, OciError::CorruptLayer { layer: 1, .. }), "{err}");
    }
}
