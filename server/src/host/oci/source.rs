//! Image sources read into the blob store: an OCI image layout directory, and archives — a
//! `docker save` / `skopeo copy docker-archive:` tar, or an OCI layout packed as a tar — read
//! as one stream (from a host file or from a client). Every blob is verified on the way in;
//! the manifest is resolved to this host's platform.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use super::{BlobStore, Digest, OciError, PLATFORM, file_error};
use crate::domain::{ImageConfig, OciLayer, OciOrigin};

/// The largest manifest, index or config banger reads (they are a few KiB in practice).
const SMALL_BLOB_LIMIT: u64 = 4 * 1024 * 1024;
/// The annotation that names a manifest of a layout's index (its tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Progress of reading a source, for the caller to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Bytes of a blob copied into the store (`total` when known).
    Blob { digest: Option<Digest>, done: u64, total: Option<u64> },
}

pub(super) fn bad(what: impl Into<String>, reason: impl std::fmt::Display) -> OciError {
    OciError::BadSource { what: what.into(), reason: reason.to_string() }
}

fn digest_of(descriptor: &Descriptor) -> Result<Digest, OciError> {
    let text = descriptor.digest().to_string();
    if !text.starts_with("sha256:") {
        return Err(OciError::Unsupported { what: format!("the digest algorithm of {text}") });
    }
    Digest::parse(&text)
}

fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// Where blobs come from while a source is resolved.
pub(super) trait Blobs {
    /// Makes sure the store has the blob (a `manifest` or an index when asked, which
    /// registries serve apart from other blobs), verified.
    fn fetch(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
        manifest: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), OciError>;
}

/// Blobs of a layout directory: `blobs/sha256/<hex>`, copied into the store.
struct LayoutBlobs<'a> {
    store: &'a BlobStore,
    dir: &'a Path,
}

impl Blobs for LayoutBlobs<'_> {
    fn fetch(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
        _: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), OciError> {
        if self.store.contains(digest) {
            return Ok(());
        }
        let path = self.dir.join("blobs/sha256").join(digest.hex());
        let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                bad(format!("OCI layout {}", self.dir.display()), format!("blob {digest} is missing"))
            }
            _ => file_error("open", &path)(e),
        })?;
        self.store.ingest(file, Some(digest), &mut |done| {
            progress(Progress::Blob { digest: Some(digest.clone()), done, total: size })
        })?;
        Ok(())
    }
}

/// Blobs of an archive already read whole into the store.
struct StoredBlobs<'a> {
    store: &'a BlobStore,
}

impl Blobs for StoredBlobs<'_> {
    fn fetch(&mut self, digest: &Digest, _: Option<u64>, _: bool, _: &mut dyn FnMut(Progress)) -> Result<(), OciError> {
        if self.store.contains(digest) { Ok(()) } else { Err(bad("archive", format!("blob {digest} is missing"))) }
    }
}

/// Picks the manifest for `tag` (or the only one) from a layout's top index.
fn pick_tagged<'a>(index: &'a ImageIndex, tag: Option<&str>, source: &str) -> Result<&'a Descriptor, OciError> {
    let tag_of = |d: &Descriptor| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).cloned();
    let tags: Vec<String> = index.manifests().iter().filter_map(tag_of).collect();
    match tag {
        Some(tag) => index
            .manifests()
            .iter()
            .find(|d| tag_of(d).as_deref() == Some(tag))
            .ok_or_else(|| OciError::NotFound { what: format!("tag {tag:?} in {source}"), available: tags.clone() }),
        None => match index.manifests().as_slice() {
            [only] => Ok(only),
            [] => Err(OciError::NotFound { what: format!("an image in {source}"), available: Vec::new() }),
            _ => {
                Err(OciError::NotFound { what: format!("an untagged choice in {source}: name a tag"), available: tags })
            }
        },
    }
}

