//! Workspaces: a real git repository into a real guest (the default Debian image, which has
//! git) as git would ship it, the guest's edit back as a patch `git apply` takes; directories
//! through `vm cp` as one tar stream.

use std::path::Path;
use std::process::Command;

use banger_tests::{Daemon, debian_image_dir, guest_slot, text};

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(repo).args(args).output().expect("git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A repository with a tracked change, an untracked file, an ignored file, a symlink, an
/// executable and a 10,000-file directory.
fn repository(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).expect("repo");
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "first line\n").expect("README");
    std::fs::write(repo.join("run.sh"), "#!/bin/sh\necho ran\n").expect("run.sh");
    std::fs::set_permissions(repo.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("README", repo.join("link")).expect("link");
    std::fs::write(repo.join(".gitignore"), "ignored.txt\n").expect(".gitignore");
    std::fs::create_dir(repo.join("many")).expect("many");
    for i in 0..10_000 {
        std::fs::write(repo.join(format!("many/file-{i}")), format!("{i}\n")).expect("many");
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "base"]);
    std::fs::write(repo.join("README"), "first line\nchanged on the host\n").expect("README");
    std::fs::write(repo.join("ignored.txt"), "never shipped\n").expect("ignored");
    std::fs::write(repo.join("untracked.txt"), "only with --include-untracked\n").expect("untracked");
    repo
}

#[test]
fn a_repository_goes_in_as_git_would_ship_it_and_the_guests_edit_comes_back_as_a_patch() {
    let _slot = guest_slot();
    let debian = debian_image_dir().display().to_string();
    let daemon = Daemon::start(&["--default-image-dir", &debian]);
    let repo = repository(daemon.dir.path());
    let repo_arg = repo.display().to_string();

    // `vm run REPO -- cmd`: the command runs in /root/repo, which holds what git ships.
    let listing = "find . -path ./.git -prune -o \\( -type f -o -type l \\) -print | sed 's|^\\./||' | sort; \
                   echo cwd=$(pwd); stat -c 'mode=%a' run.sh; echo link=$(readlink link); ./run.sh; cat README";
    let out = daemon.banger(&["vm", "run", "--name", "ws", &repo_arg, "--", "sh", "-c", listing]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stderr), daemon.log());
    let stdout = text(&out.stdout);
    let mut shipped: Vec<String> = git(&repo, &["ls-files"]).lines().map(str::to_owned).collect();
    shipped.sort();
    let seen: Vec<String> = stdout.lines().take_while(|line| !line.starts_with("cwd=")).map(str::to_owned).collect();
    assert_eq!(seen.len(), 10_004, "README, run.sh, link, .gitignore and many/*");
    assert_eq!(seen, shipped, "the guest holds exactly what git ships");
    for expected in ["cwd=/root/repo", "mode=755", "link=README", "ran", "first line\nchanged on the host\n"] {
        assert!(stdout.contains(expected), "{expected:?} not in {stdout}");
    }

    // An edit in the guest comes back as a patch that applies on the host.
    let edit = "cd /root/repo && echo 'changed in the guest' >> README && echo new > added.txt && \
                rm run.sh && chmod 600 .gitignore";
    let out = daemon.banger(&["vm", "exec", "ws", "--", "sh", "-c", edit]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "workspace", "export", "ws"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let patch = daemon.dir.path().join("change.patch");
    std::fs::write(&patch, &out.stdout).expect("patch");
    let patch_text = text(&out.stdout);
    assert!(
        patch_text.contains("+changed in the guest") && patch_text.contains("deleted file mode 100755"),
        "{patch_text}"
    );
    git(&repo, &["apply", "--check", &patch.display().to_string()]);
    git(&repo, &["apply", &patch.display().to_string()]);
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).expect("README"),
        "first line\nchanged on the host\nchanged in the guest\n"
    );
    assert!(repo.join("added.txt").exists() && !repo.join("run.sh").exists());

    // push --include-untracked: the untracked file too, never the ignored one.
    let out = daemon.banger(&["vm", "workspace", "push", "ws", &repo_arg, "-w", "/root/again", "--include-untracked"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "ws", "--", "sh", "-c", "cd /root/again && ls -a"]);
    let names = text(&out.stdout);
    assert!(names.contains("untracked.txt") && names.contains("added.txt"), "{names}");
    assert!(!names.contains("ignored.txt"), "{names}");

    // A directory through `vm cp`: modes and links kept; a second copy replaces the first.
    let dir = daemon.dir.path().join("tree");
    std::fs::create_dir_all(dir.join("sub")).expect("tree");
    std::fs::write(dir.join("sub/tool"), "#!/bin/sh\n").expect("tool");
    std::fs::set_permissions(dir.join("sub/tool"), std::os::unix::fs::PermissionsExt::from_mode(0o750)).expect("chmod");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd-link")).expect("link");
    let target = "ws:/root/tree";
    for _ in 0..2 {
        let out = daemon.banger(&["vm", "cp", &dir.display().to_string(), target]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let check =
        "stat -c '%a %F' /root/tree/sub/tool; readlink /root/tree/passwd-link; ls -a /root | grep -c banger || true";
    let out = daemon.banger(&["vm", "exec", "ws", "--", "sh", "-c", check]);
    assert_eq!(text(&out.stdout), "750 regular file\n/etc/passwd\n0\n", "{}", text(&out.stderr));

    // And out again: the guest's directory as a tree beside nothing it replaces.
    let back = daemon.dir.path().join("back");
    let out = daemon.banger(&["vm", "cp", "ws:/root/tree", &back.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tool = std::fs::metadata(back.join("sub/tool")).expect("tool");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&tool.permissions()) & 0o7777, 0o750);
    assert_eq!(std::fs::read_link(back.join("passwd-link")).expect("link"), Path::new("/etc/passwd"));
    // Into an existing directory, as cp does; never over something there.
    let out = daemon.banger(&["vm", "cp", "ws:/root/tree", &back.display().to_string()]);
    assert!(out.status.success() && back.join("tree/sub/tool").is_file(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "cp", "ws:/root/tree", &back.display().to_string()]);
    assert!(!out.status.success() && text(&out.stderr).contains("exists"), "{}", text(&out.stderr));
    let leftovers: Vec<_> = std::fs::read_dir(daemon.dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains("banger-cp"))
        .collect();
    assert!(leftovers.is_empty(), "a refused copy left {leftovers:?}");

    // A path that is no repository is refused before any VM is made.
    let out =
        daemon.banger(&["vm", "run", "--rm", &daemon.dir.path().join("tree").display().to_string(), "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("not a git repository"), "{}", text(&out.stderr));
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert_eq!(list.lines().count(), 2, "only ws: {list}");
}
