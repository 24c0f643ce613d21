//! A small certificate authority for one bangerd host: the CA its TCP listener trusts, the
//! daemon's certificate, and client certificates (`banger tls init`, `banger tls client`),
//! and bearer tokens with the digest bangerd's config stores (`banger token new`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

/// A CA that signs a host's certificates.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Its serial number (what a CRL names).
    pub serial: Vec<u8>,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// bangerd's TCP listener: its names are DNS names or IP addresses clients dial.
    Server,
    /// A client: its name (common name and DNS name) is what bangerd's grants name.
    Client,
}

/// How long certificates are valid by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The common name of the CAs `banger tls init` makes.
pub const CA_NAME: &str = "banger CA";

fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl Ca {
    /// A new CA named `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(name)?;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + 10 * DEFAULT_VALIDITY).into();
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem })
    }

    /// The CA in `ca.pem` and `ca-key.pem`, as `banger tls init` wrote them (named
    /// [`CA_NAME`]: what it signs names it as issuer, and its key identifies it).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self { issuer: Issuer::new(ca_params(CA_NAME)?, key), cert_pem: cert_pem.to_owned() })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `names` (the first is the common name), valid from an hour ago
    /// until `not_after`.
    pub fn issue(&self, usage: Usage, names: &[String], not_after: SystemTime) -> Result<Issued, rcgen::Error> {
        self.issue_between(usage, names, SystemTime::now() - Duration::from_secs(3600), not_after)
    }

    /// A certificate for `names`, valid between two times (tests make expired ones).
    pub fn issue_between(
        &self,
        usage: Usage,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first.as_str());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        // 16 random bytes, positive: unique without keeping count.
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|_| rcgen::Error::RingUnspecified)?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial: serial.to_vec() })
    }

    /// A CRL (PEM) revoking the certificates with these serial numbers, valid for `valid`.
    pub fn crl(&self, serials: &[Vec<u8>], number: u64, valid: Duration) -> Result<String, rcgen::Error> {
        let now = SystemTime::now();
        let revoked_certs = serials
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: now.into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: (now - Duration::from_secs(60)).into(),
            next_update: (now + valid).into(),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}

/// Writes `contents` to `path`, readable by its owner only when `private`.
pub fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// The files of a client certificate named `name` in `dir`: certificate, key, serial (hex).
pub fn client_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("client-{name}.pem")),
        dir.join(format!("client-{name}-key.pem")),
        dir.join(format!("client-{name}.serial")),
    )
}

/// A new random bearer token (256 bits, hex) and the SHA-256 bangerd's config stores.
pub fn new_token() -> std::io::Result<(String, String)> {
    use sha2::Digest;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let token = format!("banger_{}", hex::encode(bytes));
    let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    Ok((token, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_certificates_a_loaded_copy_signs_more_and_tokens_differ() {
        let ca = Ca::new(CA_NAME).expect("ca");
        let later = SystemTime::now() + DEFAULT_VALIDITY;
        let server = ca.issue(Usage::Server, &["localhost".into(), "127.0.0.1".into()], later).expect("server");
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.contains("PRIVATE KEY"));
        let again = Ca::load(&ca.cert_pem, &ca.key_pem()).expect("load");
        assert!(again.issue(Usage::Client, &["ci".into()], later).is_ok());
        let crl = again.crl(std::slice::from_ref(&server.serial), 1, DEFAULT_VALIDITY).expect("crl");
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");
        let (a, digest) = new_token().expect("token");
        let (b, _) = new_token().expect("token");
        assert_ne!(a, b);
        assert_eq!(digest.len(), 64);
    }
}
