//! Container images end to end: OCI layouts, docker archives and streamed uploads become
//! bootable images with no mount; each rule of the layer merge is checked on the ext4 itself
//! (debugfs, no mount) and from inside a booted guest; a real Debian root file system runs
//! apt; hostile sources are refused and leave nothing; a daemon killed in the middle of a
//! pull leaves no half image. Needs `make setup` and `make test-images`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use banger_tests::{Daemon, guest_slot, oci, repo_root, text};
use nix::sys::signal::Signal;

fn field(out: &Output, name: &str) -> Option<String> {
    let prefix = format!("{name}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

fn ok(daemon: &Daemon, args: &[&str]) -> Output {
    let out = daemon.banger(args);
    assert!(out.status.success(), "banger {args:?}: {}{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log());
    out
}

fn image_field(daemon: &Daemon, image: &str, name: &str) -> String {
    let out = ok(daemon, &["image", "show", image]);
    field(&out, name).unwrap_or_else(|| panic!("image show {image}: no {name}: {}", text(&out.stdout)))
}

/// The rootfs path out of `image show`'s `rootfs: PATH (N bytes)`.
fn rootfs_of(daemon: &Daemon, image: &str) -> PathBuf {
    let rootfs = image_field(daemon, image, "rootfs");
    PathBuf::from(rootfs.split(" (").next().expect("path"))
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").args(["-R", request]).arg(image).output().expect("debugfs");
    assert!(out.status.success(), "debugfs {request}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn blobs(daemon: &Daemon) -> Vec<String> {
    let dir = daemon.state_dir().join("blobs/sha256");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn exec(daemon: &Daemon, vm: &str, script: &str) -> String {
    text(&ok(daemon, &["vm", "exec", vm, "--", "sh", "-c", script]).stdout)
}

#[test]
fn a_container_image_keeps_every_layer_rule_on_its_disk_and_in_its_guest() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let layout = daemon.dir.path().join("layout");
    let mut layers = vec![oci::busybox_layer()];
    layers.extend(oci::rule_layers());
    let config = oci::Config {
        env: vec!["FROM_IMAGE=yes".into(), "OVERRIDDEN=image".into()],
        working_dir: "/etc".into(),
        user: "1234:5678".into(),
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    let manifest = oci::write_layout(&layout, "rules", &config, &layers);
    let source = format!("{}:rules", layout.display());
    let out = ok(&daemon, &["image", "import", "rules", "--oci", &source]);
    // Not a terminal: one line per stage.
    let stages: Vec<String> = text(&out.stderr).lines().map(str::to_owned).collect();
    assert_eq!(stages, ["fetch", "flatten", "build_rootfs", "copy_kernel", "insert_record"], "{stages:?}");
    assert_eq!(image_field(&daemon, "rules", "manifest"), manifest);
    assert_eq!(image_field(&daemon, "rules", "platform"), "linux/amd64");
    assert_eq!(image_field(&daemon, "rules", "user"), "1234:5678");
    let shown = text(&ok(&daemon, &["image", "show", "rules"]).stdout);
    assert_eq!(shown.matches("application/vnd.oci.image.layer.v1.tar+gzip").count(), 3, "{shown}");

    // The ext4 itself, read without mounting it.
    let rootfs = rootfs_of(&daemon, "rules");
    let etc = debugfs(&rootfs, "ls -l /etc");
    for present in ["owned", "symlink", "null", "fifo", "cross-layer", "keeps-old", "user-xattr", &"n".repeat(255)] {
        assert!(etc.contains(present), "{present} missing from /etc:\n{etc}");
    }
    assert!(!etc.contains("doomed") && !etc.contains(".wh."), "whiteouts applied:\n{etc}");
    assert!(debugfs(&rootfs, "stat /etc/owned").contains("User:  1234   Group:  5678"));
    assert!(debugfs(&rootfs, "stat /usr/bin/setuid").contains("Mode:  04755"));
    assert!(debugfs(&rootfs, "stat /etc/null").contains("Device major/minor number: 01:03"));
    assert!(debugfs(&rootfs, "ea_list /usr/bin/capable").contains("security.capability"));
    assert!(debugfs(&rootfs, "ea_list /etc/user-xattr").contains("user.banger"));
    let opaque = debugfs(&rootfs, "ls /opaque");
    assert!(opaque.contains("upper") && !opaque.contains("lower"), "{opaque}");
    assert!(debugfs(&rootfs, "stat /many/file-9999").contains("Size: 12"));

    // The same, from inside a guest booted from it.
    ok(&daemon, &["vm", "create", "--name", "rules", "--image", "rules"]);
    let stat = exec(
        &daemon,
        "rules",
        "stat -c '%n %u:%g %a %F %h' /etc/owned /usr/bin/setuid /etc/fifo /shared/original /etc/cross-layer",
    );
    for line in [
        "/etc/owned 1234:5678 644 regular file 1",
        "/usr/bin/setuid 0:0 4755 regular file 1",
        "/etc/fifo 0:0 644 fifo 1",
        "/shared/original 0:0 640 regular file 3",
        "/etc/cross-layer 0:0 640 regular file 3",
    ] {
        assert!(stat.lines().any(|l| l == line), "{line} not in:\n{stat}");
    }
    let checks = exec(
        &daemon,
        "rules",
        "stat -c '%t:%T %F' /etc/null; readlink /etc/symlink; cat /etc/keeps-old; echo; cat /etc/replaced; echo; \
         ls /opaque; ls /many | wc -l; test -e /etc/doomed || echo doomed-gone; ls /etc | grep -c '^nnnnnnnn'; \
         id; pwd; echo \"$FROM_IMAGE $OVERRIDDEN\"",
    );
    let expected = "1:3 character special file\n/shared/original\nold\nnew\nupper\n10000\ndoomed-gone\n1\n\
                    uid=1234 gid=5678 groups=5678\n/etc\nyes image\n";
    assert_eq!(checks, expected);
    // A request's own user, directory and variables win over the image's.
    let own = text(
        &ok(
            &daemon,
            &[
                "vm",
                "exec",
                "rules",
                "-u",
                "0",
                "-w",
                "/",
                "-e",
                "OVERRIDDEN=mine",
                "--",
                "sh",
                "-c",
                "id -u; pwd; echo $OVERRIDDEN",
            ],
        )
        .stdout,
    );
    assert_eq!(own, "0\n/\nmine\n");

    // Deleting the image in use is refused; once its VM is gone, it and its blobs go.
    let refused = daemon.banger(&["image", "delete", "rules"]);
    assert!(!refused.status.success() && text(&refused.stderr).contains("FAILED_PRECONDITION"));
    assert_eq!(blobs(&daemon).len(), 5, "three layers, a config, a manifest: {:?}", blobs(&daemon));
    ok(&daemon, &["vm", "delete", "rules"]);
    ok(&daemon, &["image", "delete", "rules"]);
    assert_eq!(blobs(&daemon), Vec::<String>::new(), "the last image took its blobs along");
}

/// The Debian root file system `make test-images` built.
fn minbase() -> Vec<u8> {
    let path = repo_root().join("build/cache/debian-minbase-bookworm.tar");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; `make test-images` (make test runs it) builds it", path.display()))
}

/// A daemon whose config lets it pull from `registry` over plain HTTP.
fn daemon_for(registry: &banger_tests::Registry) -> (Daemon, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(config.path(), format!("insecure_registries = [\"{}\"]\n", registry.address)).expect("write config");
    (Daemon::start(&["--config", &config.path().display().to_string()]), config)
}

#[test]
fn a_debian_image_from_a_registry_an_archive_or_an_upload_runs_apt_and_is_converted_once() {
    let _slot = guest_slot();
    let registry = banger_tests::Registry::start();
    let (daemon, _config) = daemon_for(&registry);
    let config = oci::Config {
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cmd: vec!["bash".into()],
        ..Default::default()
    };
    let archive = daemon.dir.path().join("debian.tar");
    std::fs::write(&archive, oci::docker_archive("debian:minbase", &config, &[minbase()])).expect("archive");
    let archive = archive.display().to_string();
    ok(&daemon, &["image", "import", "debian", "--docker-archive", &archive, "--tag", "debian:minbase"]);
    // The same archive again, streamed by the client as if from another machine.
    ok(&daemon, &["image", "import", "uploaded", "--upload", &archive]);
    assert_eq!(image_field(&daemon, "debian", "manifest"), image_field(&daemon, "uploaded", "manifest"));
    assert!(image_field(&daemon, "uploaded", "source").starts_with("docker-archive:upload:"));
    // The same manifest converted already: its root file system is shared, not made again.
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).expect("rootfs").ino();
    assert_eq!(inode(&rootfs_of(&daemon, "debian")), inode(&rootfs_of(&daemon, "uploaded")));
    assert_eq!(blobs(&daemon).len(), 3, "one layer, a config, a manifest, stored once: {:?}", blobs(&daemon));

    ok(&daemon, &["vm", "create", "--name", "deb", "--image", "debian"]);
    let version = exec(&daemon, "deb", "cat /etc/debian_version");
    assert!(version.starts_with("12."), "{version}");
    let apt = exec(&daemon, "deb", "apt-get --version | head -n1");
    assert!(apt.starts_with("apt 2."), "{apt}");
    assert_eq!(exec(&daemon, "deb", "id"), "uid=0(root) gid=0(root) groups=0(root)\n");
    let nobody = text(&ok(&daemon, &["vm", "exec", "deb", "-u", "nobody", "--", "id"]).stdout);
    assert_eq!(nobody, "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n");
    let unknown = daemon.banger(&["vm", "exec", "deb", "-u", "ghost", "--", "id"]);
    assert!(text(&unknown.stderr).contains("INVALID_ARGUMENT") && text(&unknown.stderr).contains("ghost"));
    ok(&daemon, &["vm", "delete", "deb"]);

    let run = ok(&daemon, &["vm", "run", "--rm", "--image", "uploaded", "--", "cat", "/etc/os-release"]);
    assert!(text(&run.stdout).contains("bookworm"), "{}", text(&run.stdout));

    // The same root file system from a registry (skopeo pushes it gzipped): `vm run --image
    // REF` pulls it on first use.
    registry.push(&format!("docker-archive:{archive}"), "debian:minbase");
    let reference = format!("{}/debian:minbase", registry.address);
    let run =
        ok(&daemon, &["vm", "run", "--rm", "--image", &reference, "--", "sh", "-c", "cat /etc/debian_version; id -un"]);
    let out = text(&run.stdout);
    assert!(out.starts_with("12.") && out.ends_with("root\n"), "{out}");
    assert!(text(&run.stderr).contains(&format!("pulling {reference}")), "{}", text(&run.stderr));
    assert_eq!(image_field(&daemon, "debian-minbase", "source"), reference);
    assert_eq!(image_field(&daemon, "debian-minbase", "config"), image_field(&daemon, "debian", "config"));
}

#[test]
fn hostile_sources_are_refused_with_their_code_and_leave_nothing() {
    use oci::Entry as E;
    let daemon = Daemon::start(&[]);
    let escape = format!("../../../../../../tmp/banger-escape-{}", std::process::id());
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "dotdot",
            vec![oci::layer(&[E::Raw(escape.as_bytes().to_vec(), tar::EntryType::Regular)])],
            "INVALID_ARGUMENT",
        ),
        (
            "absolute",
            vec![oci::layer(&[E::Raw(b"/etc/banger-x".to_vec(), tar::EntryType::Regular)])],
            "INVALID_ARGUMENT",
        ),
        (
            "symlink",
            vec![oci::layer(&[E::Sym("escape", "/")]), oci::layer(&[E::File("escape/tmp/banger-x", b"x", 0o644)])],
            "INVALID_ARGUMENT",
        ),
        ("truncated", vec![oci::layer(&[E::Many("many", 3000)])[..4000].to_vec()], "DATA_LOSS"),
    ];
    for (name, layers, code) in cases {
        let layout = daemon.dir.path().join(name);
        oci::write_layout(&layout, "t", &Default::default(), &layers);
        let out = daemon.banger(&["image", "import", name, "--oci", &format!("{}:t", layout.display())]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains(code), "{name}: {stderr}");
        assert!(stderr.contains("layer"), "{name}: the error names the layer: {stderr}");
    }
    let tampered = daemon.dir.path().join("tampered");
    let layer = oci::layer(&[E::File("a", b"a", 0o644)]);
    oci::write_layout(&tampered, "t", &Default::default(), std::slice::from_ref(&layer));
    let blob = tampered.join("blobs/sha256").join(&oci::digest(&layer)["sha256:".len()..]);
    std::fs::write(&blob, oci::layer(&[E::File("a", b"tampered", 0o644)])).expect("tamper");
    let out = daemon.banger(&["image", "import", "tampered", "--oci", &format!("{}:t", tampered.display())]);
    assert!(text(&out.stderr).contains("DATA_LOSS"), "{}", text(&out.stderr));
    let arm = daemon.dir.path().join("arm");
    oci::write_multi_platform_layout(&arm, "t", &["linux/arm64"], std::slice::from_ref(&layer));
    let out = daemon.banger(&["image", "import", "arm", "--oci", &format!("{}:t", arm.display())]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION") && stderr.contains("linux/arm64"), "{stderr}");
    let out = daemon.banger(&["image", "import", "tagless", "--oci", &format!("{}:nope", arm.display())]);
    assert!(text(&out.stderr).contains("NOT_FOUND"), "{}", text(&out.stderr));

    assert!(!Path::new(&format!("/tmp/banger-escape-{}", std::process::id())).exists(), "written outside");
    assert!(!Path::new("/tmp/banger-x").exists() && !Path::new("/etc/banger-x").exists(), "written outside");
    assert_eq!(blobs(&daemon), Vec::<String>::new(), "blobs left");
    let images = text(&ok(&daemon, &["image", "ls"]).stdout);
    assert_eq!(images.lines().count(), 1, "no image recorded, the daemon still serving:\n{images}");
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("images")).map(|d| d.count()).unwrap_or(0), 0);
}

#[test]
fn a_daemon_killed_in_the_middle_of_a_pull_leaves_no_half_image_and_the_next_pull_completes() {
    let mut daemon = Daemon::start_with_env(&[], &[("BANGER_DEBUG_PAUSE_AT", "image.pull:copy_kernel")]);
    let layout = daemon.dir.path().join("layout");
    oci::write_layout(&layout, "t", &Default::default(), &oci::rule_layers_with(100));
    let source = format!("{}:t", layout.display());
    let mut cli = daemon.banger_spawn(&["image", "import", "killed", "--oci", &source]);
    daemon.wait_for_log("\"operation paused\"", Duration::from_secs(60));
    assert!(!blobs(&daemon).is_empty(), "the pull had stored its blobs");
    daemon.signal(Signal::SIGKILL);
    let _ = cli.kill();
    let _ = cli.wait();

    daemon.set_env(&[]);
    daemon.restart();
    let images = text(&ok(&daemon, &["image", "ls"]).stdout);
    assert!(!images.contains("killed"), "{images}");
    assert_eq!(blobs(&daemon), Vec::<String>::new(), "reconcile removed the pull's blobs");
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("images")).map(|d| d.count()).unwrap_or(0), 0);
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("blobs/tmp")).map(|d| d.count()).unwrap_or(0), 0);
    ok(&daemon, &["image", "import", "killed", "--oci", &source]);
    assert_eq!(blobs(&daemon).len(), 4);
}

