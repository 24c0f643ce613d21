//! Who is calling, and may they: the one place every call's caller is authenticated and its
//! role checked ([`AuthLayer`]), the peer of each connection ([`Peered`]: `SO_PEERCRED` on
//! the unix socket, the client certificate on TCP), and the TLS listener (TLS 1.3, client
//! certificates from the configured CA). Tenants are confined by the services, which find
//! the [`Caller`] in each request's extensions.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, ReadBuf};
use tonic::{codegen::http, transport::server::Connected};

use super::status;
use crate::{
    clock::Clock,
    config::TlsFiles,
    domain::access::{AccessPolicy, Caller, Needs, Peer, Role, Unauthenticated, needs},
};

/// A connection and who is at its other end, found once when it was accepted.
#[derive(Debug)]
pub struct Peered<S> {
    inner: S,
    peer: Peer,
}

impl<S> Peered<S> {
    /// `inner`, whose peer is `peer`.
    pub fn new(inner: S, peer: Peer) -> Self {
        Self { inner, peer }
    }
}

impl<S> Connected for Peered<S> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Peered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Peered);

/// The local process at the other end of a unix-socket connection, with its user's groups
/// (a group grant counts for members whose primary group is another). A connection whose
/// credentials cannot be read is anonymous, and may do nothing.
pub fn local_peer(stream: &tokio::net::UnixStream) -> Peer {
    let Ok(credentials) = stream.peer_cred() else { return Peer::Anonymous };
    let (uid, gid) = (credentials.uid(), credentials.gid());
    let groups = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .and_then(|user| {
            let name = std::ffi::CString::new(user.name).ok()?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
        })
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    Peer::Local { uid, gid, groups, pid: credentials.pid() }
}

/// The peer a verified client certificate makes: the names it carries (its subject's common
/// name first, then its DNS and URI subject alternative names) and its serial number.
pub fn certificate_peer(certificate: &CertificateDer<'_>) -> Peer {
    let Ok(parsed) = webpki::EndEntityCert::try_from(certificate) else {
        return Peer::Certificate { names: Arc::new([]), serial: Arc::new([]) };
    };
    let mut names: Vec<String> = common_name(parsed.subject()).into_iter().collect();
    for name in parsed.valid_dns_names().chain(parsed.valid_uri_names()) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    Peer::Certificate { names: names.into(), serial: Arc::from(parsed.serial()) }
}

