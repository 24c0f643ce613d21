//! Labels on VMs and images: small key/value pairs clients select by.

use std::collections::BTreeMap;

/// A resource's labels, ordered by key.
pub type Labels = BTreeMap<String, String>;

/// The most labels one resource carries.
pub const MAX_LABELS: usize = 32;
const MAX_LEN: usize = 63;

/// Why a set of labels is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// More than [`MAX_LABELS`].
    #[error("at most {MAX_LABELS} labels, got {count}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// A key breaks the key rules.
    #[error("key {key:?}: 1 to {MAX_LEN} characters of a-z, 0-9, -, _, . and /, starting with a letter or digit")]
    BadKey {
        /// The key.
        key: String,
    },
    /// A value breaks the value rules.
    #[error("value of {key:?}: up to {MAX_LEN} characters of a-z, A-Z, 0-9, -, _ and .")]
    BadValue {
        /// Its key.
        key: String,
    },
}

/// Why a set of labels is refused, naming the offending key.
pub fn labels_error(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany { count: labels.len() });
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LEN
            && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            return Err(LabelError::BadKey { key: key.clone() });
        }
        let value_ok =
            value.len() <= MAX_LEN && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !value_ok {
            return Err(LabelError::BadValue { key: key.clone() });
        }
    }
    Ok(())
}

/// True when `labels` carries every pair of `selector`.
pub fn matches(labels: &Labels, selector: &Labels) -> bool {
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn keys_and_values_are_checked_and_selectors_match_subsets() {
        assert!(labels_error(&labels(&[("ci.example.com/job", "build-42"), ("team", ""), ("0x", "A.b_c-d")])).is_ok());
        for bad in ["", "Team", "-x", "a b", &"k".repeat(64)] {
            let refused = labels_error(&labels(&[(bad, "v")]));
            assert_eq!(refused, Err(LabelError::BadKey { key: bad.into() }));
        }
        for bad in ["has space", "quote\"", &"v".repeat(64)] {
            assert_eq!(labels_error(&labels(&[("k", bad)])), Err(LabelError::BadValue { key: "k".into() }));
        }
        let many: Labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(labels_error(&many), Err(LabelError::TooMany { count: 33 }));
        let vm = labels(&[("job", "42"), ("team", "ci")]);
        assert!(matches(&vm, &labels(&[("job", "42")])) && matches(&vm, &Labels::new()));
        assert!(!matches(&vm, &labels(&[("job", "43")])) && !matches(&vm, &labels(&[("other", "42")])));
    }
}
