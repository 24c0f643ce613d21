//! Typed identifiers: a VM id is never an image id, and neither is an operation id.

use std::{fmt, str::FromStr};

use ulid::Ulid;

/// The kinds of resource the API names, for errors that say which one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A VM.
    Vm,
    /// An image.
    Image,
    /// A warm pool.
    Pool,
    /// A snapshot.
    Snapshot,
}

impl Resource {
    /// `vm` or `image`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Image => "image",
            Self::Pool => "pool",
            Self::Snapshot => "snapshot",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string was not a valid id (a 26-character ULID).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id: {0:?}")]
pub struct ParseIdError(pub String);

/// The next id of this process: one generator for every kind of id, so that ids made in the
/// same millisecond still grow (keyset pages and "oldest first" rely on it).
fn next_ulid() -> Ulid {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let mut generator = GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Only 2^80 ids in one millisecond overflow.
    generator.generate().unwrap_or_else(|_| Ulid::generate())
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            /// A new id, ordered after every id generated before it in this process.
            pub fn generate() -> Self {
                Self(next_ulid())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ulid::from_string(s).map(Self).map_err(|_| ParseIdError(s.to_owned()))
            }
        }
    };
}

ulid_id!(
    /// Identifies a VM for its whole life; never reused.
    VmId
);
ulid_id!(
    /// Identifies a warm pool; never reused.
    PoolId
);
ulid_id!(
    /// Identifies a snapshot; never reused.
    SnapshotId
);
ulid_id!(
    /// Identifies an image for its whole life; never reused.
    ImageId
);
ulid_id!(
    /// Identifies one run of an operation (create, start, stop, ...); appears in logs and errors.
    OpId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings() {
        let id = VmId::generate();
        assert_eq!(id.to_string().parse::<VmId>(), Ok(id));
    }

    #[test]
    fn ids_made_in_the_same_millisecond_still_grow() {
        let ids: Vec<VmId> = (0..1000).map(|_| VmId::generate()).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(ids.windows(2).all(|pair| pair[0].to_string() < pair[1].to_string()), "as text too");
    }

    #[test]
    fn names_are_not_ids() {
        assert!("my-vm".parse::<VmId>().is_err());
    }
}
