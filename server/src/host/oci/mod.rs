//! Container images made bootable without mounting anything: a content-addressed blob
//! store, image sources (OCI layouts, docker and OCI archives), layers flattened in memory
//! into one tar stream, and an ext4 file system built from that stream by `mke2fs -d -`.

pub mod blobs;
pub mod ext4;
pub mod flatten;
pub mod registry;
pub mod source;

use std::fmt;
use std::path::Path;

pub use blobs::BlobStore;

/// A content digest: `sha256:` and 64 lowercase hex digits (the only algorithm banger takes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses a digest; anything but sha256 in its canonical form is refused.
    pub fn parse(text: &str) -> Result<Digest, OciError> {
        match text.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
                Ok(Digest(text.to_owned()))
            }
            _ => Err(OciError::BadSource { what: "digest".into(), reason: format!("{text:?} is not a sha256 digest") }),
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes))))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = OciError;
    fn try_from(text: String) -> Result<Self, OciError> {
        Digest::parse(&text)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

/// Why an image could not be read or converted.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A layer entry breaks a rule (escapes the root, writes through a symlink, …): the
    /// caller's input is refused and nothing is written.
    #[error("layer {layer} ({digest}): entry {entry:?}: {reason}")]
    Layer {
        /// 1-based position in the manifest.
        layer: usize,
        /// The layer's digest.
        digest: String,
        /// The entry's name as the layer has it.
        entry: String,
        /// The rule broken.
        reason: String,
    },
    /// A layer's bytes are not a readable (gzipped) tar stream.
    #[error("layer {layer} ({digest}) is corrupt: {reason}")]
    CorruptLayer {
        /// 1-based position in the manifest.
        layer: usize,
        /// The layer's digest.
        digest: String,
        /// What the reader said.
        reason: String,
    },
    /// A blob's content does not match its digest: nothing of it is kept.
    #[error("blob {expected} has the digest {actual}")]
    DigestMismatch {
        /// The digest it was named by.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// The source is not a well-formed image (a bad layout, manifest or archive).
    #[error("{what}: {reason}")]
    BadSource {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The source has no such image (an unknown tag).
    #[error("{what} not found{}", if available.is_empty() { String::new() } else { format!(" (it has: {})", available.join(", ")) })]
    NotFound {
        /// What was asked for.
        what: String,
        /// What there is instead.
        available: Vec<String>,
    },
    /// The image has no variant for this host's platform.
    #[error("the image has no {wanted} variant (it has: {})", available.join(", "))]
    NoPlatform {
        /// This host's platform.
        wanted: String,
        /// The platforms the image has.
        available: Vec<String>,
    },
    /// A registry could not be reached (refused, timed out, failing).
    #[error("registry of {registry} unreachable: {reason}")]
    Unreachable {
        /// The reference being pulled.
        registry: String,
        /// What went wrong.
        reason: String,
    },
    /// A registry refused the credentials (or their absence).
    #[error("registry of {registry} refused access: {reason}")]
    Denied {
        /// The reference being pulled.
        registry: String,
        /// What it said.
        reason: String,
    },
    /// Something banger does not handle (zstd layers, a non-sha256 digest).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// Writing the merged stream or the file system failed.
    #[error("cannot write the root file system: {reason}")]
    Write {
        /// Why.
        reason: String,
    },
    /// A host file operation failed.
    #[error(transparent)]
    Host(#[from] Box<super::HostError>),
}

impl From<super::HostError> for OciError {
    fn from(error: super::HostError) -> Self {
        OciError::Host(Box::new(error))
    }
}

/// A file error as an [`OciError`].
pub(crate) fn file_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OciError {
    let path = path.to_owned();
    move |source| OciError::Host(Box::new(super::HostError::File { action, path, source }))
}

/// The platform banger's guests run.
pub const PLATFORM: &str = "linux/amd64";

/// Where a container image comes from.
pub enum Source {
    /// A registry reference (`debian:bookworm`, `127.0.0.1:5000/ci/builder@sha256:…`).
    Registry {
        /// The reference.
        reference: String,
        /// How to reach registries.
        config: registry::RegistryConfig,
    },
    /// An OCI image layout directory on the host, and the tag to take (or its only image).
    Layout {
        /// The layout directory.
        dir: std::path::PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`).
        tag: Option<String>,
    },
    /// An archive file on the host: `docker save` output or an OCI layout as a tar.
    Archive {
        /// The archive.
        path: std::path::PathBuf,
        /// The tag to take, when the archive holds several images.
        tag: Option<String>,
    },
    /// An archive streamed by a client.
    Stream {
        /// Its bytes (read on a blocking thread).
        reader: Box<dyn std::io::Read + Send>,
        /// The tag to take, when the archive holds several images.
        tag: Option<String>,
        /// How to name it in messages and in the image's origin.
        label: String,
    },
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry { reference, .. } => write!(f, "Registry({reference})"),
            Source::Layout { dir, tag } => write!(f, "Layout({}, {tag:?})", dir.display()),
            Source::Archive { path, tag } => write!(f, "Archive({}, {tag:?})", path.display()),
            Source::Stream { label, tag, .. } => write!(f, "Stream({label}, {tag:?})"),
        }
    }
}

/// A progress callback that can cross to a blocking thread.
pub type ProgressFn = std::sync::Arc<dyn Fn(crate::domain::ImageProgress) + Send + Sync>;

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| OciError::Write { reason: format!("the conversion thread failed: {e}") })?
}

/// Reads a source into the store, every blob verified; returns what the image is.
pub async fn read_source(
    store: BlobStore,
    source: Source,
    progress: ProgressFn,
) -> Result<crate::domain::OciOrigin, OciError> {
    let runtime = tokio::runtime::Handle::current();
    blocking(move || {
        let mut report = |p: source::Progress| match p {
            source::Progress::Blob { digest, done, total } => progress(crate::domain::ImageProgress::Blob {
                digest: digest.map(|d| d.to_string()).unwrap_or_default(),
                done,
                total,
            }),
        };
        match source {
            Source::Registry { reference, config } => {
                registry::pull(&store, &reference, &config, &runtime, &mut report)
            }
            Source::Layout { dir, tag } => source::read_layout(&store, &dir, tag.as_deref(), &mut report),
            Source::Archive { path, tag } => {
                let file = std::fs::File::open(&path).map_err(file_error("open", &path))?;
                let label = path.display().to_string();
                source::read_archive(&store, std::io::BufReader::new(file), tag.as_deref(), &label, &mut report)
            }
            Source::Stream { reader, tag, label } => {
                source::read_archive(&store, reader, tag.as_deref(), &label, &mut report)
            }
        }
    })
    .await
}

/// The layers of an image, as blobs of the store.
fn layers_of(store: &BlobStore, origin: &crate::domain::OciOrigin) -> Result<Vec<flatten::Layer>, OciError> {
    origin
        .layers
        .iter()
        .map(|layer| {
            let digest = Digest::parse(&layer.digest)?;
            Ok(flatten::Layer { path: store.path(&digest), digest })
        })
        .collect()
}

/// Merges an image's layers into one tree, verifying each layer's digest on the way.
pub async fn flatten(
    store: BlobStore,
    origin: crate::domain::OciOrigin,
    progress: ProgressFn,
) -> Result<std::sync::Arc<flatten::Plan>, OciError> {
    blocking(move || {
        let layers = layers_of(&store, &origin)?;
        let total: u64 = origin.layers.iter().map(|l| l.size_bytes).sum();
        let plan = flatten::Plan::build(&layers, &mut |done| {
            progress(crate::domain::ImageProgress::Blob { digest: String::new(), done, total: Some(total) })
        })?;
        Ok(std::sync::Arc::new(plan))
    })
    .await
}

/// Builds the ext4 of a merged tree at `out`; returns its size in bytes.
pub async fn write_rootfs(
    store: BlobStore,
    origin: crate::domain::OciOrigin,
    plan: std::sync::Arc<flatten::Plan>,
    out: std::path::PathBuf,
    min_bytes: u64,
) -> Result<u64, OciError> {
    blocking(move || {
        let layers = layers_of(&store, &origin)?;
        let seed = Digest::parse(&origin.manifest_digest)?;
        ext4::build(&plan, &layers, &seed, min_bytes, &out)
    })
    .await
}

/// Removes every blob of the store that `keep` does not name, and partial writes when
/// `partials` (no read may be under way then).
pub async fn collect_garbage(
    store: BlobStore,
    keep: std::collections::HashSet<Digest>,
    partials: bool,
) -> Result<Vec<Digest>, OciError> {
    blocking(move || {
        if partials {
            store.clean_partials()?;
        }
        store.remove_except(&keep)
    })
    .await
}
