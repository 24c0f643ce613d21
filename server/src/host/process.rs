//! Liveness of host processes through `/proc`: the one place that decides whether a VMM runs.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::domain::ProcessHandle;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Its start time in clock ticks since boot.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist.
pub fn read_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall; fields[0] is field 3.
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// True when the process's command line holds `needle` as one of its arguments or inside one.
pub fn cmdline_mentions(proc_root: &Path, pid: u32, needle: &Path) -> bool {
    let Ok(raw) = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")) else {
        return false;
    };
    let needle = needle.to_string_lossy();
    raw.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).contains(needle.as_ref()))
}

/// What the host offers about processes: liveness, discovery and termination. The one
/// place that decides whether a process runs.
#[tonic::async_trait]
pub trait Processes: Send + Sync + std::fmt::Debug {
    /// The process named by `handle` runs, is the same process (start time), and its command
    /// line names `marker`.
    fn alive(&self, handle: &ProcessHandle, marker: &Path) -> bool;

    /// A snapshot of every live process and its command line.
    fn table(&self) -> ProcessTable;

    /// A live process whose command line names `marker`.
    fn find_by_marker(&self, marker: &Path) -> Option<ProcessHandle> {
        self.table().find(marker)
    }

    /// Waits up to `timeout` for the process to be gone; true when it is.
    async fn wait_gone(&self, handle: &ProcessHandle, marker: &Path, timeout: Duration) -> bool;

    /// SIGTERM, up to `grace`, then SIGKILL; only while the handle still names the process.
    async fn terminate(&self, handle: &ProcessHandle, marker: &Path, grace: Duration);

    /// The memory the process holds (its resident set), if it can be read.
    fn resident_bytes(&self, _handle: &ProcessHandle) -> Option<u64> {
        None
    }
}

/// Reads processes from a `/proc` tree (injected so tests can point it elsewhere).
#[derive(Debug, Clone)]
pub struct ProcFs {
    proc_root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self { proc_root: PathBuf::from("/proc") }
    }
}

impl ProcFs {
    /// Reads from `proc_root` instead of `/proc`.
    pub fn with_root(proc_root: PathBuf) -> Self {
        Self { proc_root }
    }

    /// Every live process with its command line, read once; for scans over many VMs.
    pub fn table(&self) -> ProcessTable {
        let mut entries = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.proc_root) {
            for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
                let Ok(raw) = std::fs::read(self.proc_root.join(pid.to_string()).join("cmdline")) else { continue };
                let Some(stat) = read_stat(&self.proc_root, pid) else { continue };
                if stat.state == 'Z' || raw.is_empty() {
                    continue;
                }
                let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
                entries.push((ProcessHandle { pid, start_time: stat.start_time }, cmdline));
            }
        }
        ProcessTable { entries }
    }

    /// Finds a live process whose command line names `marker`.
    pub fn find_by_marker(&self, marker: &Path) -> Option<ProcessHandle> {
        let entries = std::fs::read_dir(&self.proc_root).ok()?;
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| cmdline_mentions(&self.proc_root, *pid, marker))
            .find_map(|pid| {
                let stat = read_stat(&self.proc_root, pid)?;
                (stat.state != 'Z').then_some(ProcessHandle { pid, start_time: stat.start_time })
            })
    }
}

#[tonic::async_trait]
impl Processes for ProcFs {
    /// The single liveness check: the PID exists, is not a zombie, started when the handle
    /// says, and its command line names `marker` (a socket path only this VM's process uses).
    fn alive(&self, handle: &ProcessHandle, marker: &Path) -> bool {
        match read_stat(&self.proc_root, handle.pid) {
            Some(stat) if stat.state != 'Z' && stat.start_time == handle.start_time => {
                cmdline_mentions(&self.proc_root, handle.pid, marker)
            }
            _ => false,
        }
    }

    fn table(&self) -> ProcessTable {
        ProcFs::table(self)
    }

    fn find_by_marker(&self, marker: &Path) -> Option<ProcessHandle> {
        ProcFs::find_by_marker(self, marker)
    }

    fn resident_bytes(&self, handle: &ProcessHandle) -> Option<u64> {
        let status = std::fs::read_to_string(self.proc_root.join(handle.pid.to_string()).join("status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Waits up to `timeout` for the process to be gone; true when it is.
    async fn wait_gone(&self, handle: &ProcessHandle, marker: &Path, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.alive(handle, marker) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL. Only signals a process that is
    /// still the one the handle names. Returns once it is gone (or after 5 s more).
    async fn terminate(&self, handle: &ProcessHandle, marker: &Path, grace: Duration) {
        for (signal, wait) in [(Signal::SIGTERM, grace), (Signal::SIGKILL, Duration::from_secs(5))] {
            if !self.alive(handle, marker) {
                return;
            }
            let _ = nix::sys::signal::kill(Pid::from_raw(handle.pid as i32), signal);
            if self.wait_gone(handle, marker, wait).await {
                return;
            }
        }
    }
}

/// A snapshot of the host's processes and their command lines.
#[derive(Debug, Clone, Default)]
pub struct ProcessTable {
    entries: Vec<(ProcessHandle, String)>,
}

impl ProcessTable {
    /// A table of the given processes (for fakes).
    pub fn from_entries(entries: Vec<(ProcessHandle, String)>) -> Self {
        Self { entries }
    }

    /// The first process whose command line mentions `marker`.
    pub fn find(&self, marker: &Path) -> Option<ProcessHandle> {
        let marker = marker.to_string_lossy();
        self.entries.iter().find(|(_, cmdline)| cmdline.contains(marker.as_ref())).map(|(handle, _)| *handle)
    }

    /// Every process whose command line mentions `needle`, with its command line.
    pub fn mentioning<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a (ProcessHandle, String)> + 'a {
        self.entries.iter().filter(move |(_, cmdline)| cmdline.contains(needle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat_and_cmdline() {
        let me = std::process::id();
        let stat = read_stat(Path::new("/proc"), me).expect("own stat");
        assert!(stat.start_time > 0);
        let exe = std::env::args().next().expect("argv0");
        assert!(cmdline_mentions(Path::new("/proc"), me, Path::new(&exe)));
        let handle = ProcessHandle { pid: me, start_time: stat.start_time };
        let processes = ProcFs::default();
        assert!(processes.alive(&handle, Path::new(&exe)));
        assert!(!processes.alive(&ProcessHandle { start_time: stat.start_time + 1, ..handle }, Path::new(&exe)));
        assert!(!processes.alive(&handle, Path::new("/no/such/marker")));
    }

    #[tokio::test]
    async fn terminate_stops_a_detached_process_by_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker-arg");
        let args = ["-c".into(), "sleep 30".into(), "sh".into(), marker.clone().into_os_string()];
        let handle =
            super::super::command::spawn_detached(Path::new("/bin/sh"), &args, &dir.path().join("log")).expect("spawn");
        let processes = ProcFs::default();
        assert!(processes.alive(&handle, &marker));
        assert_eq!(processes.find_by_marker(&marker), Some(handle));
        assert_eq!(processes.table().find(&marker), Some(handle));
        processes.terminate(&handle, &marker, Duration::from_secs(2)).await;
        assert!(!processes.alive(&handle, &marker));
    }
}
