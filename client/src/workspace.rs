//! Directories into a VM as one tar stream (`CopyToVm` with `archive`), and git workspaces:
//! what git would ship of a repository (tracked files as they are in the working tree, with
//! `--include-untracked` the untracked ones too, never an ignored one), pushed into a VM with a
//! `.git` holding exactly that as its one commit (`banger-base`, made on the host, where
//! hashing is quick), so that the guest's changes come back as a patch.

use std::io::Write;
use std::path::{Path, PathBuf};

use banger_client::{Client, pb};
use tonic::Status;

/// Where a workspace goes in the guest unless told otherwise.
pub const DEFAULT_WORKDIR: &str = "/root/repo";

/// Bytes per message of the stream.
const CHUNK: usize = 1 << 20;

/// What goes into the archive.
pub enum Tree {
    /// A directory, all of it (symbolic links stored as links, never followed).
    Directory(PathBuf),
    /// These paths of a repository, relative to its top, then the `.git` directory for them
    /// that a thread builds meanwhile (appended last, so that making it overlaps the stream).
    Listed { root: PathBuf, paths: Vec<PathBuf>, git_dir: Option<std::thread::JoinHandle<Result<PathBuf, String>>> },
}

/// A `Write` that hands full chunks to the upload.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| std::io::Error::other("the upload ended"))
    }
}

/// Writes `tree` as a tar stream into `writer`.
fn write_tar(tree: Tree, writer: &mut ChunkWriter) -> Result<u64, String> {
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut entries = 0u64;
    match tree {
        Tree::Directory(dir) => {
            builder.append_dir_all(".", &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            entries += 1;
        }
        Tree::Listed { root, paths, git_dir } => {
            for path in &paths {
                let source = root.join(path);
                // A tracked file deleted in the working tree is not shipped (git would not).
                let Ok(meta) = std::fs::symlink_metadata(&source) else { continue };
                if meta.is_dir() {
                    continue; // a submodule: its own repository
                }
                builder.append_path_with_name(&source, path).map_err(|e| format!("{}: {e}", source.display()))?;
                entries += 1;
            }
            if let Some(building) = git_dir {
                let git_dir = building.join().map_err(|_| "building the baseline .git panicked".to_owned())??;
                builder.append_dir_all(".git", &git_dir).map_err(|e| format!("{}: {e}", git_dir.display()))?;
            }
        }
    }
    let writer = builder.into_inner().map_err(|e| e.to_string())?;
    writer.flush().map_err(|e| e.to_string())?;
    Ok(entries)
}

/// Streams `tree` into `vm` as the directory `path` (replacing one there); returns the bytes
/// sent. A local read error cancels the call before the stream ends, so the guest keeps
/// nothing of it.
pub async fn upload(client: &mut Client, vm: &str, path: &str, tree: Tree) -> Result<u64, Status> {
    use tokio_stream::StreamExt;
    type Sender = tokio::sync::mpsc::Sender<Vec<u8>>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    // On failure the writer hands its sender back: the stream must not end (which would look
    // like a complete archive) before the call is cancelled.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<u64, (String, Sender)>>();
    std::thread::Builder::new()
        .name("tar".into())
        .spawn(move || {
            let mut writer = ChunkWriter { tx, buffer: Vec::with_capacity(CHUNK) };
            // A panic is a failure like any other: the sender must not be dropped by unwinding.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_tar(tree, &mut writer)))
                .unwrap_or_else(|_| Err("the archive writer panicked".into()));
            let _ = done_tx.send(written.map_err(|why| (why, writer.tx)));
        })
        .map_err(|e| Status::internal(format!("cannot start the archive writer: {e}")))?;
    let start = pb::CopyToVmRequest {
        payload: Some(pb::copy_to_vm_request::Payload::Start(pb::CopyToVmStart {
            vm: vm.to_owned(),
            path: path.to_owned(),
            mode: 0,
            archive: true,
        })),
    };
    let data = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|chunk| pb::CopyToVmRequest { payload: Some(pb::copy_to_vm_request::Payload::Data(chunk)) });
    let mut vms = client.vms.clone();
    let mut call = Box::pin(async move { vms.copy_to_vm(tokio_stream::once(start).chain(data)).await });
    let mut done = std::pin::pin!(done_rx);
    let mut written = false;
    loop {
        tokio::select! {
            outcome = &mut done, if !written => match outcome {
                Ok(Ok(_entries)) => written = true,
                Ok(Err((why, sender))) => {
                    // Cancelled with the stream still open, which it stays (the sender is never
                    // dropped: an ended stream would read as a complete archive, whichever of
                    // the two the connection saw first): the guest discards what it has.
                    drop(call);
                    std::mem::forget(sender);
                    return Err(Status::invalid_argument(why));
                }
                Err(_) => return Err(Status::internal("the archive writer stopped")),
            },
            result = &mut call => return Ok(result?.into_inner().size),
        }
    }
}

