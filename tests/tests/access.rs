//! Who may call a real bangerd: a local user who is not root, on the socket and as a member
//! of its group; TLS clients with a trusted, a foreign, an expired or a revoked certificate,
//! with no certificate, with tokens; roles granted to certificates. Boots no guest.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use banger_tests::{
    Daemon, bin_dir, text,
    tls::{ClientCert, Pki, free_port, grpcurl},
};

/// The CLI, copied where any user may run it.
fn public_banger() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("banger-cli").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let banger = dir.path().join("banger");
    std::fs::copy(bin_dir().join("banger"), &banger).expect("copy banger");
    std::fs::set_permissions(&banger, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, banger)
}

/// `banger ARGS` as the user `nobody`.
fn as_nobody(banger: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(banger)
        .args(args)
        .envs(env.iter().copied())
        .env("BANGER_NO_AUTOSTART", "0")
        .output()
        .expect("runuser")
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// The daemon's VMs and images as root sees them.
fn inventory(daemon: &Daemon) -> (String, String) {
    let vms = daemon.banger(&["vm", "list"]);
    let images = daemon.banger(&["image", "list"]);
    (text(&vms.stdout), text(&images.stdout))
}

#[test]
fn tcp_is_refused_without_tls_and_the_unix_socket_to_users_outside_its_group() {
    // --listen without TLS material: the daemon does not start, and says what to set.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin_dir().join("bangerd"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("bangerd");
    assert!(!out.status.success(), "served TCP without TLS");
    assert!(text(&out.stderr).contains("[tls]"), "{}", text(&out.stderr));
    assert!(!dir.path().join("s.sock").exists(), "nothing was served");

    let daemon = Daemon::start(&[]);
    let before = inventory(&daemon);
    let (_cli, banger) = public_banger();
    let socket = daemon.socket.display().to_string();
    // Named explicitly, and found through BANGER_SOCKET as autostart would: refused, and no
    // second daemon is started over the first.
    for (args, env) in [
        (vec!["--socket", socket.as_str(), "vm", "create", "--no-start"], vec![]),
        (vec!["vm", "list"], vec![("BANGER_SOCKET", socket.as_str())]),
    ] {
        let out = as_nobody(&banger, &args, &env);
        let said = text(&out.stderr);
        assert!(!out.status.success(), "nobody got in: {}", text(&out.stdout));
        assert!(said.contains("PERMISSION_DENIED") && said.contains("may not connect"), "{said}");
        assert!(!said.contains("started bangerd"), "autostart took a refusal for nobody serving: {said}");
    }
    assert_eq!(inventory(&daemon), before, "nothing changed");

    // The socket's group lets its members in, with the role their group's grant gives.
    let config = dir.path().join("group.toml");
    std::fs::write(&config, "socket_group = \"nogroup\"\n[[auth.grants]]\ngroup = \"nogroup\"\nrole = \"viewer\"\n")
        .expect("config");
    let grouped = Daemon::start(&["--config", &config.display().to_string()]);
    let socket = grouped.socket.display().to_string();
    let listed = as_nobody(&banger, &["--socket", &socket, "vm", "list"], &[]);
    assert!(listed.status.success(), "a member of the socket's group lists: {}", text(&listed.stderr));
    let created = as_nobody(&banger, &["--socket", &socket, "vm", "create", "--no-start", "--name", "nope"], &[]);
    let said = text(&created.stderr);
    assert!(!created.status.success() && said.contains("PERMISSION_DENIED"), "{said}");
    assert!(said.contains("uid:65534 (viewer)") && said.contains("operator"), "{said}");
    assert!(grouped.log().contains("\"caller\":\"uid:65534\""), "the refusal is logged with its caller");
}

#[test]
fn over_tcp_only_trusted_certificates_and_valid_tokens_get_in_each_with_its_role() {
    let pki = Pki::new();
    let grants = format!(
        "[auth]\nhealth_without_credentials = true\n\
         [[auth.grants]]\ncert = \"ops\"\nrole = \"operator\"\n\
         [[auth.grants]]\ncert = \"watcher\"\nrole = \"viewer\"\n\
         [[auth.tokens]]\nname = \"script\"\nsha256 = \"{}\"\nrole = \"viewer\"\n\
         [[auth.tokens]]\nname = \"old\"\nsha256 = \"{}\"\nrole = \"admin\"\nexpires = \"2020-01-01T00:00:00Z\"\n",
        sha256_hex("script-token"),
        sha256_hex("old-token"),
    );
    let revoked = pki.revoked_client("ops");
    let config = pki.config(&grants);
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&["--config", &config.display().to_string(), "--listen", &listen]);
    let before = inventory(&daemon);
    let grpcurl_as = |client: Option<&ClientCert>, extra: &[&str], method: &str| -> Output {
        Command::new(grpcurl())
            .args(pki.grpcurl_flags(client))
            .args(extra)
            .args([&listen, method])
            .output()
            .expect("grpcurl")
    };
    let list = "banger.v1.VmService/ListVms";
    let cli = |client: &ClientCert, args: &[&str]| -> Output {
        Command::new(bin_dir().join("banger"))
            .args(["--endpoint", &format!("https://{listen}"), "--tls-ca"])
            .arg(pki.ca())
            .arg("--tls-cert")
            .arg(&client.cert)
            .arg("--tls-key")
            .arg(&client.key)
            .args(args)
            .output()
            .expect("banger")
    };

    // No credentials, unknown or expired tokens: UNAUTHENTICATED.
    for (extra, why) in [
        (vec![], "no credentials"),
        (vec!["-H", "authorization: Bearer guessed"], "unknown or revoked token"),
        (vec!["-H", "authorization: Bearer old-token"], "expired"),
    ] {
        let out = grpcurl_as(None, &extra, list);
        let said = text(&out.stderr);
        assert!(!out.status.success() && said.contains("Unauthenticated") && said.contains(why), "{extra:?}: {said}");
    }
    // A certificate from another CA, an expired or a revoked one: no TLS session at all.
    let refused =
        [(pki.foreign_client("ops"), "foreign"), (pki.expired_client("ops"), "expired"), (revoked, "revoked")];
    for (client, what) in refused {
        let out = grpcurl_as(Some(&client), &["-connect-timeout", "3"], list);
        let said = text(&out.stderr);
        assert!(!out.status.success() && !said.contains("Code:"), "{what} certificate: {said}");
        let out = cli(&client, &["vm", "list"]);
        let said = text(&out.stderr);
        // TLS 1.3: the client learns of the refusal on its first call, from the server's alert
        // or the closed connection, whichever reaches it first.
        assert!(!out.status.success() && text(&out.stdout).is_empty(), "{what} certificate: {said}");
        eprintln!("a {what} certificate: {said}");
    }
    assert_eq!(inventory(&daemon), before, "nothing changed");

    // A valid token and a trusted certificate, each with its role.
    let out = grpcurl_as(None, &["-H", "authorization: Bearer script-token"], list);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = grpcurl_as(
        None,
        &["-H", "authorization: Bearer script-token", "-d", r#"{"name":"x"}"#],
        "banger.v1.VmService/CreateVm",
    );
    assert!(text(&out.stderr).contains("PermissionDenied"), "{}", text(&out.stderr));
    let (watcher, ops) = (pki.client("watcher"), pki.client("ops"));
    assert!(cli(&watcher, &["vm", "list"]).status.success());
    let refused = cli(&watcher, &["vm", "create", "--no-start", "--name", "by-watcher"]);
    assert!(text(&refused.stderr).contains("PERMISSION_DENIED"), "{}", text(&refused.stderr));
    let made = cli(&ops, &["vm", "create", "--no-start", "--name", "by-ops"]);
    assert!(made.status.success(), "an operator creates: {}", text(&made.stderr));
    let kernel = banger_tests::default_image_dir().join("vmlinuz").display().to_string();
    let rootfs = banger_tests::default_image_dir().join("rootfs.ext4").display().to_string();
    let import = cli(&ops, &["image", "import", "mine", "--kernel", &kernel, "--rootfs", &rootfs]);
    let said = text(&import.stderr);
    assert!(said.contains("PERMISSION_DENIED") && said.contains("admin"), "host files are admin's: {said}");

    // Health answers a prober without credentials, as configured; nothing else does.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let ca = std::fs::read(pki.ca()).expect("ca");
        let credentials = banger_client::Credentials { tls_ca: Some(ca), ..Default::default() };
        let target = banger_client::Target::Endpoint(format!("https://{listen}"));
        let prober = banger_client::Client::connect_with(&target, &credentials).await.expect("connect");
        assert!(prober.serving().await, "an unauthenticated prober sees SERVING");
        let refused = prober.vms.clone().list_vms(banger_client::pb::ListVmsRequest::default()).await;
        assert_eq!(refused.expect_err("no credentials").code(), tonic::Code::Unauthenticated);
    });
    let (vms, images) = inventory(&daemon);
    assert!(vms.contains("by-ops") && !vms.contains("by-watcher") && !vms.contains(" x "), "{vms}");
    assert!(!images.contains("mine"), "no image was imported from the host: {images}");
    let log = daemon.log();
    assert!(log.contains("\"caller\":\"cert:ops\"") && log.contains("\"caller\":\"token:script\""), "{log}");
}

