//! Container images made by the tests, byte by byte: tar layers with every rule of OCI's
//! layer merge (whiteouts, opaque directories, hard links across layers, devices, xattrs,
//! odd owners and names), written as OCI image layouts and docker archives.

use std::io::Write;
use std::path::Path;

use sha2::Digest as _;
use tar::{EntryType, Header};

/// One entry of a test layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory and its mode.
    Dir(&'static str, u32),
    /// A regular file, its content and mode.
    File(&'static str, &'static [u8], u32),
    /// A regular file `owned` by uid, gid.
    Owned(&'static str, u64, u64),
    /// A regular file whose name is longer than ustar's 100 bytes.
    Long(String),
    /// Many small files `DIR/file-N` (`content N`).
    Many(&'static str, usize),
    /// A hard link to an earlier path.
    Link(&'static str, &'static str),
    /// A symlink and its target.
    Sym(&'static str, &'static str),
    /// A character device.
    Char(&'static str, u32, u32),
    /// A FIFO.
    Fifo(&'static str),
    /// A regular file carrying one extended attribute (a PAX record).
    Xattr(&'static str, &'static str, &'static [u8]),
    /// A header whose name the tar crate refuses to write (`..`, absolute).
    Raw(Vec<u8>, EntryType),
    /// A regular file with content made at run time, and its mode.
    Data(String, Vec<u8>, u32),
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// A tar stream with `entries`, in order, uncompressed.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = Header::new_gnu();
        header.set_mtime(1_700_000_000);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_uid(0);
        header.set_gid(0);
        let appended = match entry {
            Entry::Dir(path, mode) => {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(*mode);
                builder.append_data(&mut header, path, std::io::empty())
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data)
            }
            Entry::Owned(path, uid, gid) => {
                header.set_entry_type(EntryType::Regular);
                header.set_uid(*uid);
                header.set_gid(*gid);
                header.set_size(5);
                builder.append_data(&mut header, path, &b"owned"[..])
            }
            Entry::Long(path) => {
                header.set_entry_type(EntryType::Regular);
                header.set_size(4);
                builder.append_data(&mut header, path, &b"long"[..])
            }
            Entry::Many(dir, count) => (0..*count).try_for_each(|n| {
                let content = format!("content {n}");
                let mut header = header.clone();
                header.set_entry_type(EntryType::Regular);
                header.set_size(content.len() as u64);
                builder.append_data(&mut header, format!("{dir}/file-{n}"), content.as_bytes())
            }),
            Entry::Link(path, target) => {
                header.set_entry_type(EntryType::Link);
                builder.append_link(&mut header, path, target)
            }
            Entry::Sym(path, target) => {
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                builder.append_link(&mut header, path, target)
            }
            Entry::Char(path, major, minor) => {
                header.set_entry_type(EntryType::Char);
                header.set_mode(0o666);
                header.set_device_major(*major).expect("major");
                header.set_device_minor(*minor).expect("minor");
                builder.append_data(&mut header, path, std::io::empty())
            }
            Entry::Fifo(path) => {
                header.set_entry_type(EntryType::Fifo);
                builder.append_data(&mut header, path, std::io::empty())
            }
            Entry::Xattr(path, name, value) => {
                let record = pax_record(&format!("SCHILY.xattr.{name}"), value);
                let mut pax = Header::new_ustar();
                pax.set_entry_type(EntryType::XHeader);
                pax.set_size(record.len() as u64);
                pax.set_mode(0o644);
                pax.set_uid(0);
                pax.set_gid(0);
                pax.set_mtime(0);
                builder.append_data(&mut pax, "PaxHeader", record.as_slice()).expect("pax");
                header.set_entry_type(EntryType::Regular);
                header.set_size(5);
                builder.append_data(&mut header, path, &b"xattr"[..])
            }
            Entry::Data(path, data, mode) => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, data.as_slice())
            }
            Entry::Raw(name, kind) => {
                header.set_entry_type(*kind);
                header.as_old_mut().name[..name.len()].copy_from_slice(name);
                header.set_cksum();
                builder.append(&header, std::io::empty())
            }
        };
        appended.expect("append");
    }
    builder.into_inner().expect("tar")
}

/// A gzipped tar layer with `entries`.
pub fn layer(entries: &[Entry]) -> Vec<u8> {
    gzip(&tar(entries))
}

/// `bytes`, gzipped.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// `sha256:` and the hex digest of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The layers of the rule fixture: each rule of the merge, at least once.
/// - `etc/doomed` is deleted by a whiteout; `opaque/` is made opaque (`opaque/lower` hidden,
///   `opaque/upper` seen);
/// - `shared/original` is hard-linked from the same layer (`shared/alias`) and from the next
///   (`etc/cross-layer`); `etc/keeps-old` links to `etc/replaced`, which the next layer
///   replaces (the link keeps `old`);
/// - `etc/symlink` (to `/shared/original`), `etc/null` (char 1:3), `etc/fifo`,
///   `usr/bin/setuid` (04755), `usr/bin/capable` (security.capability), `etc/user-xattr`
///   (user.banger=fixture), `etc/owned` (1234:5678), a 255-byte name in `etc/`, and
///   `many/file-0` … `many/file-9999`.
pub fn rule_layers() -> Vec<Vec<u8>> {
    rule_layers_with(10_000)
}

/// [`rule_layers`] with `many` small files.
pub fn rule_layers_with(many: usize) -> Vec<Vec<u8>> {
    vec![
        layer(&[
            Entry::Dir("etc", 0o755),
            Entry::File("etc/doomed", b"gone", 0o644),
            Entry::Dir("opaque", 0o755),
            Entry::File("opaque/lower", b"hidden", 0o644),
            Entry::File("shared/original", b"linked", 0o640),
            Entry::Link("shared/alias", "shared/original"),
            Entry::File("etc/replaced", b"old", 0o644),
            Entry::Link("etc/keeps-old", "etc/replaced"),
            Entry::Many("many", many),
        ]),
        layer(&[
            Entry::File("etc/.wh.doomed", b"", 0o644),
            Entry::File("opaque/.wh..wh..opq", b"", 0o644),
            Entry::File("opaque/upper", b"seen", 0o644),
            Entry::Link("etc/cross-layer", "shared/original"),
            Entry::Sym("etc/symlink", "/shared/original"),
            Entry::Char("etc/null", 1, 3),
            Entry::Fifo("etc/fifo"),
            Entry::File("usr/bin/setuid", b"#!/bin/sh\n", 0o4755),
            Entry::Xattr("usr/bin/capable", "security.capability", CAP_NET_RAW),
            Entry::Xattr("etc/user-xattr", "user.banger", b"fixture"),
            Entry::Owned("etc/owned", 1234, 5678),
            Entry::Long(format!("etc/{}", "n".repeat(255))),
            Entry::File("etc/replaced", b"new", 0o644),
        ]),
    ]
}

/// A `security.capability` value (v2) granting cap_net_raw, permitted and effective.
pub const CAP_NET_RAW: &[u8] = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

/// What an image's config says a container runs with.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `os/architecture`; `linux/amd64` when empty.
    pub platform: String,
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `Cmd`.
    pub cmd: Vec<String>,
}

