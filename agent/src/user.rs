//! Who an exec runs as: `USER`, `USER:GROUP`, `UID` or `UID:GID`, resolved like a container
//! runtime resolves an image's `User` (names in the guest's /etc/passwd and /etc/group).

use std::path::Path;

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups: the groups of /etc/group that list the user by name.
    pub groups: Vec<u32>,
    /// The home directory, when /etc/passwd knows the user.
    pub home: Option<String>,
    /// The user's name and login shell, when /etc/passwd knows the user.
    pub name: Option<String>,
    /// See `name`; empty when the entry names none.
    pub shell: Option<String>,
}

/// A `user` the guest cannot resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("no user {0:?} in the guest's /etc/passwd")]
    UnknownUser(String),
    #[error("no group {0:?} in the guest's /etc/group")]
    UnknownGroup(String),
}

/// One /etc/passwd line.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [name, _, uid, gid, _, home, rest @ ..] => Some(PasswdEntry {
                name,
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
                home,
                shell: rest.first().copied().unwrap_or_default(),
            }),
            _ => None,
        }
    })
}

/// /etc/group lines as (name, gid, members).
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [name, _, gid, members, ..] => {
                Some((*name, gid.parse().ok()?, members.split(',').filter(|m| !m.is_empty()).collect()))
            }
            [name, _, gid] => Some((*name, gid.parse().ok()?, Vec::new())),
            _ => None,
        }
    })
}

/// Resolves `spec` against the contents of /etc/passwd and /etc/group (either may be empty:
/// numeric ids need neither).
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let entry = passwd_entries(passwd).find(|e| e.name == user || (e.uid.to_string() == user));
    let (uid, mut gid, name, home) = match (&entry, user.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), Some(e.home.to_owned())),
        (None, Ok(uid)) => (uid, 0, None, None),
        (None, Err(_)) => return Err(UserError::UnknownUser(user.to_owned())),
    };
    if let Some(group_spec) = group_spec {
        gid = match group_entries(group).find(|(name, _, _)| *name == group_spec) {
            Some((_, gid, _)) => gid,
            None => group_spec.parse().map_err(|_| UserError::UnknownGroup(group_spec.to_owned()))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = name {
        for (_, group_gid, members) in group_entries(group) {
            if members.contains(&name) && !groups.contains(&group_gid) {
                groups.push(group_gid);
            }
        }
    }
    let shell = entry.as_ref().map(|e| e.shell.to_owned()).filter(|shell| !shell.is_empty());
    Ok(Identity { uid, gid, groups, home, name: name.map(str::to_owned), shell })
}

/// Resolves `spec` in the guest's own files.
pub fn resolve(spec: &str) -> Result<Identity, UserError> {
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).unwrap_or_default();
    resolve_in(spec, &read("/etc/passwd"), &read("/etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nci:x:1000:1000::/home/ci:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:ci,other\nci:x:1000:\ndocker:x:999:ci\n";

    #[test]
    fn names_and_numbers_resolve_like_a_container_runtime() {
        let ci = resolve_in("ci", PASSWD, GROUP).expect("ci");
        assert_eq!((ci.uid, ci.gid, ci.home.as_deref()), (1000, 1000, Some("/home/ci")));
        assert_eq!(ci.groups, vec![1000, 50, 999]);
        assert_eq!((ci.name.as_deref(), ci.shell.as_deref()), (Some("ci"), Some("/bin/bash")));
        let by_uid = resolve_in("1000", PASSWD, GROUP).expect("1000");
        assert_eq!((by_uid.uid, by_uid.home.as_deref()), (1000, Some("/home/ci")));
        let with_group = resolve_in("ci:staff", PASSWD, GROUP).expect("ci:staff");
        assert_eq!((with_group.uid, with_group.gid), (1000, 50));
        let unknown_uid = resolve_in("4242:77", PASSWD, GROUP).expect("numeric ids need no entry");
        assert_eq!((unknown_uid.uid, unknown_uid.gid, unknown_uid.home), (4242, 77, None));
        assert_eq!(unknown_uid.shell, None);
        assert_eq!(resolve_in("4242", "", "").expect("no files").gid, 0);
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(resolve_in("ghost", PASSWD, GROUP), Err(UserError::UnknownUser("ghost".into())));
        assert_eq!(resolve_in("ci:ghosts", PASSWD, GROUP), Err(UserError::UnknownGroup("ghosts".into())));
    }
}
