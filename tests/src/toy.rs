//! Tiny guest kernels assembled on the spot (gcc and ld): they print a marker on the serial
//! console, then reset, halt or count. Stock kernels cannot boot under this host class's KVM;
//! these can, so the Firecracker tests use them.

use std::{path::Path, process::Command};

/// What every toy guest prints first.
pub const MARKER: &str = "TOY-GUEST-MARKER";

/// What a toy guest does once it printed the marker.
#[derive(Clone, Copy)]
pub enum Then {
    /// Resets through the i8042, which makes Firecracker exit.
    Reset,
    /// Halts its vCPU for good: the VMM keeps running.
    Halt,
    /// Prints a dot line after each busy-wait, forever: the console grows while the vCPU runs.
    Count,
}

/// Assembles a 64-bit ELF kernel that writes the marker to COM1, then resets or halts.
pub fn toy_kernel(dir: &Path, then: Then) -> std::path::PathBuf {
    let (name, ending) = match then {
        Then::Reset => ("reset", "  mov $0xfe, %al\n  outb %al, $0x64\n"),
        Then::Halt => ("halt", "  cli\n"),
        // A line each time (Firecracker's console output is line-buffered); the busy-wait is
        // short because this host runs such guests slowly (a few lines a second).
        Then::Count => (
            "count",
            "3: mov $0x2e, %al\n  outb %al, %dx\n  mov $0x0a, %al\n  outb %al, %dx\n  mov $100000, %ecx\n\
             4: loop 4b\n  jmp 3b\n",
        ),
    };
    let source = dir.join(format!("{name}.S"));
    std::fs::write(
        &source,
        format!(
            ".code64\n.globl _start\n_start:\n  mov $0x3f8, %dx\n  lea msg(%rip), %rsi\n  mov $(end - msg), %ecx\n\
             1: lodsb\n  outb %al, %dx\n  loop 1b\n{ending}2: hlt\n  jmp 2b\n\
             msg: .ascii \"{MARKER}\\n\"\nend:\n"
        ),
    )
    .expect("source");
    let object = dir.join(format!("{name}.o"));
    let kernel = dir.join(format!("{name}.elf"));
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
