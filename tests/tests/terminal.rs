//! Terminals: the real CLI in a real terminal (tmux), a shell in a real QEMU guest.
//! Keys go in with `send-keys`, the screen comes back with `capture-pane`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_tests::{Daemon, bin_dir, guest_slot, skip, text};

/// A tmux server of the test's own (its socket in the daemon's temporary dir), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A detached session of `columns` x `rows` running bash without rc files.
    fn start(dir: &Path, columns: u16, rows: u16) -> Self {
        let tmux = Self { socket: dir.join("tmux.sock") };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &columns.to_string(),
            "-y",
            &rows.to_string(),
            "env PS1='host$ ' bash --norc --noprofile",
        ]);
        assert!(out.status.success(), "tmux new-session: {}", text(&out.stderr));
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-S").arg(&self.socket).args(args).output().expect("tmux")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        let out = self.run(&args);
        assert!(out.status.success(), "send-keys {keys:?}: {}", text(&out.stderr));
    }

    /// Types `line` and Enter.
    fn line(&self, line: &str) {
        self.keys(&["-l", line]);
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        text(&self.run(&["capture-pane", "-p", "-J", "-t", "t", "-S", "-200"]).stdout)
    }

    /// Waits until the screen holds `needle` `count` times; returns the screen.
    fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if screen.matches(needle).count() >= count {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {count}x {needle:?} on the screen within {timeout:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_count(needle, 1, timeout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn a_shell_on_a_terminal_follows_its_size_takes_ctrl_c_runs_vi_and_exits_with_its_code() {
    if Command::new("tmux").arg("-V").output().is_err() {
        skip("terminal: tmux is not installed (make setup installs it)");
        return;
    }
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "term"]);
    assert!(out.status.success(), "create: {}\n{}", text(&out.stderr), daemon.log());

    let tmux = Tmux::start(daemon.dir.path(), 100, 30);
    tmux.wait_for("host$ ", Duration::from_secs(10));
    let before = daemon.dir.path().join("stty-before");
    let after = daemon.dir.path().join("stty-after");
    let banger = bin_dir().join("banger");
    tmux.line(&format!(
        "stty -g > {}; {} --socket {} vm shell term; echo cli-exit=$?; stty -g > {}",
        before.display(),
        banger.display(),
        daemon.socket.display(),
        after.display()
    ));
    // The login shell's prompt: busybox ash as root.
    tmux.wait_for("~ # ", Duration::from_secs(30));

    // The guest's terminal has the pane's size, and follows it.
    tmux.line("stty size; tty");
    tmux.wait_for("30 100", Duration::from_secs(10));
    let screen = tmux.wait_for("/dev/pts/", Duration::from_secs(10));
    assert!(!screen.contains("not a tty"), "{screen}");
    let out = tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    assert!(out.status.success(), "resize-window: {}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(300));
    tmux.line("stty size");
    tmux.wait_for("40 120", Duration::from_secs(10));

    // Ctrl-C reaches the guest's foreground job; the shell and the CLI live on.
    tmux.line("sleep 100");
    std::thread::sleep(Duration::from_millis(700));
    tmux.keys(&["C-c"]);
    tmux.line("echo alive-after=$?");
    tmux.wait_for("alive-after=130", Duration::from_secs(10));

    // A full-screen editor: opened, typed into, saved, quit.
    tmux.line("vi /tmp/edited");
    tmux.wait_for("/tmp/edited", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["i"]);
    tmux.keys(&["-l", "typed-in-vi"]);
    tmux.keys(&["Escape"]);
    // busybox vi takes an Escape followed at once by more keys as an escape sequence.
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["-l", ":wq"]);
    tmux.keys(&["Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("echo file=$(cat /tmp/edited)");
    tmux.wait_for("file=typed-in-vi", Duration::from_secs(10));

    // The shell's exit code is the CLI's, and the local terminal is as it was.
    tmux.line("exit 3");
    let screen = tmux.wait_for("cli-exit=3", Duration::from_secs(10));
    tmux.wait_for_count("host$ ", 2, Duration::from_secs(10));
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(read(&before), read(&after), "stty -g before and after the session differ:\n{screen}");
    println!("terminal session as tmux showed it:\n{screen}");

    // `vm run` without a command on a terminal: a new VM and a shell in it, deleted after.
    tmux.line(&format!(
        "{} --socket {} vm run --rm --name scratch; echo run-exit=$?",
        banger.display(),
        daemon.socket.display()
    ));
    tmux.wait_for("cli-exit=3", Duration::from_secs(1));
    tmux.line("echo in-$(hostname)");
    tmux.wait_for("in-scratch", Duration::from_secs(60));
    tmux.line("exit");
    tmux.wait_for("run-exit=0", Duration::from_secs(30));
    let out = daemon.banger(&["vm", "show", "scratch"]);
    assert!(!out.status.success(), "the --rm VM is still there: {}", text(&out.stdout));

    // `vm exec -t` without -i: a terminal but no input; `vm exec` without a command on no
    // terminal is refused with a hint.
    let out = daemon.banger(&["vm", "exec", "-t", "term", "--", "sh", "-c", "tty; echo err >&2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/") && stdout.contains("err\r\n"), "{stdout:?}");
    let out = daemon.banger(&["vm", "exec", "term"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("vm shell"), "{}", text(&out.stderr));
}