#[test]
fn images_pulled_from_a_registry_boot_share_their_layers_and_fail_with_the_right_code() {
    let _slot = guest_slot();
    let registry = banger_tests::Registry::start();
    let layout = tempfile::tempdir().expect("tempdir");
    let mut layers = vec![oci::busybox_layer()];
    layers.extend(oci::rule_layers_with(100));
    let config = oci::Config {
        env: vec!["FROM_IMAGE=registry".into()],
        cmd: vec!["sh".into(), "-c".into(), "echo $FROM_IMAGE from its Cmd".into()],
        ..Default::default()
    };
    oci::write_layout(layout.path(), "v1", &config, &layers);
    registry.push(&format!("oci:{}:v1", layout.path().display()), "ci/rules:v1");
    registry.push(&format!("oci:{}:v1", layout.path().display()), "ci/rules-again:v1");
    let arm = tempfile::tempdir().expect("tempdir");
    oci::write_multi_platform_layout(arm.path(), "v1", &["linux/arm64"], &[oci::layer(&[])]);
    registry.push(&format!("oci:{}:v1", arm.path().display()), "ci/arm:v1");

    let (daemon, _config) = daemon_for(&registry);
    let reference = format!("{}/ci/rules:v1", registry.address);
    let out = ok(&daemon, &["image", "pull", &reference]);
    assert!(text(&out.stdout).starts_with("pulled rules-v1 "), "{}", text(&out.stdout));
    assert_eq!(image_field(&daemon, "rules-v1", "source"), reference);
    let downloads = registry.blob_downloads();
    assert_eq!(downloads, 4, "three layers and a config, and nothing twice:\n{}", registry.log());

    // The same layers under another name: only the manifest is downloaded.
    let digest = image_field(&daemon, "rules-v1", "manifest");
    let pinned = format!("{}/ci/rules-again@{digest}", registry.address);
    ok(&daemon, &["image", "pull", &pinned, "--name", "again"]);
    assert_eq!(registry.blob_downloads(), downloads, "a second pull downloads no blob:\n{}", registry.log());
    assert_eq!(image_field(&daemon, "again", "manifest"), digest);

    // `vm run --image REF` finds the image pulled from it; one not pulled yet is pulled first.
    let run = ok(
        &daemon,
        &["vm", "run", "--rm", "--image", &reference, "--", "sh", "-c", "echo $FROM_IMAGE; ls /many | wc -l"],
    );
    assert_eq!(text(&run.stdout), "registry\n100\n");
    // No command: the image's own Entrypoint and Cmd, like `docker run IMAGE`.
    let run = ok(&daemon, &["vm", "run", "--rm", "--image", &reference]);
    assert_eq!(text(&run.stdout), "registry from its Cmd\n");
    ok(&daemon, &["image", "delete", "again"]);
    let run = ok(&daemon, &["vm", "run", "--rm", "--image", &pinned, "--", "cat", "/etc/keeps-old"]);
    assert_eq!(text(&run.stdout), "old");
    assert!(text(&run.stderr).contains(&format!("pulling {pinned}")), "{}", text(&run.stderr));

    // Failures, each with its code, leaving no image and no blob behind.
    let blobs_before = blobs(&daemon);
    let expect = |args: &[&str], code: &str| {
        let out = daemon.banger(args);
        assert!(!out.status.success() && text(&out.stderr).contains(code), "{args:?}: {}", text(&out.stderr));
    };
    expect(&["image", "pull", &format!("{}/ci/rules:nope", registry.address)], "NOT_FOUND");
    expect(&["image", "pull", &format!("{}/ci/arm:v1", registry.address)], "FAILED_PRECONDITION");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    expect(&["image", "pull", &format!("127.0.0.1:{closed}/ci/elsewhere:v1")], "UNAVAILABLE");
    expect(&["image", "pull", "not a reference!"], "INVALID_ARGUMENT");
    assert_eq!(blobs(&daemon), blobs_before, "failed pulls left blobs");
    let images = text(&ok(&daemon, &["image", "ls"]).stdout);
    assert_eq!(images.lines().count(), 3, "the header and two images:\n{images}");
    // Named by the reference it was pulled from, as `image show` and `--image` name it.
    ok(&daemon, &["image", "delete", &reference]);
    let images = text(&ok(&daemon, &["image", "ls"]).stdout);
    assert!(!images.contains("rules-v1"), "{images}");
}