/// Resolves a descriptor (an index or a manifest) to this host's manifest and reads it all:
/// manifest, config, layers into the store.
pub(super) fn resolve(
    store: &BlobStore,
    blobs: &mut dyn Blobs,
    top: &Descriptor,
    source: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<OciOrigin, OciError> {
    let mut descriptor = top.clone();
    let mut platform_hint = None;
    for _ in 0..4 {
        let media_type = descriptor.media_type().to_string();
        if !is_index(&media_type) {
            break;
        }
        let digest = digest_of(&descriptor)?;
        blobs.fetch(&digest, Some(descriptor.size()), true, progress)?;
        let index: ImageIndex = serde_json::from_slice(&store.read_small(&digest, SMALL_BLOB_LIMIT)?)
            .map_err(|e| bad(format!("image index {digest}"), e))?;
        let platform_of = |d: &Descriptor| {
            d.platform().as_ref().map(|p| {
                let mut name = format!("{}/{}", p.os(), p.architecture());
                if let Some(variant) = p.variant() {
                    name.push('/');
                    name.push_str(variant);
                }
                name
            })
        };
        let available: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(platform_of)
            .filter(|p| p != "unknown/unknown") // attestations
            .collect();
        let chosen = index.manifests().iter().find(|d| platform_of(d).as_deref() == Some(PLATFORM));
        match chosen {
            Some(d) => {
                platform_hint = Some(PLATFORM.to_owned());
                descriptor = d.clone();
            }
            None => return Err(OciError::NoPlatform { wanted: PLATFORM.into(), available }),
        }
    }
    let manifest_digest = digest_of(&descriptor)?;
    blobs.fetch(&manifest_digest, Some(descriptor.size()), true, progress)?;
    let manifest_bytes = store.read_small(&manifest_digest, SMALL_BLOB_LIMIT)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("manifest {manifest_digest}"), e))?;
    let config_digest = digest_of(manifest.config())?;
    blobs.fetch(&config_digest, Some(manifest.config().size()), false, progress)?;
    let config: ImageConfiguration = serde_json::from_slice(&store.read_small(&config_digest, SMALL_BLOB_LIMIT)?)
        .map_err(|e| bad(format!("image config {config_digest}"), e))?;
    let platform = format!("{}/{}", config.os(), config.architecture());
    if platform != PLATFORM {
        return Err(OciError::NoPlatform { wanted: PLATFORM.into(), available: vec![platform] });
    }
    let mut layers = Vec::new();
    for layer in manifest.layers() {
        let digest = digest_of(layer)?;
        let media_type = layer.media_type().to_string();
        if media_type.contains("zstd") {
            return Err(OciError::Unsupported { what: format!("layer {digest} is zstd-compressed ({media_type})") });
        }
        blobs.fetch(&digest, Some(layer.size()), false, progress)?;
        layers.push(OciLayer { digest: digest.to_string(), size_bytes: layer.size(), media_type });
    }
    Ok(OciOrigin {
        source: source.to_owned(),
        manifest_digest: manifest_digest.to_string(),
        config_digest: config_digest.to_string(),
        platform: platform_hint.unwrap_or(platform),
        layers,
        config: image_config(&config),
    })
}

/// What banger keeps of an image's config: what a VM of it runs with.
fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    ImageConfig {
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
    }
}

/// Reads the image `tag` (or the only one) of an OCI image layout directory.
pub fn read_layout(
    store: &BlobStore,
    dir: &Path,
    tag: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<OciOrigin, OciError> {
    let source = format!("OCI layout {}", dir.display());
    let layout_file = dir.join("oci-layout");
    let layout = std::fs::read(&layout_file).map_err(|e| bad(&source, format!("cannot read oci-layout: {e}")))?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|e| bad(&source, format!("oci-layout: {e}")))?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(bad(&source, "oci-layout does not say imageLayoutVersion 1.0.0"));
    }
    let index_file = dir.join("index.json");
    let index = std::fs::read(&index_file).map_err(|e| bad(&source, format!("cannot read index.json: {e}")))?;
    let index: ImageIndex = serde_json::from_slice(&index).map_err(|e| bad(&source, format!("index.json: {e}")))?;
    let top = pick_tagged(&index, tag, &source)?.clone();
    let mut blobs = LayoutBlobs { store, dir };
    let mut origin = resolve(store, &mut blobs, &top, &source, progress)?;
    origin.source = match tag {
        Some(tag) => format!("oci:{}:{tag}", dir.display()),
        None => format!("oci:{}", dir.display()),
    };
    Ok(origin)
}