fn config_json(config: &Config, layers: &[Vec<u8>]) -> Vec<u8> {
    let platform = if config.platform.is_empty() { "linux/amd64" } else { &config.platform };
    let mut parts = platform.split('/');
    let (os, arch) = (parts.next().unwrap_or("linux"), parts.next().unwrap_or("amd64"));
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(&uncompressed(l))).collect();
    serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {"Env": config.env, "WorkingDir": config.working_dir, "User": config.user, "Cmd": config.cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes()
}

fn uncompressed(layer: &[u8]) -> Vec<u8> {
    if layer.starts_with(&[0x1f, 0x8b]) {
        // A deliberately truncated layer yields what it has: diff ids only describe.
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(layer), &mut out);
        out
    } else {
        layer.to_vec()
    }
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

fn write_blob(dir: &Path, bytes: &[u8]) {
    let path = dir.join("blobs/sha256").join(&digest(bytes)["sha256:".len()..]);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("blobs dir");
    std::fs::write(path, bytes).expect("blob");
}

/// The manifest of an image with these gzipped layers and config.
pub fn manifest(config: &Config, layers: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let config = config_json(config, layers);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    (manifest, config)
}

/// Writes an OCI image layout at `dir` with one image tagged `tag`; returns its manifest's
/// digest.
pub fn write_layout(dir: &Path, tag: &str, config: &Config, layers: &[Vec<u8>]) -> String {
    let (manifest, config) = manifest(config, layers);
    for blob in layers.iter().chain([&config, &manifest]) {
        write_blob(dir, blob);
    }
    let mut top = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    digest(&manifest)
}

