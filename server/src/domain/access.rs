//! Who may do what: the identities callers come with, the roles the configuration grants
//! them, and tenants (a label selector a caller is confined to). Pure: the API's auth layer
//! finds the peer and the method, this decides.

use std::{fmt, sync::Arc};

use sha2::{Digest, Sha256};

use super::{Labels, labels_match};

/// What a caller may do; each role may do what the one before may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: get, list, watch, wait, logs, the host's facts.
    Viewer,
    /// Changes VMs (create, start, stop, delete, touch, exec, copy) and makes images from
    /// registries or streamed archives.
    Operator,
    /// Everything, including images from the host's own files.
    Admin,
}

impl Role {
    /// The role's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// Who is at the other end of a connection, as its transport proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A local process on the unix socket (`SO_PEERCRED`), with its user's groups.
    Local {
        /// Its uid.
        uid: u32,
        /// Its gid.
        gid: u32,
        /// Its user's supplementary groups.
        groups: Arc<[u32]>,
        /// Its pid when it connected.
        pid: Option<i32>,
    },
    /// A TLS client whose certificate the configured CA signed: its subject's common name
    /// and its subject alternative names (DNS, URI).
    Certificate {
        /// The names, common name first.
        names: Arc<[String]>,
        /// Its serial number (DER contents), which a CRL names.
        serial: Arc<[u8]>,
    },
    /// A TLS client without a certificate (allowed only to present a token, or to ask for
    /// health when that is configured).
    Anonymous,
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A local uid.
    Uid(u32),
    /// A local gid (the caller's primary group or one of its user's groups).
    Gid(u32),
    /// A client certificate carrying this name (common name or subject alternative name).
    Certificate(String),
}

/// A role (and maybe a tenant) for a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Whom.
    pub principal: Principal,
    /// What it may do.
    pub role: Role,
    /// The VMs it is confined to, if any.
    pub tenant: Option<Tenant>,
}

/// A bearer token: stored as the SHA-256 of its text, never the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Its name, which callers are known by.
    pub name: String,
    /// SHA-256 of the token's text.
    pub sha256: [u8; 32],
    /// What it may do.
    pub role: Role,
    /// The VMs it is confined to, if any.
    pub tenant: Option<Tenant>,
    /// When it stops being accepted (ms since the epoch).
    pub expires_ms: Option<i64>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("tenant", &self.tenant)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// A label selector a caller is confined to: it sees and touches only VMs carrying every
/// one of its labels, and the VMs it creates get them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(Labels);

impl Tenant {
    /// The tenant of `labels` (at least one).
    pub fn new(labels: Labels) -> Option<Self> {
        (!labels.is_empty()).then_some(Self(labels))
    }

    /// Its labels.
    pub fn labels(&self) -> &Labels {
        &self.0
    }

    /// True when a VM with `labels` is this tenant's.
    pub fn admits(&self, labels: &Labels) -> bool {
        labels_match(labels, &self.0)
    }

    /// A caller's label filter confined to this tenant: `None` when the filter asks for a
    /// value of one of the tenant's keys other than the tenant's (nothing can match).
    pub fn confine(&self, mut filter: Labels) -> Option<Labels> {
        for (key, value) in &self.0 {
            match filter.get(key) {
                Some(asked) if asked != value => return None,
                _ => {
                    filter.insert(key.clone(), value.clone());
                }
            }
        }
        Some(filter)
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (key, value) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// How it is named in spans and logs: `uid:1000`, `cert:ci-runner`, `token:deploy`.
    pub identity: String,
    /// What it may do; `None`: nothing was granted to it.
    pub role: Option<Role>,
    /// The VMs it is confined to, if any.
    pub tenant: Option<Tenant>,
}

impl Caller {
    /// A caller nothing was granted to (a request that came past no authentication).
    pub fn nobody() -> Self {
        Self { identity: "unknown".into(), role: None, tenant: None }
    }

    /// The role's name, or `none`.
    pub fn role_name(&self) -> &'static str {
        self.role.map_or("none", Role::as_str)
    }
}

