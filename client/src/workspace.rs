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
    /// These paths of a repository, relative to its top, and a `.git` directory for them.
    Listed { root: PathBuf, paths: Vec<PathBuf>, git_dir: Option<PathBuf> },
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
fn write_tar(tree: &Tree, writer: &mut ChunkWriter) -> Result<u64, String> {
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut entries = 0u64;
    match tree {
        Tree::Directory(dir) => {
            builder.append_dir_all(".", dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            entries += 1;
        }
        Tree::Listed { root, paths, git_dir } => {
            if let Some(git_dir) = git_dir {
                builder.append_dir_all(".git", git_dir).map_err(|e| format!("{}: {e}", git_dir.display()))?;
            }
            for path in paths {
                let source = root.join(path);
                // A tracked file deleted in the working tree is not shipped (git would not).
                let Ok(meta) = std::fs::symlink_metadata(&source) else { continue };
                if meta.is_dir() {
                    continue; // a submodule: its own repository
                }
                builder.append_path_with_name(&source, path).map_err(|e| format!("{}: {e}", source.display()))?;
                entries += 1;
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
            let written = write_tar(&tree, &mut writer);
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
                    // Cancelled first, the stream still open: the guest discards what it has.
                    drop(call);
                    drop(sender);
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

/// Runs `script` (sh -c, with `args` as $1…) in the VM; its stdout, or a status with its
/// stderr.
pub async fn guest_script(client: &mut Client, vm: &str, script: &str, args: &[&str]) -> Result<Vec<u8>, Status> {
    use tokio_stream::StreamExt;
    let mut argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned(), "sh".to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let start = pb::ExecVmStart { vm: vm.to_owned(), argv, ..Default::default() };
    let mut output = client.exec(start, tokio_stream::empty()).await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(message) = output.next().await {
        match message?.payload {
            Some(pb::exec_vm_response::Payload::Stdout(data)) => stdout.extend(data),
            Some(pb::exec_vm_response::Payload::Stderr(data)) => stderr.extend(data),
            Some(pb::exec_vm_response::Payload::Exit(exit)) => {
                return match exit.status {
                    Some(pb::exec_exit::Status::Code(0)) => Ok(stdout),
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
    let init = std::process::Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .arg(into)
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
    let git_dir = tokio::task::block_in_place(|| baseline(&top, &paths, scratch.path())).map_err(Status::internal)?;
    let count = paths.len();
    upload(client, vm, workdir, Tree::Listed { root: top, paths, git_dir: Some(git_dir) }).await?;
    Ok(count)
}

/// The guest's changes in `workdir` since `base` (default: what was pushed), as a binary
/// git patch.
pub async fn export(client: &mut Client, vm: &str, workdir: &str, base: Option<&str>) -> Result<Vec<u8>, Status> {
    guest_script(client, vm, EXPORT, &[workdir, base.unwrap_or("banger-base")]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_so_that_every_byte_survives() {
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"a \"b\"\\c\nd\xff.txt"));
        assert_eq!(quoted(odd), "\"a \\\"b\\\"\\\\c\\012d\\377.txt\"");
        assert_eq!(quoted(Path::new("many/file-1")), "\"many/file-1\"");
    }
}
