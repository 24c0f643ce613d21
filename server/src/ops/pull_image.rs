//! `image.pull`: a container image (an OCI layout, a docker or OCI archive, or an archive a
//! client streams) becomes a bootable image, with no mount. Stages: `fetch` (every blob into
//! the content-addressed store, verified), `flatten` (the layers merged in memory, each
//! layer's digest checked again as it is read), `build_rootfs` (the merged stream into
//! `mke2fs -d -`), `copy_kernel` (the default image's kernel and initramfs, which start the
//! agent over the image), `insert_record`. A failure at any stage leaves no image and no
//! blob that no image uses.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    Error, FieldViolation, Ops,
    images::{INITRD_FILE, KERNEL_FILE, ROOTFS_FILE},
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{Image, ImageId, ImageProgress, Labels, OciOrigin, OpId, Resource},
    host::{
        fs,
        oci::{self, ProgressFn, Source},
    },
};

/// The kernel command line that makes the initramfs start the agent over the image.
pub const AGENT_INIT_ARGS: &str = "banger.init=agent";
/// The line of the default image's manifest.txt that says its initramfs can.
const INITRAMFS_AGENT_MARK: &str = "initramfs_agent=1";

/// What a caller asks to pull or import.
#[derive(Debug)]
pub struct NewOciImage {
    /// The new image's name.
    pub name: String,
    /// Where it comes from.
    pub source: Source,
    /// Its labels.
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Fetch,
    Flatten,
    BuildRootfs,
    CopyKernel,
    InsertRecord,
}

struct PullImageOp<'a> {
    ops: &'a Ops,
    source: Option<Source>,
    origin: Option<OciOrigin>,
    plan: Option<Arc<oci::flatten::Plan>>,
    /// The root file system of an image of the same manifest, converted already: shared
    /// instead of made again (the same manifest makes the same bytes).
    converted: Option<(PathBuf, u64)>,
    image: Image,
    progress: ProgressFn,
}

impl PullImageOp<'_> {
    fn dir(&self) -> &Path {
        self.image.rootfs_path.parent().unwrap_or(Path::new("/"))
    }

    fn origin(&self) -> Result<OciOrigin, Error> {
        self.origin.clone().ok_or(Error::StageOrder { needs: "fetch" })
    }
}

#[tonic::async_trait]
impl Operation for PullImageOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "image.pull";

    fn stages(&self) -> Vec<Stage> {
        vec![Stage::Fetch, Stage::Flatten, Stage::BuildRootfs, Stage::CopyKernel, Stage::InsertRecord]
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::Fetch => "fetch",
            Stage::Flatten => "flatten",
            Stage::BuildRootfs => "build_rootfs",
            Stage::CopyKernel => "copy_kernel",
            Stage::InsertRecord => "insert_record",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        (self.progress)(ImageProgress::Stage(Self::stage_name(stage)));
        match stage {
            Stage::Fetch => {
                if self.origin.is_none() {
                    let source = self.source.take().ok_or(Error::StageOrder { needs: "a source" })?;
                    let origin = match oci::read_source(self.ops.blobs(), source, self.progress.clone()).await {
                        Ok(origin) => origin,
                        Err(error) => {
                            // What the source brought before it failed: this stage has no undo.
                            if let Err(cleanup) = self.ops.collect_blobs(false).await {
                                tracing::warn!(error = %cleanup, "cannot remove the blobs of a failed fetch");
                            }
                            return Err(error.into());
                        }
                    };
                    self.image.origin = Some(origin.clone());
                    self.origin = Some(origin);
                }
            }
            Stage::Flatten => {
                let origin = self.origin()?;
                self.converted = self.ops.converted(&origin.manifest_digest).await?;
                if self.converted.is_none() {
                    let plan = oci::flatten(self.ops.blobs(), origin, self.progress.clone()).await?;
                    self.plan = Some(plan);
                }
            }
            Stage::BuildRootfs => {
                fs::create_dir(self.dir(), 0o711).await?;
                let out = self.image.rootfs_path.clone();
                if let Some((from, size)) = &self.converted {
                    crate::host::storage::share_file(from, &out).await?;
                    self.image.rootfs_size_bytes = *size;
                } else {
                    let plan = self.plan.clone().ok_or(Error::StageOrder { needs: "flatten" })?;
                    let min = self.ops.config.min_rootfs_bytes;
                    self.image.rootfs_size_bytes =
                        oci::write_rootfs(self.ops.blobs(), self.origin()?, plan, out, min).await?;
                }
            }
            Stage::CopyKernel => {
                let (kernel, initrd) = self.ops.boot_kernel().await?;
                crate::host::storage::copy_file(&kernel, &self.image.kernel_path).await?;
                if let Some(to) = &self.image.initrd_path {
                    crate::host::storage::copy_file(&initrd, to).await?;
                }
            }
            Stage::InsertRecord if self.ops.store.image_get(&self.image.id.to_string()).await.is_ok() => {}
            Stage::InsertRecord => self.ops.store.image_insert(&self.image).await?,
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        match stage {
            // Blobs this pull brought that no image uses.
            Stage::Fetch => self.ops.collect_blobs(false).await,
            // A directory left behind names no record: reconcile removes it as an orphan.
            Stage::BuildRootfs => Ok(fs::remove_dir(self.dir()).await?),
            Stage::Flatten | Stage::CopyKernel | Stage::InsertRecord => Ok(()),
        }
    }

    fn subject(&self) -> Subject {
        Subject { image_id: Some(self.image.id.to_string()), ..Default::default() }
    }
}

