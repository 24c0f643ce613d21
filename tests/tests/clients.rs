//! The generated clients in other languages, each running an orchestrator's job (see its
//! scenario file) against a real bangerd and a real guest, over TCP with mutual TLS. Needs `make setup` and `make
//! clients`, which `make test` runs first.

use std::process::Command;

use banger_tests::{
    Daemon, guest_slot, repo_root, text,
    tls::{Pki, free_port},
};

#[test]
fn the_generated_python_client_runs_an_orchestrator_scenario() {
    let _slot = guest_slot();
    let root = repo_root();
    let python = root.join(".tools/venv/bin/python");
    let generated = root.join("clients/python/generated/banger/v1/vm_pb2_grpc.py");
    assert!(
        python.exists() && generated.exists(),
        "run `make setup` and `make clients` first ({})",
        generated.display()
    );
    let (pki, listen) = (Pki::new(), format!("127.0.0.1:{}", free_port()));
    // Snapshots need an agent channel that survives a save.
    let grants = "agent_channel = \"virtio-serial\"\n[[auth.grants]]\ncert = \"python\"\nrole = \"admin\"\n";
    let config = pki.config(grants);
    let daemon = Daemon::start(&["--config", &config.display().to_string(), "--listen", &listen]);
    let client = pki.client("python");
    // Over TCP with mutual TLS, then a listing over the unix socket.
    let out = Command::new(python)
        .arg(root.join("clients/python/scenario.py"))
        .arg(&listen)
        .args([pki.ca(), client.cert, client.key])
        .arg(format!("unix:{}", daemon.socket.display()))
        .output()
        .expect("python");
    assert!(
        out.status.success() && text(&out.stdout).contains("python scenario: ok"),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.log()
    );
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

#[test]
fn the_generated_typescript_client_runs_an_orchestrator_scenario() {
    let _slot = guest_slot();
    let root = repo_root();
    let tsx = root.join("clients/typescript/node_modules/.bin/tsx");
    let generated = root.join("clients/typescript/generated/banger/v1/vm_pb.ts");
    assert!(tsx.exists() && generated.exists(), "run `make setup` and `make clients` first ({})", generated.display());
    let (pki, listen) = (Pki::new(), format!("127.0.0.1:{}", free_port()));
    let config = pki.config("[[auth.grants]]\ncert = \"typescript\"\nrole = \"operator\"\n");
    let daemon = Daemon::start(&["--config", &config.display().to_string(), "--listen", &listen]);
    let client = pki.client("typescript");
    let out = Command::new(tsx)
        .arg(root.join("clients/typescript/scenario.ts"))
        .arg(format!("https://{listen}"))
        .args([pki.ca(), client.cert, client.key])
        .current_dir(root.join("clients/typescript"))
        .output()
        .expect("tsx");
    assert!(
        out.status.success() && text(&out.stdout).contains("typescript scenario: ok"),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.log()
    );
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}