/// The common name (OID 2.5.4.3) in a DER `Name`'s contents (a sequence of RDN sets).
fn common_name(mut name: &[u8]) -> Option<String> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    while let Some((0x31, set, rest)) = der_element(name) {
        name = rest;
        let mut set = set;
        while let Some((0x30, attribute, more)) = der_element(set) {
            set = more;
            if let Some((0x06, oid, value)) = der_element(attribute)
                && oid == COMMON_NAME
                && let Some((0x0c | 0x13 | 0x16, text, _)) = der_element(value)
            {
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// One DER element at the start of `input`: its tag, its contents and what follows.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])), rest.get(2..)?),
        _ => return None,
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The TCP listener's TLS: TLS 1.3 only, HTTP/2, client certificates verified against the
/// configured CA (and CRL). Certificates are required unless tokens or credential-less
/// health checks are configured; a connection without one may then only present a token
/// or ask for health.
pub fn server_config(files: &TlsFiles, access: &AccessPolicy) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read_certs = |path: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("read certificates from {}", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots.add(ca).with_context(|| format!("CA certificate in {}", files.ca.display()))?;
    }
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone());
    if let Some(crls) = read_crls(files)? {
        verifier = verifier.with_crls(crls);
    }
    if !access.tokens.is_empty() || access.health_without_credentials {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().context("client certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("read private key {}", files.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, key)
        .with_context(|| format!("the certificate {} and key {}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Who may call and the TCP listener's TLS, shared by the auth layer and the listener;
/// replaced whole when the configuration is reloaded (SIGHUP): a call or a handshake sees
/// the old or the new one, never a mix.
#[derive(Debug, Clone, Default)]
pub struct AccessControl {
    now: Arc<std::sync::RwLock<Arc<Access>>>,
}

/// What [`AccessControl`] holds at one time.
#[derive(Debug, Default)]
struct Access {
    policy: AccessPolicy,
    tls: Option<Arc<rustls::ServerConfig>>,
    revoked: Vec<webpki::CertRevocationList<'static>>,
}

impl AccessControl {
    /// Access by `policy`, TCP served with `tls`, certificates checked against `revoked`.
    pub fn new(
        policy: AccessPolicy,
        tls: Option<Arc<rustls::ServerConfig>>,
        revoked: Vec<webpki::CertRevocationList<'static>>,
    ) -> Self {
        Self { now: Arc::new(std::sync::RwLock::new(Arc::new(Access { policy, tls, revoked }))) }
    }

    fn now(&self) -> Arc<Access> {
        self.now.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The TCP listener's TLS now.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.now().tls.clone()
    }

    /// From now on, `policy`, `tls` (the old one kept when `None`) and `revoked`.
    pub fn replace(
        &self,
        policy: AccessPolicy,
        tls: Option<Arc<rustls::ServerConfig>>,
        revoked: Vec<webpki::CertRevocationList<'static>>,
    ) {
        let mut now = self.now.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tls = tls.or_else(|| now.tls.clone());
        *now = Arc::new(Access { policy, tls, revoked });
    }
}

impl Access {
    /// True when a CRL names the certificate with this serial number.
    fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.iter().any(|crl| matches!(crl.find_serial(serial), Ok(Some(_))))
    }
}

/// The CRLs `[tls] crl` names, if any.
fn read_crls(files: &TlsFiles) -> anyhow::Result<Option<Vec<CertificateRevocationListDer<'static>>>> {
    let Some(crl) = &files.crl else { return Ok(None) };
    let crls = CertificateRevocationListDer::pem_file_iter(crl)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read CRL {}", crl.display()))?;
    Ok(Some(crls))
}

/// The revocations of `[tls] crl`, for connections made before a reload revoked their
/// certificate.
pub fn revocations(files: &TlsFiles) -> anyhow::Result<Vec<webpki::CertRevocationList<'static>>> {
    let crls = read_crls(files)?.unwrap_or_default();
    crls.iter()
        .map(|crl| match webpki::OwnedCertRevocationList::from_der(crl) {
            Ok(owned) => Ok(webpki::CertRevocationList::Owned(owned)),
            Err(e) => Err(anyhow::anyhow!("CRL: {e:?}")),
        })
        .collect()
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 128;

/// Connections accepted on `listener` that completed a TLS handshake, each with its peer.
/// Handshakes run beside each other (a slow client holds up nobody) and fail quietly (logged
/// at debug: a port scanner is no event).
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    access: AccessControl,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Peered<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (stream, address) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // A small response must not wait for the client's delayed ACK.
            let _ = stream.set_nodelay(true);
            // No TLS, no TCP: the daemon never listens without it.
            let Some(config) = access.tls() else { continue };
            let (acceptor, tx) = (tokio_rustls::TlsAcceptor::from(config), tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                drop(permit);
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return tracing::debug!(%address, error = %error, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%address, "TLS handshake timed out"),
                };
                let peer = match stream.get_ref().1.peer_certificates().and_then(<[_]>::first) {
                    Some(certificate) => certificate_peer(certificate),
                    None => Peer::Anonymous,
                };
                let _ = tx.send(Ok(Peered::new(stream, peer))).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Authenticates every call and checks its caller's role (see
/// [`crate::domain::access::needs`]); puts the [`Caller`] in the request's extensions and on
/// its span.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    access: AccessControl,
    clock: Clock,
}

impl AuthLayer {
    /// Checks calls against `access`'s policy, token expiry against `clock`.
    pub fn new(access: AccessControl, clock: Clock) -> Self {
        Self { access, clock }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, layer: self.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// What the layer decided about one call.
enum Verdict {
    Allowed(Caller),
    Refused(tonic::Status, Option<Caller>),
}

impl AuthLayer {
    /// Who calls `request`, and whether it may make a call that `needs` this.
    fn decide<B>(&self, request: &http::Request<B>, needs: Needs) -> Verdict {
        let path = request.uri().path();
        let peer = request.extensions().get::<Peer>().unwrap_or(&Peer::Anonymous);
        let authorization = request.headers().get(http::header::AUTHORIZATION).map(http::HeaderValue::as_bytes);
        let access = self.access.now();
        if let Peer::Certificate { serial, .. } = peer
            && access.is_revoked(serial)
        {
            return Verdict::Refused(status::unauthenticated(&Unauthenticated::Revoked), None);
        }
        let policy = &access.policy;
        let caller = match policy.authenticate(peer, authorization, self.clock.now_ms()) {
            Ok(caller) => caller,
            Err(_) if needs == Needs::Health && policy.health_without_credentials => {
                return Verdict::Allowed(Caller { identity: "anonymous".into(), role: None, tenant: None });
            }
            Err(error) => return Verdict::Refused(status::unauthenticated(&error), None),
        };
        match caller.may(path, needs) {
            Ok(()) => Verdict::Allowed(caller),
            Err(denied) => Verdict::Refused(status::permission_denied(&denied), Some(caller)),
        }
    }
}

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for Auth<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let needs = needs(&method);
        let read = matches!(needs, Needs::Health | Needs::Authenticated | Needs::Role(Role::Viewer));
        match self.layer.decide(&request, needs) {
            Verdict::Allowed(caller) => {
                let (identity, role) = (caller.identity.clone(), caller.role_name());
                request.extensions_mut().insert(caller);
                let response = self.inner.call(request);
                // Polled inside the call's span: the fields land on it.
                Box::pin(async move {
                    let span = tracing::Span::current();
                    span.record("caller", identity.as_str());
                    span.record("role", role);
                    let response = response.await;
                    // One line per call, with the operation it ran: who did what.
                    if let Ok(answer) = &response {
                        let header = |name: &str| answer.headers().get(name).and_then(|v| v.to_str().ok());
                        let op_id = header(super::OP_ID_METADATA);
                        // Only an error answered at once has its code in the headers.
                        let code = header("grpc-status");
                        if read {
                            tracing::debug!(caller = %identity, role, method, op_id, code, "call");
                        } else {
                            tracing::info!(caller = %identity, role, method, op_id, code, "call");
                        }
                    }
                    response
                })
            }
            Verdict::Refused(status, caller) => Box::pin(async move {
                let span = tracing::Span::current();
                let identity = caller.as_ref().map_or("unauthenticated", |c| c.identity.as_str());
                span.record("caller", identity);
                span.record("role", caller.as_ref().map_or("none", Caller::role_name));
                tracing::warn!(caller = identity, method, code = ?status.code(), reason = status.message(), "call refused");
                Ok(status.into_http())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_name_is_found_in_a_der_name() {
        // SEQUENCE { SET { SEQUENCE { OID 2.5.4.10 (O), "acme" } }, SET { SEQUENCE { OID 2.5.4.3 (CN), "ci-runner" } } }
        let organisation = [0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x04, b'a', b'c', b'm', b'e'];
        let mut common = vec![0x31, 0x12, 0x30, 0x10, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x09];
        common.extend_from_slice(b"ci-runner");
        let name = [&organisation[..], &common].concat();
        assert_eq!(common_name(&name).as_deref(), Some("ci-runner"));
        assert_eq!(common_name(&organisation), None);
        assert_eq!(common_name(&name[..name.len() - 1]), None, "truncated");
        assert_eq!(common_name(&[]), None);
    }
}