/// Writes an OCI layout whose tag names an image index with one manifest per platform in
/// `platforms` (each with the same layers).
pub fn write_multi_platform_layout(dir: &Path, tag: &str, platforms: &[&str], layers: &[Vec<u8>]) {
    let mut manifests = Vec::new();
    for platform in platforms {
        let (manifest, config) = manifest(&Config { platform: (*platform).into(), ..Default::default() }, layers);
        for blob in layers.iter().chain([&config, &manifest]) {
            write_blob(dir, blob);
        }
        let mut parts = platform.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        let mut d = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
        d["platform"] = serde_json::json!({"os": os, "architecture": arch});
        if let Some(variant) = variant {
            d["platform"]["variant"] = variant.into();
        }
        manifests.push(d);
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})
        .to_string()
        .into_bytes();
    write_blob(dir, &index);
    let mut top = descriptor("application/vnd.oci.image.index.v1+json", &index);
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("index.json"), serde_json::json!({"schemaVersion": 2, "manifests": [top]}).to_string())
        .expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
}

/// A `docker save` archive of one image `repo_tag` with these layers (stored uncompressed,
/// as docker does).
pub fn docker_archive(repo_tag: &str, config: &Config, layers: &[Vec<u8>]) -> Vec<u8> {
    let config = config_json(config, layers);
    let config_name = format!("{}.json", &digest(&config)["sha256:".len()..]);
    let mut members: Vec<(String, Vec<u8>)> = vec![(config_name.clone(), config)];
    let mut layer_names = Vec::new();
    for layer in layers {
        let tar = uncompressed(layer);
        let name = format!("{}/layer.tar", &digest(&tar)["sha256:".len()..]);
        layer_names.push(name.clone());
        members.push((name, tar));
    }
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]);
    members.push(("manifest.json".into(), manifest.to_string().into_bytes()));
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        builder.append_data(&mut header, name, bytes.as_slice()).expect("member");
    }
    builder.into_inner().expect("archive")
}

/// A layer with the host's static busybox as `/bin/busybox`, a symlink per applet in
/// `/bin`, and the directories a guest mounts over (`/proc`, `/sys`, `/dev`, `/tmp`), so
/// that a test image can run commands.
pub fn busybox_layer() -> Vec<u8> {
    busybox_layer_with(&[Entry::Dir("proc", 0o555), Entry::Dir("sys", 0o555), Entry::Dir("dev", 0o755)])
}

/// A layer with `/bin/busybox`, its applets, `/tmp` and `extra`, without the directories a
/// guest mounts over unless `extra` has them (an image built `FROM scratch`).
pub fn busybox_layer_with(extra: &[Entry]) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static; make setup installs it)");
    let applets = std::process::Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    let mut entries = vec![Entry::Dir("bin", 0o755)];
    entries.extend_from_slice(extra);
    entries.extend([Entry::Dir("tmp", 0o1777), Entry::Data("bin/busybox".into(), busybox, 0o755)]);
    let links: Vec<String> = applets.lines().filter(|a| *a != "busybox").map(|a| format!("bin/{a}")).collect();
    let links: &'static [String] = Box::leak(links.into_boxed_slice());
    entries.extend(links.iter().map(|link| Entry::Sym(link.as_str(), "busybox")));
    layer(&entries)
}