/// Checks a source on the host before any work: an absolute path to a layout directory
/// (with its `oci-layout` file) or to a readable regular file.
/// Checks a host path a pull reads (an archive, or a layout's `oci-layout` file) as an
/// import's files are checked (see [`crate::host::import`]): absolute, no symbolic link on
/// the way, a regular file on a real file system, beneath the import roots when configured.
async fn source_violation(
    field: &'static str,
    path: PathBuf,
    layout: bool,
    roots: Option<&[PathBuf]>,
) -> Option<FieldViolation> {
    if !path.is_absolute() {
        return Some(FieldViolation::new(field, format!("{} is not an absolute path", path.display())));
    }
    let file = if layout { path.join("oci-layout") } else { path.clone() };
    match crate::host::import::open_source(&file, roots, 0).await {
        Ok(_) => None,
        Err(why) if layout => {
            Some(FieldViolation::new(field, format!("{} is not an OCI image layout ({why})", path.display())))
        }
        Err(why) => Some(FieldViolation::new(field, why)),
    }
}

impl Ops {
    /// The content-addressed blob store of container images.
    pub(crate) fn blobs(&self) -> oci::BlobStore {
        oci::BlobStore::new(self.config.state_dir.join("blobs"))
    }

    /// Removes blobs no image references (and, with `partials`, partial writes: only when
    /// no pull runs). Serialized with pulls by `pull_lock`'s holder.
    pub(crate) async fn collect_blobs(&self, partials: bool) -> Result<(), Error> {
        let images = self.store.image_list().await?;
        let keep: HashSet<oci::Digest> =
            images.iter().filter_map(|image| image.origin.as_ref()).flat_map(oci::source::blobs_of).collect();
        let removed = oci::collect_garbage(self.blobs(), keep, partials).await?;
        if !removed.is_empty() {
            tracing::info!(blobs = removed.len(), "removed blobs no image uses");
        }
        Ok(())
    }

    /// The root file system (and its size) of an image of this manifest, if one is converted.
    async fn converted(&self, manifest_digest: &str) -> Result<Option<(PathBuf, u64)>, Error> {
        for image in self.store.image_list().await? {
            if image.origin.as_ref().is_some_and(|origin| origin.manifest_digest == manifest_digest)
                && fs::is_file(&image.rootfs_path).await
            {
                return Ok(Some((image.rootfs_path, image.rootfs_size_bytes)));
            }
        }
        Ok(None)
    }

