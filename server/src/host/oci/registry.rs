//! Pulling from registries (OCI distribution, Docker registry v2) with `oci-client`:
//! anonymous or token auth, credentials from the host's docker `config.json`, HTTPS with the
//! system's CAs, plain HTTP only for the registries the config lists. Manifests and blobs go
//! into the store verified; the resolution to this host's platform is the one every source
//! shares (`source::resolve`). Runs on a blocking thread: each network call is driven by
//! the runtime's handle, each chunk written as it arrives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    manifest::OciDescriptor,
    secrets::RegistryAuth,
};
use oci_spec::image::{Descriptor, MediaType};
use tokio_stream::StreamExt;

use super::source::{self, Blobs, Progress, bad};
use super::{BlobStore, Digest, OciError};
use crate::domain::OciOrigin;

/// The manifest media types banger asks registries for.
const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// The largest manifest banger reads from a registry.
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;

/// How to reach registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Registries (`host:port`) reached over plain HTTP; every other one over HTTPS.
    pub insecure: Vec<String>,
    /// A docker `config.json` to take credentials from (`auths`), when it exists.
    pub docker_config: Option<PathBuf>,
}

/// A registry failure, said in the terms a caller can act on.
fn registry_error(reference: &str, error: OciDistributionError) -> OciError {
    use OciDistributionError as E;
    match error {
        E::ImageManifestNotFoundError(_) => {
            OciError::NotFound { what: format!("image {reference}"), available: vec![] }
        }
        E::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::NotFound
                        | oci_client::errors::OciErrorCode::BlobUnknown
                )
            }) =>
        {
            OciError::NotFound { what: format!("image {reference}"), available: vec![] }
        }
        E::AuthenticationFailure(why) => OciError::Denied { registry: reference.into(), reason: why },
        E::UnauthorizedError { url } => {
            OciError::Denied { registry: reference.into(), reason: format!("{url}: not authorized") }
        }
        E::DigestError(e) => OciError::DigestMismatch { expected: reference.into(), actual: e.to_string() },
        E::RequestError(e) => {
            OciError::Unreachable { registry: reference.into(), reason: banger_proto::error_chain(&e) }
        }
        E::ServerError { code, url, message } if code >= 500 => {
            OciError::Unreachable { registry: reference.into(), reason: format!("{url}: {code} {message}") }
        }
        other => bad(format!("registry answer for {reference}"), other),
    }
}

/// Credentials for `registry` from a docker `config.json` (`auths.<registry>.auth`, the
/// base64 of `user:password`), else anonymous.
fn credentials(registry: &str, docker_config: Option<&Path>) -> RegistryAuth {
    let Some(json) = docker_config.and_then(|path| std::fs::read(path).ok()) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(&json) else {
        return RegistryAuth::Anonymous;
    };
    let keys = [registry.to_owned(), format!("https://{registry}"), format!("https://{registry}/v1/")];
    let docker_hub = registry == "docker.io" || registry == "index.docker.io" || registry == "registry-1.docker.io";
    let auth = keys
        .iter()
        .chain(docker_hub.then_some(&"https://index.docker.io/v1/".to_owned()))
        .find_map(|key| config["auths"][key]["auth"].as_str().map(str::to_owned));
    let decoded = auth.and_then(|auth| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok()
    });
    match decoded.as_deref().map(String::from_utf8_lossy).as_deref().and_then(|text| text.split_once(':')) {
        Some((user, password)) => RegistryAuth::Basic(user.to_owned(), password.to_owned()),
        None => RegistryAuth::Anonymous,
    }
}

/// Blobs from one repository of a registry.
struct RegistryBlobs<'a> {
    store: &'a BlobStore,
    client: &'a Client,
    reference: &'a Reference,
    auth: &'a RegistryAuth,
    runtime: &'a tokio::runtime::Handle,
}

impl RegistryBlobs<'_> {
    /// Fetches the manifest (or index) `reference` names; returns its bytes and digest.
    fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest), OciError> {
        let whole = reference.whole();
        let (bytes, digest) = self
            .runtime
            .block_on(self.client.pull_manifest_raw(reference, self.auth, ACCEPTED))
            .map_err(|e| registry_error(&whole, e))?;
        if bytes.len() > MANIFEST_LIMIT {
            return Err(bad(format!("manifest of {whole}"), format!("larger than {MANIFEST_LIMIT} bytes")));
        }
        let actual = Digest::of(&bytes);
        // What the registry says the digest is, and what the reference pins, must be it.
        for claimed in [Some(digest.as_str()), reference.digest()].into_iter().flatten() {
            if claimed != actual.as_str() {
                return Err(OciError::DigestMismatch { expected: claimed.to_owned(), actual: actual.to_string() });
            }
        }
        self.store.put(&bytes)?;
        Ok((bytes.to_vec(), actual))
    }
}

