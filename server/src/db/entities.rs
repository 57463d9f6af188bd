//! The tables as sea-orm entities, written by hand to match [`super::migration`].
//!
//! Rows are not API types: ids are bare UUIDs, names and networks are unchecked strings, and
//! nested specs are JSON text. The conversion to and from the `edgible::model` types happens in
//! the sibling modules, the only place that knows both shapes.

/// The single row holding the server-wide revision counter.
pub mod revision_counter {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "revision_counter")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub value: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod organization {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "organizations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        /// Whether it runs cloud hosts (issue 9); only a `platform` key sets it.
        pub operator: bool,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A person, global to the server and identified by e-mail address.
pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub email: String,
        pub created_at: ChronoDateTimeUtc,
        /// The argon2id hash (PHC string) of the user's login password, if one was set.
        pub password_hash: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A user's membership in an organization. The e-mail address is copied from the user (it
/// cannot change), so that a membership converts to the API type without a join.
pub mod member {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub user_id: Uuid,
        pub email: String,
        pub display_name: Option<String>,
        pub role: String,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An API key. Only the SHA-256 of the secret is kept.
pub mod api_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        pub prefix: String,
        pub secret_sha256: String,
        /// A JSON array of scope names.
        pub scopes: String,
        pub expires_at: Option<ChronoDateTimeUtc>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod device_pool {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "device_pools")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        pub tunnel_cidr: String,
        pub kind: String,
        pub region: Option<String>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A device. The tunnel address is the IPv4 address as an integer, so that the lowest free
/// one can be found in order; only the SHA-256 of the enrollment token and of the device
/// credential are kept.
pub mod device {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "devices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        pub pool_id: Uuid,
        /// A JSON object of label keys to values.
        pub labels: String,
        pub tunnel_address: i64,
        pub public_key: Option<String>,
        pub state: String,
        pub applied_revision: Option<i64>,
        pub last_seen_at: Option<ChronoDateTimeUtc>,
        pub enrollment_token_sha256: Option<String>,
        pub enrollment_expires_at: Option<ChronoDateTimeUtc>,
        /// When the enrollment token was exchanged; a used token is kept to say so.
        pub enrollment_used_at: Option<ChronoDateTimeUtc>,
        /// SHA-256 of the device credential issued at enrollment.
        pub credential_sha256: Option<String>,
        /// The revision of the last write that changed what the device should run.
        pub desired_revision: i64,
        /// The agent session that marked the device online, so that only that session marks
        /// it offline again.
        pub session_id: Option<Uuid>,
        /// The capacity its agent declared as a cloud host at its last hello (all three or
        /// none).
        pub cloud_vcpus: Option<i64>,
        pub cloud_memory_mib: Option<i64>,
        pub cloud_disk_mib: Option<i64>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An application; its spec is JSON text, its name and hostnames are copied out for lookups.
pub mod application {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "applications")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        pub spec: String,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One hostname of one application. The primary key makes hostnames unique across the whole
/// server; `parent` (the name a wildcard stands under) finds wildcard overlaps.
pub mod application_hostname {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "application_hostnames")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub hostname: String,
        pub parent: String,
        pub wildcard: bool,
        pub application_id: Uuid,
        pub organization_id: Uuid,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod placement {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "placements")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub application_id: Uuid,
        pub strategy: String,
        /// Where the application runs: the device a `serving-device` placement names, or the
        /// cloud host the scheduler chose for a `cloud` one (none while nothing is chosen).
        pub device_id: Option<Uuid>,
        pub pool_id: Option<Uuid>,
        pub region: Option<String>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
        /// The migration moving the application (`db::migrations`), while one runs.
        pub migration_id: Option<Uuid>,
        /// The spec that migration moves the application to (JSON), shown as the spec while
        /// it runs; the columns above keep describing where the application runs.
        pub migration_to: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The last status an agent reported for an application, one row per application. Only the
/// device the application is placed on reports it; the row goes when the placement moves.
pub mod application_status {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "application_statuses")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub application_id: Uuid,
        pub organization_id: Uuid,
        pub device_id: Uuid,
        pub phase: String,
        pub message: Option<String>,
        /// The application revision the status describes.
        pub revision: i64,
        pub reported_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A lifecycle event an agent reported. Ids are UUIDv7 taken on arrival, so id order is
/// arrival order; each application (and each device, for events of no application) keeps
/// only its most recent ones.
pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub device_id: Uuid,
        pub application_id: Option<Uuid>,
        pub at: ChronoDateTimeUtc,
        pub message: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An edge: the public entry point of one pool. Like a device, its tunnel address is the IPv4
/// address as an integer, taken from the pool's network by the same allocator, and only the
/// SHA-256 of its enrollment token and credential are kept.
pub mod edge {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "edges")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        pub pool_id: Uuid,
        /// `host:port` of the edge's WireGuard socket.
        pub endpoint: String,
        pub tunnel_address: i64,
        pub public_key: Option<String>,
        pub state: String,
        pub applied_revision: Option<i64>,
        pub last_seen_at: Option<ChronoDateTimeUtc>,
        pub enrollment_token_sha256: Option<String>,
        pub enrollment_expires_at: Option<ChronoDateTimeUtc>,
        pub enrollment_used_at: Option<ChronoDateTimeUtc>,
        pub credential_sha256: Option<String>,
        /// The edge session that marked the edge online, so that only that session marks it
        /// offline again.
        pub session_id: Option<Uuid>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The internal certificate authority: a single row holding its certificate and private key,
/// both PEM. The key is stored unencrypted (see `crate::certs`).
pub mod certificate_authority {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "certificate_authority")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub certificate_pem: String,
        pub key_pem: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A domain an organization claims. `verified_name` repeats `name` once the domain is
/// verified and is NULL before: its unique index is the safety net that no two organizations
/// ever hold the same verified domain (NULLs never collide).
pub mod domain {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "domains")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub name: String,
        /// The value the TXT record `_edgible-challenge.<name>` must hold.
        pub token: String,
        pub verified_name: Option<String>,
        pub verified_at: Option<ChronoDateTimeUtc>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The ACME account of one directory; its credentials (account URL and private key) sealed
/// with the server key (`certs::sealed`).
pub mod acme_account {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "acme_accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub directory_url: String,
        pub credentials_sealed: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An ACME order for one application's hostnames. `hostnames` is a JSON array; `state` is
/// `certs::orders::OrderState`'s text.
pub mod acme_order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "acme_orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub application_id: Uuid,
        pub device_id: Uuid,
        pub directory_url: String,
        pub hostnames: String,
        pub order_url: Option<String>,
        pub state: String,
        pub csr_pem: String,
        pub error: Option<String>,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The status of an application's current certificate, as the server last issued (or failed
/// to issue) it.
pub mod application_certificate {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "application_certificates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub application_id: Uuid,
        pub organization_id: Uuid,
        pub status: String,
        pub message: Option<String>,
        pub not_after: Option<ChronoDateTimeUtc>,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A key login assertions are signed with (`crate::access`). The current one is the newest
/// not retired; retired ones stay published to devices for a grace period.
pub mod assertion_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "assertion_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub kid: String,
        /// The PKCS#8 document: sealed with the server key when `sealed`, base64 otherwise.
        pub pkcs8: String,
        pub sealed: bool,
        pub created_at: ChronoDateTimeUtc,
        pub retired_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A key for one application's `api_key` access policy. Only the SHA-256 of the secret is kept.
pub mod application_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "application_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub application_id: Uuid,
        pub name: String,
        pub prefix: String,
        pub secret_sha256: String,
        pub expires_at: Option<ChronoDateTimeUtc>,
        pub revision: i64,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The short code of an application with a `short_code` access policy.
pub mod short_code {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "short_codes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub application_id: Uuid,
        pub organization_id: Uuid,
        pub code: String,
        /// Grows with every change of the code.
        pub version: i64,
        /// Whether the server generated the code (rather than the spec naming it).
        pub generated: bool,
        pub expires_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A session of the server's login pages. Only the SHA-256 of the cookie's secret is kept.
pub mod login_session {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "login_sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub secret_sha256: String,
        pub user_id: Uuid,
        pub created_at: ChronoDateTimeUtc,
        pub expires_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One usage record as an agent reported it, kept once per `(device_id, seq)`.
pub mod usage_record {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_records")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        /// The application's organization (not necessarily the device's).
        pub organization_id: Uuid,
        pub application_id: Uuid,
        pub start_at: ChronoDateTimeUtc,
        pub end_at: ChronoDateTimeUtc,
        pub received_at: ChronoDateTimeUtc,
        pub awake_ms: i64,
        pub requests: i64,
        pub bytes_in: i64,
        pub bytes_out: i64,
        pub wakes: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An application's usage in one hour, summed over the records stored.
pub mod usage_hour {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_hours")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub organization_id: Uuid,
        /// The start of the hour.
        #[sea_orm(primary_key, auto_increment = false)]
        pub hour: ChronoDateTimeUtc,
        #[sea_orm(primary_key, auto_increment = false)]
        pub application_id: Uuid,
        pub awake_ms: i64,
        pub requests: i64,
        pub bytes_in: i64,
        pub bytes_out: i64,
        pub wakes: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An application a device's session gave the device, and until when (`None`: it still has
/// it), so that usage it reports is accepted.
pub mod usage_placement {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_placements")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub application_id: Uuid,
        pub organization_id: Uuid,
        pub placed_until: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