#[test]
fn a_hangup_reloads_grants_tokens_and_revocations_and_a_broken_config_changes_nothing() {
    let pki = Pki::new();
    let tokens = |name: &str, text: &str| {
        format!("[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"viewer\"\n", sha256_hex(text))
    };
    let grant = "[[auth.grants]]\ncert = \"ops\"\nrole = \"viewer\"\n";
    let config = pki.config(&format!("{}{grant}", tokens("old", "old-token")));
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&["--config", &config.display().to_string(), "--listen", &listen]);
    let ops = pki.client("ops");
    let lists = |client: Option<&ClientCert>, token: Option<&str>| -> bool {
        let header = token.map(|t| format!("authorization: Bearer {t}"));
        let mut command = Command::new(grpcurl());
        command.args(pki.grpcurl_flags(client)).args(["-connect-timeout", "3"]);
        if let Some(header) = &header {
            command.args(["-H", header]);
        }
        command.args([&listen, "banger.v1.VmService/ListVms"]).output().expect("grpcurl").status.success()
    };
    assert!(lists(None, Some("old-token")) && !lists(None, Some("new-token")) && lists(Some(&ops), None));
    // A connection made now, kept open across the reload.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let credentials = banger_client::Credentials {
        tls_ca: Some(std::fs::read(pki.ca()).expect("ca")),
        tls_identity: Some((std::fs::read(&ops.cert).expect("cert"), std::fs::read(&ops.key).expect("key"))),
        ..Default::default()
    };
    let target = banger_client::Target::Endpoint(format!("https://{listen}"));
    let mut open = runtime.block_on(banger_client::Client::connect_with(&target, &credentials)).expect("connect");
    let list = banger_client::pb::ListVmsRequest::default();
    assert!(runtime.block_on(open.vms.list_vms(list.clone())).is_ok());

    // The old token is revoked, a new one issued, the certificate revoked: SIGHUP applies it.
    pki.config(&format!("{}{grant}", tokens("new", "new-token")));
    pki.revoke(&ops);
    let hangup = |daemon: &Daemon| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), nix::sys::signal::Signal::SIGHUP)
            .expect("SIGHUP");
    };
    hangup(&daemon);
    daemon.wait_for_log("reloaded who may do what", std::time::Duration::from_secs(10));
    assert!(!lists(None, Some("old-token")), "the removed token still works");
    assert!(lists(None, Some("new-token")), "the added token does not work");
    assert!(!lists(Some(&ops), None), "the revoked certificate still connects");
    let refused = runtime.block_on(open.vms.list_vms(list)).expect_err("a connection made before the revocation");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(banger_client::error_reason(&refused).map(|(r, _)| r).as_deref(), Some("CERTIFICATE_REVOKED"));

    // A configuration that does not load changes nothing, and the daemon says why.
    std::fs::write(&config, "this is not toml = = =").expect("write");
    hangup(&daemon);
    daemon.wait_for_log("reload refused", std::time::Duration::from_secs(10));
    assert!(lists(None, Some("new-token")), "a broken reload took access away");
    assert!(daemon.banger(&["vm", "list"]).status.success(), "the daemon still serves");
}