impl Blobs for RegistryBlobs<'_> {
    fn fetch(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
        manifest: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), OciError> {
        if self.store.contains(digest) {
            return Ok(());
        }
        if manifest {
            let pinned = self.reference.clone_with_digest(digest.to_string());
            self.manifest(&pinned)?;
            return Ok(());
        }
        let whole = self.reference.whole();
        let descriptor = OciDescriptor {
            digest: digest.to_string(),
            size: size.and_then(|s| i64::try_from(s).ok()).unwrap_or_default(),
            ..Default::default()
        };
        let mut stream = self
            .runtime
            .block_on(self.client.pull_blob_stream(self.reference, &descriptor))
            .map_err(|e| registry_error(&whole, e))?;
        let mut writer = self.store.writer()?;
        while let Some(chunk) = self.runtime.block_on(stream.next()) {
            let chunk = chunk.map_err(|e| OciError::Unreachable {
                registry: whole.clone(),
                reason: format!("reading blob {digest}: {}", banger_proto::error_chain(&e)),
            })?;
            writer.write(&chunk)?;
            progress(Progress::Blob { digest: Some(digest.clone()), done: writer.size(), total: size });
        }
        writer.finish(Some(digest))?;
        Ok(())
    }
}

/// The full form of a registry reference (`debian:bookworm` is
/// `docker.io/library/debian:bookworm`), or `None` when `text` is not one.
pub fn normalize(text: &str) -> Option<String> {
    if text.is_empty() || text.starts_with('/') {
        return None;
    }
    text.parse::<Reference>().ok().map(|reference| reference.whole())
}

/// The image name a pull of `reference` gets when the caller names none: the repository's
/// last part and the tag (`debian:bookworm` → `debian-bookworm`), or the digest's first 12
/// hex digits, cut to 63 characters of what names allow.
pub fn default_name(text: &str) -> Option<String> {
    let reference: Reference = text.parse().ok()?;
    let repository = reference.repository().rsplit('/').next().unwrap_or("image").to_owned();
    let version = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_owned(),
        (None, Some(digest)) => digest.trim_start_matches("sha256:").chars().take(12).collect(),
        (None, None) => "latest".to_owned(),
    };
    let name: String = format!("{repository}-{version}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(63)
        .collect();
    Some(name)
}

/// Pulls `reference` (`debian:bookworm`, `127.0.0.1:5000/ci/builder@sha256:…`) into the
/// store; returns what the image is. Blocking: call it from a blocking thread.
pub fn pull(
    store: &BlobStore,
    reference: &str,
    config: &RegistryConfig,
    runtime: &tokio::runtime::Handle,
    progress: &mut dyn FnMut(Progress),
) -> Result<OciOrigin, OciError> {
    // reqwest is built without a crypto provider of its own: ring's, once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed: Reference = reference.parse().map_err(|e| bad(format!("image reference {reference:?}"), e))?;
    let whole = parsed.whole();
    let registry = parsed.resolve_registry().to_owned();
    let protocol = if config.insecure.is_empty() {
        ClientProtocol::Https
    } else {
        ClientProtocol::HttpsExcept(config.insecure.clone())
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let auth = credentials(&registry, config.docker_config.as_deref());
    let blobs = RegistryBlobs { store, client: &client, reference: &parsed, auth: &auth, runtime };
    let (bytes, digest) = blobs.manifest(&parsed)?;
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
    let top = Descriptor::new(
        MediaType::from(media_type.as_str()),
        bytes.len() as u64,
        oci_spec::image::Digest::try_from(digest.as_str()).map_err(|e| bad("manifest digest", e))?,
    );
    let mut blobs = blobs;
    let mut origin = source::resolve(store, &mut blobs, &top, &whole, progress)?;
    origin.source = whole;
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_and_name_images() {
        assert_eq!(normalize("debian:bookworm").as_deref(), Some("docker.io/library/debian:bookworm"));
        assert_eq!(normalize("/srv/layout"), None);
        assert_eq!(default_name("debian:bookworm").as_deref(), Some("debian-bookworm"));
        assert_eq!(default_name("127.0.0.1:5000/ci/builder:2026-11-RC1").as_deref(), Some("builder-2026-11-rc1"));
        assert_eq!(default_name("127.0.0.1:5000/ci/Builder:x"), None, "repositories are lowercase");
        let pinned = format!("127.0.0.1:5000/ci/builder@sha256:{}", "ab".repeat(32));
        assert_eq!(default_name(&pinned).as_deref(), Some("builder-abababababab"));
    }

    #[test]
    fn credentials_come_from_the_docker_config_for_that_registry_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.json");
        // "ci:s3cret"
        std::fs::write(&config, r#"{"auths":{"registry.example.com":{"auth":"Y2k6czNjcmV0"}}}"#).expect("write");
        match credentials("registry.example.com", Some(&config)) {
            RegistryAuth::Basic(user, password) => assert_eq!((user.as_str(), password.as_str()), ("ci", "s3cret")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(credentials("other.example.com", Some(&config)), RegistryAuth::Anonymous));
        assert!(matches!(credentials("registry.example.com", None), RegistryAuth::Anonymous));
    }
}