/// The files git would ship of the repository at `dir`: its top, and the paths under it.
pub fn git_files(dir: &Path, include_untracked: bool) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let git = |args: &[&str]| -> Result<Vec<u8>, String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{} is not a git repository: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(out.stdout)
    };
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let top = PathBuf::from(String::from_utf8_lossy(&top).trim());
    let mut args = vec!["-c", "core.quotePath=false", "ls-files", "-z", "--cached", "--full-name"];
    if include_untracked {
        args.extend(["--others", "--exclude-standard"]);
    }
    let listed = std::process::Command::new("git")
        .arg("-C")
        .arg(&top)
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !listed.status.success() {
        return Err(format!("git ls-files: {}", String::from_utf8_lossy(&listed.stderr).trim()));
    }
    let mut paths: Vec<PathBuf> = listed
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p)))
        .collect();
    paths.sort();
    paths.dedup();
    Ok((top, paths))
}

/// Runs `script` (sh -c, with `args` as $1…) in the VM, handing its stdout to `out` as it
/// comes (a guest's output is never held whole); a failure carries the first 64 KiB of its
/// stderr.
pub async fn guest_script(
    client: &mut Client,
    vm: &str,
    script: &str,
    args: &[&str],
    out: &mut impl Write,
) -> Result<(), Status> {
    use tokio_stream::StreamExt;
    const STDERR_KEPT: usize = 64 * 1024;
    let mut argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned(), "sh".to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let start = pb::ExecVmStart { vm: vm.to_owned(), argv, ..Default::default() };
    let mut output = client.exec(start, tokio_stream::empty()).await?;
    let mut stderr = Vec::new();
    while let Some(message) = output.next().await {
        match message?.payload {
            Some(pb::exec_vm_response::Payload::Stdout(data)) => {
                out.write_all(&data).map_err(|e| Status::unavailable(format!("writing the output: {e}")))?;
            }
            Some(pb::exec_vm_response::Payload::Stderr(data)) => {
                let room = STDERR_KEPT.saturating_sub(stderr.len());
                stderr.extend_from_slice(&data[..data.len().min(room)]);
            }
            Some(pb::exec_vm_response::Payload::Exit(exit)) => {
                out.flush().map_err(|e| Status::unavailable(format!("writing the output: {e}")))?;
                return match exit.status {
                    Some(pb::exec_exit::Status::Code(0)) => Ok(()),
                    _ => Err(Status::failed_precondition(String::from_utf8_lossy(&stderr).trim().to_owned())),
                };
            }
            None => {}
        }
    }
    Err(Status::unavailable("the exec stream ended without an exit status"))
}

/// The guest's changes since `$2` (the pushed baseline by default), as a binary patch.
const EXPORT: &str = r#"cd "$1" || exit 1
command -v git >/dev/null || { echo "the guest has no git: workspace export needs it (the default image has it)" >&2; exit 3; }
git add -A && git diff --cached --binary "$2""#;

/// The paths of `paths` that exist under `top` as files or links (what git would ship of a
/// working tree: a tracked file deleted there is not, a submodule is its own repository).
fn present(top: &Path, paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths
        .into_iter()
        .filter(|path| std::fs::symlink_metadata(top.join(path)).is_ok_and(|meta| !meta.is_dir()))
        .collect()
}

