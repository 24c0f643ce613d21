//! Rules for user-chosen names. A VM name becomes the guest's hostname, so it is a hostname label.

/// Why a name was refused; the message is meant for a field violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than 63 characters.
    #[error("must be at most 63 characters, got {0}")]
    TooLong(usize),
    /// The name holds a character outside the allowed set.
    #[error("must contain only {allowed}; found {found:?}")]
    BadCharacter {
        /// The characters that are allowed.
        allowed: &'static str,
        /// The first character that is not.
        found: char,
    },
    /// The name starts or ends with something other than a letter or digit.
    #[error("must start and end with a lower-case letter or a digit")]
    BadEdge,
    /// The name would parse as an id, which would make lookups ambiguous.
    #[error("must not look like an id (26-character ULID)")]
    LooksLikeId,
}

const MAX_NAME_LEN: usize = 63;

fn check(name: &str, allowed: &'static str, ok: impl Fn(char) -> bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.chars().count()));
    }
    if let Some(found) = name.chars().find(|c| !ok(*c)) {
        return Err(NameError::BadCharacter { allowed, found });
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge_ok(name.chars().next()) || !edge_ok(name.chars().last()) {
        return Err(NameError::BadEdge);
    }
    if name.len() == 26 && name.parse::<ulid::Ulid>().is_ok() {
        return Err(NameError::LooksLikeId);
    }
    Ok(())
}

/// Checks a VM name: a hostname label of `a-z`, `0-9` and `-`, 1 to 63 characters.
pub fn vm_name_error(name: &str) -> Result<(), NameError> {
    check(name, "a-z, 0-9 and -", |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Checks an image name: `a-z`, `0-9`, `-`, `_` and `.`, 1 to 63 characters.
pub fn image_name_error(name: &str) -> Result<(), NameError> {
    check(name, "a-z, 0-9, -, _ and .", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostname_labels() {
        for name in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert_eq!(vm_name_error(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_a_hostname() {
        assert_eq!(vm_name_error(""), Err(NameError::Empty));
        assert_eq!(vm_name_error(&"x".repeat(64)), Err(NameError::TooLong(64)));
        assert!(matches!(vm_name_error("a/b"), Err(NameError::BadCharacter { found: '/', .. })));
        assert!(matches!(vm_name_error("a b"), Err(NameError::BadCharacter { found: ' ', .. })));
        assert!(matches!(vm_name_error("Web"), Err(NameError::BadCharacter { found: 'W', .. })));
        assert_eq!(vm_name_error("-web"), Err(NameError::BadEdge));
        assert_eq!(vm_name_error("web-"), Err(NameError::BadEdge));
        assert_eq!(vm_name_error(&ulid::Ulid::generate().to_string().to_lowercase()), Err(NameError::LooksLikeId));
    }

    #[test]
    fn image_names_allow_dots_and_underscores() {
        assert_eq!(image_name_error("debian_12.cloud"), Ok(()));
        assert!(image_name_error("../etc").is_err());
    }
}
