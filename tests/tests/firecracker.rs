//! The Firecracker driver end to end with the real binary (v1.12.1, installed by `make setup`)
//! and a tiny guest kernel this test assembles: it prints a marker on the serial console and
//! resets the machine. Stock kernels cannot boot under this host's KVM, so the guest carries no
//! agent: the VM is created without waiting for one.

use std::{path::Path, process::Command, time::Duration};

use banger_tests::{Daemon, default_image_dir, guest_slot, text};

const MARKER: &str = "TOY-GUEST-MARKER";

/// Assembles a 64-bit ELF kernel that writes the marker to COM1, then resets through the
/// i8042 (which makes Firecracker exit).
fn toy_kernel(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("toy.S");
    std::fs::write(
        &source,
        format!(
            ".code64\n.globl _start\n_start:\n  mov $0x3f8, %dx\n  lea msg(%rip), %rsi\n  mov $(end - msg), %ecx\n\
             1: lodsb\n  outb %al, %dx\n  loop 1b\n  mov $0xfe, %al\n  outb %al, $0x64\n2: hlt\n  jmp 2b\n\
             msg: .ascii \"{MARKER}\\n\"\nend:\n"
        ),
    )
    .expect("source");
    let object = dir.join("toy.o");
    let kernel = dir.join("toy.elf");
    assert!(Command::new("gcc").arg("-c").arg(&source).arg("-o").arg(&object).status().expect("gcc").success());
    assert!(
        Command::new("ld")
            .args(["-Ttext=0x1000000", "-e", "_start", "-o"])
            .arg(&kernel)
            .arg(&object)
            .status()
            .expect("ld")
            .success()
    );
    kernel
}

fn show(daemon: &Daemon, vm: &str, field: &str) -> Option<String> {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{field}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn firecracker_boots_a_guest_whose_console_output_and_exit_are_seen_and_delete_leaves_nothing() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: Firecracker needs /dev/kvm, which this host does not have");
        return;
    }
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let kernel = toy_kernel(work.path());
    let config = work.path().join("config.toml");
    std::fs::write(&config, "vmm = \"firecracker\"\n").expect("config");
    let daemon = Daemon::start(&["--config", &config.display().to_string()]);

    let rootfs = default_image_dir().join("rootfs.ext4");
    daemon.import_image("toy", &kernel, &rootfs, None);
    // A bzImage cannot boot under Firecracker: refused before anything is made.
    daemon.import_image("bz", &default_image_dir().join("vmlinuz"), &rootfs, None);
    let out = daemon.banger(&["vm", "create", "--name", "bz", "--image", "bz", "--no-wait"]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION") && stderr.contains("uncompressed ELF"), "{stderr}");
    assert!(daemon.banger(&["image", "delete", "bz"]).status.success());

    let out = daemon.banger(&["vm", "create", "--name", "fc", "--image", "toy", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    assert_eq!(show(&daemon, "fc", "vmm").as_deref(), Some("firecracker"));
    let root_disk = show(&daemon, "fc", "root disk").expect("root disk");
    assert!(root_disk.ends_with("(copy)") || root_disk.ends_with("(reflink)"), "raw disks only: {root_disk}");

    let console = show(&daemon, "fc", "console log").expect("console log");
    wait_until("the guest's console output", || std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER)));
    // The guest reset itself: Firecracker exited, and the daemon records it.
    wait_until("the exit to be recorded", || show(&daemon, "fc", "state").as_deref() == Some("stopped"));
    let reason = show(&daemon, "fc", "last error").unwrap_or_default();
    assert!(reason.contains("vmm exited"), "{reason}");

    // Started again (without waiting for an agent it does not have), it boots and exits again.
    std::fs::write(&console, "").expect("truncate console");
    let out = daemon.banger(&["vm", "start", "fc", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the second boot's console output", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER))
    });
    wait_until("the second exit to be recorded", || show(&daemon, "fc", "state").as_deref() == Some("stopped"));

    let vm_dir = show(&daemon, "fc", "vm dir").expect("vm dir");
    let out = daemon.banger(&["vm", "delete", "fc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
    let id = Path::new(&vm_dir).file_name().expect("id").to_string_lossy().into_owned();
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/banger/{id}")).exists(), "cgroup left");
}