/// Why a caller is not accepted at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    /// Nothing proves who it is.
    #[error("no credentials: present a client certificate signed by the daemon's CA, or a bearer token")]
    NoCredentials,
    /// The `authorization` header is not `Bearer <token>`.
    #[error("the authorization header must be \"Bearer <token>\"")]
    Malformed,
    /// No configured token has this text.
    #[error("unknown or revoked token")]
    UnknownToken,
    /// The client certificate was revoked after its connection was made.
    #[error("the client certificate is revoked")]
    Revoked,
    /// The token's time is over.
    #[error("token {name:?} expired")]
    Expired {
        /// Its name.
        name: String,
    },
}

/// Why an authenticated caller may not make a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} ({}) may not call {method}: it needs the {} role", role.map_or("no role", Role::as_str), needed.as_str())]
pub struct Denied {
    /// The caller.
    pub identity: String,
    /// Its role.
    pub role: Option<Role>,
    /// The method.
    pub method: String,
    /// The role the method needs.
    pub needed: Role,
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Health: nothing when configured so, else any authenticated caller.
    Health,
    /// Reflection: any authenticated caller (the API's shape is no secret).
    Authenticated,
    /// This role or a higher one.
    Role(Role),
}

/// What the method at `path` (`/banger.v1.VmService/CreateVm`) needs; anything not named
/// here (a method added later, a path nobody serves) needs admin.
pub fn needs(path: &str) -> Needs {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Needs::Health,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => Needs::Authenticated,
        ("banger.v1.VmService", "GetVm" | "ListVms" | "WaitVm" | "WatchVms" | "StreamVmLogs")
        | ("banger.v1.ImageService", "GetImage" | "ListImages")
        | ("banger.v1.HostService", "GetHost")
        | ("banger.v1.PoolService", "GetPool" | "ListPools")
        | ("banger.v1.SnapshotService", "GetSnapshot" | "ListSnapshots") => Needs::Role(Role::Viewer),
        (
            "banger.v1.VmService",
            "CreateVm" | "StartVm" | "StopVm" | "PauseVm" | "ResumeVm" | "DeleteVm" | "TouchVm" | "ExecVm" | "CopyToVm"
            | "CopyFromVm",
        )
        | ("banger.v1.ImageService", "PullImage" | "UploadImage")
        | ("banger.v1.SnapshotService", "SnapshotVm" | "DeleteSnapshot") => Needs::Role(Role::Operator),
        _ => Needs::Role(Role::Admin),
    }
}

/// Who gets which role: from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Roles of local users and groups, and of certificate names.
    pub grants: Vec<Grant>,
    /// Bearer tokens.
    pub tokens: Vec<Token>,
    /// Health checks need no credentials (a load balancer's or orchestrator's prober).
    pub health_without_credentials: bool,
}

/// SHA-256 of a token's text, as configured (hex).
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b) {
        difference |= x ^ y;
    }
    std::hint::black_box(difference) == 0
}

