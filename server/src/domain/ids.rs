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
}

impl Resource {
    /// `vm` or `image`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Image => "image",
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

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            /// A new id, ordered after every id generated before it in this process.
            pub fn generate() -> Self {
                Self(Ulid::generate())
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
    fn names_are_not_ids() {
        assert!("my-vm".parse::<VmId>().is_err());
    }
}