    /// The kernel and initramfs container images boot: the default image's, when its
    /// initramfs can start the agent over an image.
    async fn boot_kernel(&self) -> Result<(PathBuf, PathBuf), Error> {
        let dir = &self.config.default_image_dir;
        let kernel = dir.join(KERNEL_FILE);
        let initrd = dir.join(INITRD_FILE);
        if !fs::is_file(&kernel).await || !fs::is_file(&initrd).await {
            return Err(Error::NoBootKernel { dir: dir.clone(), why: "has no vmlinuz or initrd.img" });
        }
        let manifest = fs::read_to_string(&dir.join("manifest.txt")).await.unwrap_or_default();
        if !manifest.lines().any(|line| line.trim() == INITRAMFS_AGENT_MARK) {
            return Err(Error::NoBootKernel { dir: dir.clone(), why: "has an initramfs that cannot start the agent" });
        }
        Ok((kernel, initrd))
    }

    /// Pulls or imports a container image as operation `op_id`; `progress` hears each stage
    /// and blob progress.
    pub async fn pull_image(&self, mut new: NewOciImage, op_id: OpId, progress: ProgressFn) -> Result<Image, Error> {
        let mut violations = Vec::new();
        if let Source::Registry { reference, config } = &mut new.source {
            *config = self.config.registry.clone();
            match oci::registry::default_name(reference) {
                Some(name) if new.name.is_empty() => new.name = name,
                Some(_) => {}
                None => violations.push(FieldViolation::new(
                    "reference",
                    format!("{reference:?} is not an image reference (NAME[:TAG] or NAME@DIGEST)"),
                )),
            }
        }
        if let Err(e) = crate::domain::image_name_error(&new.name) {
            violations.push(FieldViolation::new("name", e.to_string()));
        }
        if let Err(e) = crate::domain::labels_error(&new.labels) {
            violations.push(FieldViolation::new("labels", e.to_string()));
        }
        let host_path = match &new.source {
            Source::Layout { dir, .. } => Some(("oci_layout", dir.clone(), true)),
            Source::Archive { path, .. } => Some(("archive", path.clone(), false)),
            Source::Stream { .. } | Source::Registry { .. } => None,
        };
        if let Some((field, path, layout)) = host_path
            && let Some(violation) = source_violation(field, path, layout, self.config.import_roots.as_deref()).await
        {
            violations.push(violation);
        }
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        // One conversion at a time: each takes the host's cores, and the blob collection that
        // ends a failed one must not see another's blobs as unused.
        let _turn = self.pull_lock.lock().await;
        if self.store.image_get(&new.name).await.is_ok() {
            return Err(Error::AlreadyExists { kind: Resource::Image, name: new.name });
        }
        self.boot_kernel().await?;
        let id = ImageId::generate();
        let dir = self.images_dir().join(id.to_string());
        let image = Image {
            id,
            name: new.name.clone(),
            kernel_path: dir.join(KERNEL_FILE),
            initrd_path: Some(dir.join(INITRD_FILE)),
            rootfs_path: dir.join(ROOTFS_FILE),
            kernel_args: AGENT_INIT_ARGS.into(),
            rootfs_size_bytes: 0,
            created_at_ms: self.clock().now_ms(),
            labels: new.labels.clone(),
            origin: None,
        };
        super::lock(&self.importing).insert(id);
        let mut op = PullImageOp {
            ops: self,
            source: Some(new.source),
            origin: None,
            plan: None,
            converted: None,
            image,
            progress,
        };
        let pulled = runner::run_with(op_id, &mut op, &self.run_options()).await;
        super::lock(&self.importing).remove(&id);
        pulled?;
        // What the source brought that the image does not use (an archive's other members).
        if let Err(error) = self.collect_blobs(false).await {
            tracing::warn!(image_id = %id, error = %error, "cannot remove blobs no image uses");
        }
        Ok(op.image)
    }
}