/// One member of a `docker save` archive's manifest.json.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads an archive stream: a docker archive (`manifest.json`) or an OCI layout as a tar
/// (`index.json`). Every member goes through the store (members named by digest are
/// verified); what no image references is removed by the caller's collection.
pub fn read_archive(
    store: &BlobStore,
    reader: impl Read,
    tag: Option<&str>,
    label: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<OciOrigin, OciError> {
    let source = format!("archive {label}");
    let mut members: HashMap<String, Digest> = HashMap::new();
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| bad(&source, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(&source, format!("not a tar stream: {e}")))?;
        if !matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
            continue;
        }
        let name = entry.path().map_err(|e| bad(&source, e))?.to_string_lossy().trim_start_matches("./").to_owned();
        let expected = name.strip_prefix("blobs/sha256/").and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
        let size = entry.size();
        let stored = store.ingest(entry, expected.as_ref(), &mut |done| {
            progress(Progress::Blob { digest: expected.clone(), done, total: Some(size) })
        })?;
        members.insert(name, stored.digest);
    }
    let member = |name: &str| {
        members.get(name.trim_start_matches("./")).cloned().ok_or_else(|| bad(&source, format!("{name} is missing")))
    };
    if members.contains_key("index.json") {
        let index: ImageIndex = serde_json::from_slice(&store.read_small(&member("index.json")?, SMALL_BLOB_LIMIT)?)
            .map_err(|e| bad(&source, format!("index.json: {e}")))?;
        let top = pick_tagged(&index, tag, &source)?.clone();
        let mut origin = resolve(store, &mut StoredBlobs { store }, &top, &source, progress)?;
        origin.source = format!("oci-archive:{label}");
        return Ok(origin);
    }
    if !members.contains_key("manifest.json") {
        return Err(bad(&source, "neither a docker archive (manifest.json) nor an OCI layout (index.json)"));
    }
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&store.read_small(&member("manifest.json")?, SMALL_BLOB_LIMIT)?)
            .map_err(|e| bad(&source, format!("manifest.json: {e}")))?;
    let tags = || entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect::<Vec<_>>();
    let chosen = match tag {
        Some(tag) => entries.iter().find(|e| {
            e.repo_tags.as_ref().is_some_and(|tags| tags.iter().any(|t| t == tag || t.ends_with(&format!("/{tag}"))))
        }),
        None if entries.len() == 1 => entries.first(),
        None => None,
    };
    let Some(chosen) = chosen else {
        let what = match tag {
            Some(tag) => format!("tag {tag:?} in {source}"),
            None => format!("an untagged choice in {source}: name a tag"),
        };
        return Err(OciError::NotFound { what, available: tags() });
    };
    let config_digest = member(&chosen.config)?;
    let config: ImageConfiguration = serde_json::from_slice(&store.read_small(&config_digest, SMALL_BLOB_LIMIT)?)
        .map_err(|e| bad(format!("image config {}", chosen.config), e))?;
    let platform = format!("{}/{}", config.os(), config.architecture());
    if platform != PLATFORM {
        return Err(OciError::NoPlatform { wanted: PLATFORM.into(), available: vec![platform] });
    }
    let mut layers = Vec::new();
    for name in &chosen.layers {
        let digest = member(name)?;
        let size = std::fs::metadata(store.path(&digest)).map_err(file_error("stat", &store.path(&digest)))?.len();
        layers.push(OciLayer {
            digest: digest.to_string(),
            size_bytes: size,
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
        });
    }
    // A docker archive has no manifest: banger writes the one it would have (canonical
    // JSON, so the same archive always gets the same digest).
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(),
                   "size": std::fs::metadata(store.path(&config_digest)).map(|m| m.len()).unwrap_or(0)},
        "layers": layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size_bytes})).collect::<Vec<_>>(),
    });
    let manifest_digest = store.put(manifest.to_string().as_bytes())?.digest;
    Ok(OciOrigin {
        source: format!("docker-archive:{label}"),
        manifest_digest: manifest_digest.to_string(),
        config_digest: config_digest.to_string(),
        platform,
        layers,
        config: image_config(&config),
    })
}

/// The digests an image keeps alive in the store.
pub fn blobs_of(origin: &OciOrigin) -> Vec<Digest> {
    [&origin.manifest_digest, &origin.config_digest]
        .into_iter()
        .chain(origin.layers.iter().map(|l| &l.digest))
        .filter_map(|d| Digest::parse(d).ok())
        .collect()
}
