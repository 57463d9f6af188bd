//! Newtype identifiers, one per object kind, so that a device id can never be passed where an
//! application id is expected. On the wire every id is a UUID string; new ids are UUIDv7, so
//! they sort by creation time (pagination relies on this).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String, format = Uuid))]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = crate::model::ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| crate::model::ValidationError::new(format!("{s:?} is not a valid {} id", $what)))
            }
        }
    };
}

id_type!(OrganizationId, "organization");
id_type!(UserId, "user");
id_type!(MemberId, "member");
id_type!(ApiKeyId, "API key");
id_type!(DevicePoolId, "device pool");
id_type!(DeviceId, "device");
id_type!(ApplicationId, "application");
id_type!(PlacementId, "placement");
id_type!(EdgeId, "edge");
id_type!(EventId, "event");
id_type!(DomainId, "domain");
id_type!(ApplicationKeyId, "application key");
id_type!(MigrationId, "migration");
