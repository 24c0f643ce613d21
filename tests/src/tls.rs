//! Certificates for tests of bangerd's TCP listener: a CA, the daemon's certificate (for
//! `localhost` and `127.0.0.1`), client certificates (valid, expired, revoked by the CA's
//! CRL, or from another CA), and the config file that serves TLS with them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use banger_client::pki::{self, Ca, Usage};

/// A test PKI in its own directory (removed when dropped).
pub struct Pki {
    /// Where the files are.
    pub dir: tempfile::TempDir,
    ca: Ca,
    /// Serial numbers the CRL lists.
    revoked: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// A client certificate's files.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// Its serial number.
    pub serial: Vec<u8>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Pki {
    /// A new CA and the daemon's certificate.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("banger-pki").tempdir().expect("tempdir");
        let ca = Ca::new(pki::CA_NAME).expect("ca");
        let server = ca
            .issue(Usage::Server, &["localhost".into(), "127.0.0.1".into()], SystemTime::now() + DAY)
            .expect("server certificate");
        write(&dir.path().join("ca.pem"), &ca.cert_pem);
        write(&dir.path().join("server.pem"), &server.cert_pem);
        write(&dir.path().join("server-key.pem"), &server.key_pem);
        let pki = Self { dir, ca, revoked: std::sync::Mutex::new(Vec::new()) };
        pki.write_crl();
        pki
    }

    fn write_crl(&self) {
        let revoked = self.revoked.lock().expect("revoked").clone();
        let crl = self.ca.crl(&revoked, revoked.len() as u64 + 1, DAY).expect("crl");
        write(&self.dir.path().join("crl.pem"), &crl);
    }

    /// A client certificate named `name` that the CRL revokes (make it before the daemon
    /// starts, or reload it: bangerd reads the CRL then).
    pub fn revoked_client(&self, name: &str) -> ClientCert {
        let client = self.client(name);
        self.revoke(&client);
        client
    }

    /// Adds `client` to the CRL.
    pub fn revoke(&self, client: &ClientCert) {
        self.revoked.lock().expect("revoked").push(client.serial.clone());
        self.write_crl();
    }

    /// The CA certificate clients verify the daemon with.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A valid client certificate named `name`.
    pub fn client(&self, name: &str) -> ClientCert {
        let now = SystemTime::now();
        self.client_between(&self.ca, name, now - Duration::from_secs(60), now + DAY, "")
    }

    /// A client certificate named `name` whose time is over.
    pub fn expired_client(&self, name: &str) -> ClientCert {
        let now = SystemTime::now();
        self.client_between(&self.ca, name, now - 2 * DAY, now - DAY, "expired-")
    }

    /// A client certificate named `name` from a CA the daemon does not trust.
    pub fn foreign_client(&self, name: &str) -> ClientCert {
        let other = Ca::new("another CA").expect("another ca");
        let now = SystemTime::now();
        self.client_between(&other, name, now - Duration::from_secs(60), now + DAY, "foreign-")
    }

    fn client_between(&self, ca: &Ca, name: &str, from: SystemTime, until: SystemTime, prefix: &str) -> ClientCert {
        let issued = ca.issue_between(Usage::Client, &[name.to_owned()], from, until).expect("client certificate");
        let cert = self.dir.path().join(format!("{prefix}{name}.pem"));
        let key = self.dir.path().join(format!("{prefix}{name}-key.pem"));
        write(&cert, &issued.cert_pem);
        write(&key, &issued.key_pem);
        ClientCert { cert, key, serial: issued.serial }
    }

    /// A bangerd config file of `more` (keys, grants, tokens), then TLS with this PKI.
    pub fn config(&self, more: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let dir = self.dir.path().display();
        let text = format!(
            "{more}\n[tls]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/server.pem\"\nkey = \"{dir}/server-key.pem\"\ncrl = \"{dir}/crl.pem\"\n"
        );
        write(&path, &text);
        path
    }

    /// grpcurl's flags for TLS with `client`'s certificate (none: TLS without one).
    pub fn grpcurl_flags(&self, client: Option<&ClientCert>) -> Vec<String> {
        let mut flags = vec!["-cacert".to_owned(), self.ca().display().to_string()];
        if let Some(client) = client {
            flags.extend([
                "-cert".into(),
                client.cert.display().to_string(),
                "-key".into(),
                client.key.display().to_string(),
            ]);
        }
        flags
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A free TCP port on loopback (bound and released: a test binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// grpcurl, as `make setup` installs it.
pub fn grpcurl() -> PathBuf {
    let path = std::env::var_os("BANGER_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".tools/venv/bin/grpcurl"));
    assert!(path.is_file(), "grpcurl not found at {} (make setup installs it)", path.display());
    path
}
