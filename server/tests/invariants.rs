//! The invariants `ARCHITECTURE.md` states about the code's layers, checked on the source:
//! each test reads `server/src` (without comments and without its inline test modules) and
//! fails naming the file that breaks its rule. Rules about behaviour have their own tests,
//! named in `ARCHITECTURE.md`; these are the ones that only the source can show.

use std::path::{Path, PathBuf};

/// A source file of the daemon: its path under `server/src` and its code, without comments
/// and without its `#[cfg(test)] mod tests`.
struct Source {
    path: String,
    code: String,
}

/// Files compiled for tests only.
const TEST_ONLY: &[&str] = &["ops/stage_tests.rs", "host/fake.rs"];

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &mut files);
    let mut sources: Vec<Source> = files
        .into_iter()
        .filter_map(|file| {
            let path = file.strip_prefix(&root).ok()?.to_string_lossy().into_owned();
            if TEST_ONLY.contains(&path.as_str()) {
                return None;
            }
            let text = std::fs::read_to_string(&file).ok()?;
            let text = match text.find("\n#[cfg(test)]\nmod tests") {
                Some(end) => &text[..end],
                None => &text,
            };
            let code = text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
            Some(Source { path, code })
        })
        .collect();
    sources.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(sources.len() > 40, "the source tree was not found under {}", root.display());
    sources
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// True when `code` holds `needle` as a whole token: an identifier at its edge is not part
/// of a longer one (`Code::` is not found in `ExitCode::`, nor `Store` in `StoreError`).
fn holds(code: &str, needle: &str) -> bool {
    code.match_indices(needle).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + needle.len()..].chars().next();
        let starts_ident = needle.starts_with(is_ident);
        let ends_ident = needle.ends_with(is_ident);
        let glued_before = starts_ident && before.is_some_and(is_ident);
        let glued_after = ends_ident && after.is_some_and(is_ident);
        !(glued_before || glued_after)
    })
}

fn matching(sources: impl Iterator<Item = Source>, needles: &[&str]) -> Vec<String> {
    sources
        .filter_map(|s| {
            let found: Vec<&str> = needles.iter().copied().filter(|n| holds(&s.code, n)).collect();
            (!found.is_empty()).then(|| format!("{} ({})", s.path, found.join(", ")))
        })
        .collect()
}

/// The files in `layer` (a directory under `src`, or `""` for all) whose code holds any of
/// `needles`, except those in `allowed`.
fn offenders(layer: &str, needles: &[&str], allowed: &[&str]) -> Vec<String> {
    let sources = sources().into_iter().filter(|s| s.path.starts_with(layer) && !allowed.contains(&s.path.as_str()));
    matching(sources, needles)
}

/// The files outside every one of `layers` whose code holds any of `needles`.
fn outside(layers: &[&str], needles: &[&str]) -> Vec<String> {
    matching(sources().into_iter().filter(|s| !layers.iter().any(|layer| s.path.starts_with(layer))), needles)
}

#[test]
fn generated_protobuf_types_stay_in_api_and_the_agent_protocol_in_host() {
    let generated = ["banger_proto::v1", "banger_proto::agent", "banger_proto::{"];
    assert_eq!(outside(&["api/", "host/"], &generated), Vec::<String>::new());
    assert_eq!(offenders("host/", &["banger_proto::v1", "proto::v1"], &[]), Vec::<String>::new());
    assert_eq!(offenders("api/", &["banger_proto::agent"], &[]), Vec::<String>::new());
}

#[test]
fn only_host_command_spawns_processes_and_only_host_touches_proc_dev_and_sys() {
    let spawning = ["process::Command", "Command::new", "tokio::process", "pre_exec"];
    assert_eq!(offenders("", &spawning, &["host/command.rs"]), Vec::<String>::new());
    assert_eq!(outside(&["host/"], &["\"/proc", "\"/dev", "\"/sys"]), Vec::<String>::new());
}

#[test]
fn ops_reaches_files_and_processes_only_through_host_and_never_blocks_on_them() {
    let blocking_or_direct =
        ["std::fs", "tokio::fs", "std::process", ".exists()", ".is_file()", ".is_dir()", ".metadata()", "read_dir("];
    assert_eq!(offenders("ops/", &blocking_or_direct, &[]), Vec::<String>::new());
}