#[test]
fn a_vm_given_a_bigger_disk_than_its_image_sees_the_room_and_the_host_stores_only_what_it_writes() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    ok(&daemon, &["vm", "create", "--name", "big", "--disk-size", "3G"]);
    // busybox df: Filesystem 1K-blocks Used Available Use% Mounted on
    let df = exec(&daemon, "big", "df -k / | tail -n 1");
    let total_kib: u64 = df.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{df}"));
    assert!(total_kib > 2800 * 1024, "the guest's root file system grew to the disk: {df}");
    exec(&daemon, "big", "dd if=/dev/zero of=/big.bin bs=1M count=64 2>/dev/null; sync");
    let show = ok(&daemon, &["vm", "show", "big"]);
    assert_eq!(field(&show, "disk size").as_deref(), Some("3072 MiB"));
    let disk = field(&show, "root disk").expect("root disk");
    let disk = Path::new(disk.split(" (").next().expect("path"));
    let out = Command::new("du").arg("-k").arg(disk).output().expect("du");
    let used_kib: u64 = text(&out.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).expect("du");
    assert!(used_kib < 256 * 1024, "the host stores what the guest wrote, not 3 GiB: {used_kib} KiB");
    let log = text(&ok(&daemon, &["vm", "logs", "big"]).stdout);
    assert!(log.contains("grew the root file system to its disk"), "{log}");

    let small = daemon.banger(&["vm", "create", "--name", "small", "--disk-size", "100M"]);
    let stderr = text(&small.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT") && stderr.contains("disk_size_bytes"), "{stderr}");
    ok(&daemon, &["vm", "delete", "big"]);
}