impl AccessPolicy {
    /// Who `peer` is, given the `authorization` header it sent (a token, when present,
    /// names the caller whatever the transport says), at `now_ms`.
    pub fn authenticate(
        &self,
        peer: &Peer,
        authorization: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<Caller, Unauthenticated> {
        if let Some(header) = authorization {
            return self.token_caller(header, now_ms);
        }
        match peer {
            Peer::Local { uid, gid, groups, .. } => Ok(self.local_caller(*uid, *gid, groups)),
            Peer::Certificate { names, .. } => Ok(self.certificate_caller(names)),
            Peer::Anonymous => Err(Unauthenticated::NoCredentials),
        }
    }

    fn token_caller(&self, header: &[u8], now_ms: i64) -> Result<Caller, Unauthenticated> {
        let header = std::str::from_utf8(header).map_err(|_| Unauthenticated::Malformed)?;
        let (scheme, text) = header.trim().split_once(' ').ok_or(Unauthenticated::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || text.trim().is_empty() {
            return Err(Unauthenticated::Malformed);
        }
        let digest = token_sha256(text.trim());
        // Every token is compared, so the time taken says nothing about which one matched.
        let mut found = None;
        for token in &self.tokens {
            if same_digest(&token.sha256, &digest) {
                found = Some(token);
            }
        }
        let token = found.ok_or(Unauthenticated::UnknownToken)?;
        if token.expires_ms.is_some_and(|expires| now_ms >= expires) {
            return Err(Unauthenticated::Expired { name: token.name.clone() });
        }
        Ok(Caller { identity: format!("token:{}", token.name), role: Some(token.role), tenant: token.tenant.clone() })
    }

    /// A local user: its uid's grant, else its groups' (the highest role), else admin for
    /// root, else no role.
    fn local_caller(&self, uid: u32, gid: u32, groups: &[u32]) -> Caller {
        let identity = format!("uid:{uid}");
        let by_uid = self.grants.iter().find(|g| g.principal == Principal::Uid(uid));
        let by_group = || {
            self.grants
                .iter()
                .filter(|g| matches!(g.principal, Principal::Gid(id) if id == gid || groups.contains(&id)))
                .max_by_key(|g| (g.tenant.is_none(), g.role))
        };
        match by_uid.or_else(by_group) {
            Some(grant) => Caller { identity, role: Some(grant.role), tenant: grant.tenant.clone() },
            None if uid == 0 => Caller { identity, role: Some(Role::Admin), tenant: None },
            None => Caller { identity, role: None, tenant: None },
        }
    }

    fn certificate_caller(&self, names: &[String]) -> Caller {
        let identity = format!("cert:{}", names.first().map_or("", String::as_str));
        let grant = names.iter().find_map(|name| {
            self.grants.iter().find(|g| matches!(&g.principal, Principal::Certificate(n) if n == name))
        });
        match grant {
            Some(grant) => Caller { identity, role: Some(grant.role), tenant: grant.tenant.clone() },
            None => Caller { identity, role: None, tenant: None },
        }
    }
}

impl Caller {
    /// Whether this caller may call a method that needs `needs`.
    pub fn may(&self, method: &str, needs: Needs) -> Result<(), Denied> {
        let needed = match needs {
            Needs::Health | Needs::Authenticated => return Ok(()),
            Needs::Role(role) => role,
        };
        match self.role {
            Some(role) if role >= needed => Ok(()),
            role => Err(Denied { identity: self.identity.clone(), role, method: method.to_owned(), needed }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(pairs: &[(&str, &str)]) -> Tenant {
        Tenant::new(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()).expect("labels")
    }

    fn local(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer::Local { uid, gid, groups: groups.into(), pid: None }
    }

    fn policy() -> AccessPolicy {
        AccessPolicy {
            grants: vec![
                Grant { principal: Principal::Uid(1000), role: Role::Viewer, tenant: None },
                Grant { principal: Principal::Gid(2000), role: Role::Operator, tenant: Some(tenant(&[("team", "a")])) },
                Grant { principal: Principal::Certificate("ci".into()), role: Role::Operator, tenant: None },
            ],
            tokens: vec![Token {
                name: "deploy".into(),
                sha256: token_sha256("s3cret"),
                role: Role::Admin,
                tenant: None,
                expires_ms: Some(1_000),
            }],
            health_without_credentials: false,
        }
    }

    #[test]
    fn local_users_get_their_uids_grant_else_their_groups_else_admin_for_root_else_nothing() {
        let policy = policy();
        let caller = |peer: Peer| policy.authenticate(&peer, None, 0).expect("local callers are authenticated");
        assert_eq!(caller(local(1000, 2000, &[])).role, Some(Role::Viewer), "the uid's grant wins");
        let member = caller(local(1001, 100, &[2000]));
        assert_eq!((member.role, member.tenant), (Some(Role::Operator), Some(tenant(&[("team", "a")]))));
        assert_eq!(caller(local(0, 0, &[])).role, Some(Role::Admin));
        let stranger = caller(local(1002, 1002, &[]));
        assert_eq!((stranger.identity.as_str(), stranger.role), ("uid:1002", None));
    }

    #[test]
    fn tokens_are_found_by_their_digest_and_refused_when_unknown_malformed_or_expired() {
        let policy = policy();
        let anonymous = Peer::Anonymous;
        let caller = policy.authenticate(&anonymous, Some(b"Bearer s3cret"), 999).expect("valid token");
        assert_eq!((caller.identity.as_str(), caller.role), ("token:deploy", Some(Role::Admin)));
        assert_eq!(
            policy.authenticate(&anonymous, Some(b"Bearer s3cret"), 1_000),
            Err(Unauthenticated::Expired { name: "deploy".into() })
        );
        assert_eq!(policy.authenticate(&anonymous, Some(b"Bearer other"), 0), Err(Unauthenticated::UnknownToken));
        assert_eq!(policy.authenticate(&anonymous, Some(b"Basic s3cret"), 0), Err(Unauthenticated::Malformed));
        assert_eq!(policy.authenticate(&anonymous, None, 0), Err(Unauthenticated::NoCredentials));
        // A token names the caller even on the unix socket, as root.
        let root = policy.authenticate(&local(0, 0, &[]), Some(b"Bearer nope"), 0);
        assert_eq!(root, Err(Unauthenticated::UnknownToken));
    }

    #[test]
    fn certificates_are_known_by_any_of_their_names() {
        let policy = policy();
        let names = |names: &[&str]| Peer::Certificate {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            serial: Arc::from(&[1u8][..]),
        };
        let caller = policy.authenticate(&names(&["runner-7", "ci"]), None, 0).expect("certificate");
        assert_eq!((caller.identity.as_str(), caller.role), ("cert:runner-7", Some(Role::Operator)));
        assert_eq!(policy.authenticate(&names(&["other"]), None, 0).expect("certificate").role, None);
    }

    #[test]
    fn each_method_needs_its_role_and_unknown_ones_need_admin() {
        let viewer = Caller { identity: "v".into(), role: Some(Role::Viewer), tenant: None };
        let operator = Caller { role: Some(Role::Operator), ..viewer.clone() };
        let nobody = Caller { role: None, ..viewer.clone() };
        let check = |caller: &Caller, path: &str| caller.may(path, needs(path)).is_ok();
        assert!(check(&viewer, "/banger.v1.VmService/ListVms"));
        assert!(check(&viewer, "/banger.v1.VmService/WatchVms"));
        assert!(!check(&viewer, "/banger.v1.VmService/CreateVm"));
        assert!(!check(&viewer, "/banger.v1.VmService/ExecVm"));
        assert!(check(&operator, "/banger.v1.VmService/ExecVm"));
        assert!(check(&operator, "/banger.v1.ImageService/PullImage"));
        assert!(!check(&operator, "/banger.v1.ImageService/ImportImage"));
        assert!(!check(&operator, "/banger.v1.ImageService/DeleteImage"));
        assert!(!check(&operator, "/banger.v1.VmService/SomethingNew"));
        assert!(check(&nobody, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!check(&nobody, "/banger.v1.VmService/GetVm"));
        let denied = nobody.may("/banger.v1.VmService/GetVm", needs("/banger.v1.VmService/GetVm"));
        assert_eq!(
            denied.expect_err("no role").to_string(),
            "v (no role) may not call /banger.v1.VmService/GetVm: it needs the viewer role"
        );
    }

    #[test]
    fn a_tenant_admits_its_vms_and_confines_filters() {
        let team = tenant(&[("team", "a")]);
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert!(team.admits(&labels(&[("team", "a"), ("job", "1")])));
        assert!(!team.admits(&labels(&[("team", "b")])));
        assert!(!team.admits(&labels(&[])));
        assert_eq!(team.confine(labels(&[("job", "1")])), Some(labels(&[("job", "1"), ("team", "a")])));
        assert_eq!(team.confine(labels(&[("team", "b")])), None);
        assert_eq!(team.to_string(), "team=a");
    }
}