#[test]
fn only_api_status_picks_a_grpc_code() {
    let picking = ["Code::", "Status::new", "Status::with", "Status::internal", "Status::unavailable"];
    assert_eq!(offenders("api/", &picking, &["api/status.rs"]), Vec::<String>::new());
    // host/ reads the guest agent's own statuses (its protocol is gRPC: agent.rs, exec.rs,
    // files.rs); nothing else outside api/ names gRPC codes or statuses.
    let naming = ["tonic::Code", "tonic::Status", "Code::", "Status::new", "Status::with_", "Status::internal"];
    let agent_protocol = ["api/", "host/agent.rs", "host/exec.rs", "host/files.rs"];
    assert_eq!(outside(&agent_protocol, &naming), Vec::<String>::new());
    assert_eq!(offenders("ops/", &["tonic::Status", "tonic::Code"], &[]), Vec::<String>::new());
}

#[test]
fn api_reaches_records_only_through_ops() {
    assert_eq!(offenders("api/", &[".store()", "store::Store", ": Store", "Store::"], &[]), Vec::<String>::new());
    assert_eq!(offenders("api/", &["std::fs", "tokio::fs"], &[]), Vec::<String>::new());
    let ops = sources().into_iter().find(|s| s.path == "ops/mod.rs").expect("ops/mod.rs");
    assert!(!ops.code.contains("fn store("), "Ops hands out no store: api would bypass the use cases");
}

#[test]
fn transient_handles_are_never_written_to_sqlite() {
    assert_eq!(offenders("store/", &["VmHandles", "ProcessHandle", "handles"], &[]), Vec::<String>::new());
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    for entry in std::fs::read_dir(&migrations).expect("migrations").flatten() {
        let sql = std::fs::read_to_string(entry.path()).expect("migration");
        let sql: String = sql.lines().map(|l| l.split("--").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        for handle in ["pid", "tap", "loop", "dm_name", "dm_device", "cgroup", "backend"] {
            let column = sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|word| word == handle);
            assert!(!column, "{} names a transient handle ({handle})", entry.path().display());
        }
    }
}

#[test]
fn the_checks_match_whole_tokens_only() {
    assert!(holds("tonic::Code::NotFound", "Code::") && !holds("std::process::ExitCode::SUCCESS", "Code::"));
    assert!(holds("let x: Store = y;", ": Store") && !holds("e: StoreError", ": Store"));
    assert!(holds("self.ops.store()", ".store()") && holds("\"/proc/1\"", "\"/proc"));
}

#[test]
fn only_the_clock_reads_wall_time() {
    // The export reporter's once-a-minute limit is about log noise, not durable time.
    let allowed = ["clock.rs", "telemetry/export.rs"];
    assert_eq!(offenders("", &["SystemTime::now", "UNIX_EPOCH"], &allowed), Vec::<String>::new());
}

/// `ARCHITECTURE.md` names, in brackets, the test behind each invariant: every name it gives
/// is a test that exists, so the map cannot point at a check that is gone.
#[test]
fn the_architecture_names_only_tests_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut named = Vec::new();
    for bracket in doc.split('[').skip(1).filter_map(|rest| rest.split(']').next()) {
        for token in bracket.split('`').skip(1).step_by(2) {
            if token.contains('_') && token.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                named.push(token.to_owned());
            }
        }
    }
    assert!(named.len() >= 8, "the invariants name their tests: {named:?}");
    let mut files = Vec::new();
    for dir in ["server/src", "server/tests", "tests/tests"] {
        collect(&root.join(dir), &mut files);
    }
    let code: String = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
    let missing: Vec<&String> = named.iter().filter(|name| !code.contains(&format!("fn {name}("))).collect();
    assert!(missing.is_empty(), "ARCHITECTURE.md names tests that do not exist: {missing:?}");
}

#[test]
fn only_host_fs_creates_directories_and_always_sets_their_mode() {
    // A create mode is masked by the daemon's umask (077): a directory made with one is
    // 0700 on a fresh host, whatever an older build left elsewhere. `host::fs::make_dir`
    // (and `make_trusted_dir` for shared places) chmods after each mkdir.
    let creating = ["create_dir_all", "DirBuilder", "std::fs::create_dir", "tokio::fs::create_dir"];
    assert_eq!(offenders("", &creating, &["host/fs.rs"]), Vec::<String>::new());
}