#[test]
fn an_image_without_mount_points_runs_and_one_whose_root_cannot_be_set_up_fails_its_create_saying_why() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let config = oci::Config { cmd: vec!["/bin/sh".into()], ..Default::default() };
    // As built FROM scratch: busybox in /bin, no /proc, /sys or /dev.
    let bare = daemon.dir.path().join("bare");
    oci::write_layout(&bare, "bare", &config, &[oci::busybox_layer_with(&[])]);
    ok(&daemon, &["image", "import", "bare", "--oci", &format!("{}:bare", bare.display())]);
    let script =
        "grep -c ' /dev/pts ' /proc/self/mountinfo; ls /sys/class >/dev/null && echo sys-ok; tty </dev/null; echo ran";
    let out = daemon.banger(&["vm", "run", "--rm", "--image", "bare", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}\nlog: {}", text(&out.stderr), daemon.log());
    assert_eq!(text(&out.stdout), "1\nsys-ok\nnot a tty\nran\n", "stderr: {}", text(&out.stderr));

    // /proc is a file in this one: the agent cannot set up its root, and says so.
    let broken = daemon.dir.path().join("broken");
    let layer = oci::busybox_layer_with(&[oci::Entry::File("proc", b"not a directory", 0o644)]);
    oci::write_layout(&broken, "broken", &config, &[layer]);
    ok(&daemon, &["image", "import", "broken", "--oci", &format!("{}:broken", broken.display())]);
    let out = daemon.banger(&["vm", "create", "--name", "broken", "--image", "broken"]);
    assert!(!out.status.success(), "a guest without /proc was created: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION") && stderr.contains("/proc"), "{stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert!(!list.contains("broken"), "a failed create left a record: {list}");
}