/// A repository beside the shipped files: one commit of exactly them (tagged `banger-base`,
/// on branch `main`), written as one pack by `git fast-import` (no loose objects), and an index
/// of it without stat data.
fn baseline(top: &Path, paths: &[PathBuf], into: &Path) -> Result<PathBuf, String> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    // The host's git configuration stays out: no template hooks, the object format and ref
    // storage any guest's git reads.
    let init = std::process::Command::new("git")
        .args(["init", "-q", "-b", "main", "--template=", "--object-format=sha1"])
        .arg(into)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !init.status.success() {
        return Err(format!("git init: {}", String::from_utf8_lossy(&init.stderr).trim()));
    }
    let git_dir = into.join(".git");
    let mut child = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&git_dir)
        .args(["fast-import", "--quiet", "--done"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git fast-import: {e}"))?;
    let mut stream = std::io::BufWriter::new(child.stdin.take().ok_or("git fast-import has no stdin")?);
    let mut tree = Vec::with_capacity(paths.len());
    let fed = (|| -> Result<(), String> {
        for (mark, path) in (1..).zip(paths) {
            let source = top.join(path);
            let meta = std::fs::symlink_metadata(&source).map_err(|e| format!("{}: {e}", source.display()))?;
            let (mode, content) = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&source).map_err(|e| format!("{}: {e}", source.display()))?;
                ("120000", target.into_os_string().into_encoded_bytes())
            } else {
                let executable = meta.permissions().mode() & 0o111 != 0;
                let content = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
                (if executable { "100755" } else { "100644" }, content)
            };
            write!(stream, "blob\nmark :{mark}\ndata {}\n", content.len()).map_err(|e| e.to_string())?;
            stream.write_all(&content).map_err(|e| e.to_string())?;
            stream.write_all(b"\n").map_err(|e| e.to_string())?;
            tree.push((mode, mark, path));
        }
        let message = "banger workspace";
        write!(
            stream,
            "commit refs/heads/main\ncommitter banger <banger@localhost> 0 +0000\ndata {}\n{message}\n",
            message.len()
        )
        .map_err(|e| e.to_string())?;
        for (mode, mark, path) in &tree {
            writeln!(stream, "M {mode} :{mark} {}", quoted(path)).map_err(|e| e.to_string())?;
        }
        write!(stream, "\nreset refs/tags/banger-base\nfrom refs/heads/main\n\ndone\n").map_err(|e| e.to_string())?;
        stream.flush().map_err(|e| e.to_string())
    })();
    drop(stream);
    let out = child.wait_with_output().map_err(|e| format!("git fast-import: {e}"))?;
    fed?;
    if !out.status.success() {
        return Err(format!("git fast-import: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    // An index of the commit without stat data: the guest's git checks each file once.
    let read_tree = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&git_dir)
        .args(["read-tree", "main"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !read_tree.status.success() {
        return Err(format!("git read-tree: {}", String::from_utf8_lossy(&read_tree.stderr).trim()));
    }
    Ok(git_dir)
}

/// A path as fast-import reads a C-style quoted one: any byte survives (controls and bytes
/// above 0x7f as octal escapes).
fn quoted(path: &Path) -> String {
    let mut out = String::from("\"");
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(char::from(*byte)),
            other => out.push_str(&format!("\\{other:03o}")),
        }
    }
    out.push('"');
    out
}

/// A directory out of a VM: the tar stream `stream` carries (after its info) is extracted,
/// as it arrives, into a new directory beside `target`, renamed to `target` once complete
/// (`target` must not exist: nothing is replaced). The guest is untrusted: only regular
/// files, directories and symbolic links, nothing outside the new directory, and no setuid,
/// setgid or sticky bits unless `preserve_special`. Returns the entries extracted.
pub async fn download(
    mut stream: tonic::Streaming<pb::CopyFromVmResponse>,
    target: &Path,
    preserve_special: bool,
) -> Result<u64, Status> {
    if std::fs::symlink_metadata(target).is_ok() {
        return Err(Status::already_exists(format!("{} exists: not replaced", target.display())));
    }
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".banger-cp")
        .tempdir_in(&parent)
        .map_err(|e| Status::invalid_argument(format!("{}: {e}", parent.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let into = staging.path().to_path_buf();
    let extracting = tokio::task::spawn_blocking(move || {
        extract(ChunkReader { rx, chunk: Vec::new(), at: 0 }, &into, preserve_special)
    });
    let received = async {
        while let Some(message) = stream.message().await? {
            let data = match message.payload {
                Some(pb::copy_from_vm_response::Payload::Data(data)) => data,
                Some(pb::copy_from_vm_response::Payload::Info(_)) => {
                    return Err(Status::data_loss("the guest announced its directory twice"));
                }
                None => continue,
            };
            if tx.send(data).await.is_err() {
                break; // the extractor stopped: its error says why
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let extracted = extracting.await.map_err(|e| Status::internal(format!("extracting: {e}")))?;
    received?;
    let entries = extracted.map_err(|why| Status::data_loss(format!("the archive from the guest: {why}")))?;
    // Dropped on any error above: the staging directory and what it holds are removed.
    let staged = staging.keep();
    std::fs::rename(&staged, target).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        Status::invalid_argument(format!("{}: {e}", target.display()))
    })?;
    Ok(entries)
}

/// The chunks of a stream, as a blocking reader.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => (self.chunk, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Unpacks an untrusted tar stream into `into`: regular files, directories and symbolic
/// links only, nothing outside `into`, special bits dropped unless `preserve_special`.
fn extract(reader: impl std::io::Read, into: &Path, preserve_special: bool) -> Result<u64, String> {
    use std::os::unix::fs::PermissionsExt;
    use tar::EntryType;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    let mut entries = 0u64;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map(|p| p.into_owned()).map_err(|e| e.to_string())?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory | EntryType::Symlink => {}
            EntryType::XGlobalHeader => continue,
            other => return Err(format!("{}: {other:?} entries are not taken", name.display())),
        }
        match entry.unpack_in(into) {
            Ok(true) => entries += 1,
            Ok(false) => return Err(format!("{} would land outside the directory", name.display())),
            Err(err) => return Err(format!("{}: {err}", name.display())),
        }
        if !preserve_special && kind != EntryType::Symlink {
            let path = into.join(&name);
            if let Ok(meta) = std::fs::symlink_metadata(&path)
                && !meta.file_type().is_symlink()
                && meta.permissions().mode() & 0o7000 != 0
            {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.permissions().mode() & 0o777))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
    }
    Ok(entries)
}

/// Pushes what git would ship of `dir` into `vm` at `workdir`, with a `.git` whose one
/// commit is exactly that; returns how many files went.
pub async fn push(
    client: &mut Client,
    vm: &str,
    dir: &Path,
    workdir: &str,
    include_untracked: bool,
) -> Result<usize, Status> {
    let (top, paths) = git_files(dir, include_untracked).map_err(Status::invalid_argument)?;
    let paths = present(&top, paths);
    let scratch = tempfile::tempdir().map_err(|e| Status::internal(format!("a temporary directory: {e}")))?;
    // Built while the files stream (it goes last): off the critical path.
    let (base_top, base_paths, into) = (top.clone(), paths.clone(), scratch.path().to_path_buf());
    let building = std::thread::Builder::new()
        .name("baseline".into())
        .spawn(move || baseline(&base_top, &base_paths, &into))
        .map_err(|e| Status::internal(format!("cannot start the baseline's thread: {e}")))?;
    let count = paths.len();
    upload(client, vm, workdir, Tree::Listed { root: top, paths, git_dir: Some(building) }).await?;
    drop(scratch);
    Ok(count)
}

/// The guest's changes in `workdir` since `base` (default: what was pushed), as a binary
/// git patch.
pub async fn export(
    client: &mut Client,
    vm: &str,
    workdir: &str,
    base: Option<&str>,
    out: &mut impl Write,
) -> Result<(), Status> {
    guest_script(client, vm, EXPORT, &[workdir, base.unwrap_or("banger-base")], out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("tar")
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header
    }

    #[test]
    fn an_archive_from_a_guest_lands_only_inside_and_without_special_bits() {
        use std::os::unix::fs::PermissionsExt;
        let into = tempfile::tempdir().expect("tempdir");
        let setuid = archive(|b| {
            b.append_data(&mut header(tar::EntryType::Regular, 0o4755, 2), "tool", &b"hi"[..]).expect("file");
        });
        assert_eq!(extract(&setuid[..], into.path(), false), Ok(1));
        let mode = std::fs::metadata(into.path().join("tool")).expect("tool").permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);

        let outside = tempfile::tempdir().expect("outside");
        let escape = archive(|b| {
            let mut link = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut link, "out", outside.path()).expect("link");
            b.append_data(&mut header(tar::EntryType::Regular, 0o644, 1), "out/x", &b"x"[..]).expect("file");
        });
        let fresh = tempfile::tempdir().expect("tempdir");
        assert!(extract(&escape[..], fresh.path(), false).is_err());
        assert!(!outside.path().join("x").exists());
        let device = archive(|b| {
            b.append_data(&mut header(tar::EntryType::Char, 0o644, 0), "null", &[][..]).expect("device");
        });
        assert!(extract(&device[..], tempfile::tempdir().expect("tempdir").path(), true).is_err());
    }

    #[test]
    fn paths_are_quoted_so_that_every_byte_survives() {
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"a \"b\"\\c\nd\xff.txt"));
        assert_eq!(quoted(odd), "\"a \\\"b\\\"\\\\c\\012d\\377.txt\"");
        assert_eq!(quoted(Path::new("many/file-1")), "\"many/file-1\"");
    }
}
