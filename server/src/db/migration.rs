//! The schema, as migrations that run at startup. A shipped migration is never edited; a
//! change of schema is a new migration appended to [`Migrator::migrations`].
//!
//! Foreign keys use the default `NO ACTION`: the operations in the sibling modules delete
//! children explicitly, in order, so the keys are a safety net rather than a mechanism.

use sea_orm_migration::prelude::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Initial),
            Box::new(Agents),
            Box::new(DataPath),
            Box::new(Domains),
            Box::new(AcmeCertificates),
            Box::new(Access),
            Box::new(CloudHosts),
            Box::new(Usage),
            Box::new(Migrations),
        ]
    }
}

struct Initial;

impl MigrationName for Initial {
    fn name(&self) -> &str {
        "m0001_initial"
    }
}

fn name(text: &'static str) -> Alias {
    Alias::new(text)
}

/// The metadata columns every object table starts with.
fn object_table(table: &'static str) -> TableCreateStatement {
    Table::create()
        .table(name(table))
        .col(ColumnDef::new(name("id")).uuid().not_null().primary_key())
        .col(ColumnDef::new(name("revision")).big_integer().not_null())
        .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
        .col(ColumnDef::new(name("updated_at")).timestamp_with_time_zone().not_null())
        .to_owned()
}

fn organization_column(table: &'static str) -> (ColumnDef, ForeignKeyCreateStatement) {
    (
        ColumnDef::new(name("organization_id")).uuid().not_null().to_owned(),
        ForeignKey::create()
            .name(format!("fk_{table}_organization"))
            .from(name(table), name("organization_id"))
            .to(name("organizations"), name("id"))
            .to_owned(),
    )
}

fn foreign_key(table: &'static str, column: &'static str, target: &'static str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{table}_{column}"))
        .from(name(table), name(column))
        .to(name(target), name("id"))
        .to_owned()
}

fn unique_index(index: &'static str, table: &'static str, columns: &[&'static str]) -> IndexCreateStatement {
    let mut statement = Index::create();
    statement.name(index).table(name(table)).unique();
    for column in columns {
        statement.col(name(column));
    }
    statement.to_owned()
}

fn index(index: &'static str, table: &'static str, columns: &[&'static str]) -> IndexCreateStatement {
    let mut statement = Index::create();
    statement.name(index).table(name(table));
    for column in columns {
        statement.col(name(column));
    }
    statement.to_owned()
}

/// An object table that belongs to an organization, with its extra columns and keys.
fn owned_table(
    table: &'static str,
    columns: Vec<ColumnDef>,
    keys: Vec<ForeignKeyCreateStatement>,
) -> TableCreateStatement {
    let mut statement = object_table(table);
    let (organization, mut organization_key) = organization_column(table);
    statement.col(organization).foreign_key(&mut organization_key);
    for column in columns {
        statement.col(column);
    }
    for mut key in keys {
        statement.foreign_key(&mut key);
    }
    statement
}

fn text(column: &'static str) -> ColumnDef {
    ColumnDef::new(name(column)).text().not_null().to_owned()
}

fn optional_text(column: &'static str) -> ColumnDef {
    ColumnDef::new(name(column)).text().null().to_owned()
}

// The trait spells `&SchemaManager` without its lifetime, and an async-trait method must match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(name("revision_counter"))
                    .col(ColumnDef::new(name("id")).integer().not_null().primary_key())
                    .col(ColumnDef::new(name("value")).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager.get_connection().execute_unprepared("INSERT INTO revision_counter (id, value) VALUES (1, 0)").await?;

        let mut organizations = object_table("organizations");
        organizations.col(text("name"));
        manager.create_table(organizations).await?;
        manager.create_index(unique_index("ux_organizations_name", "organizations", &["name"])).await?;

        manager
            .create_table(
                Table::create()
                    .table(name("users"))
                    .col(ColumnDef::new(name("id")).uuid().not_null().primary_key())
                    .col(text("email"))
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager.create_index(unique_index("ux_users_email", "users", &["email"])).await?;

        manager
            .create_table(owned_table(
                "members",
                vec![
                    ColumnDef::new(name("user_id")).uuid().not_null().to_owned(),
                    text("email"),
                    optional_text("display_name"),
                    text("role"),
                ],
                vec![foreign_key("members", "user_id", "users")],
            ))
            .await?;
        manager.create_index(unique_index("ux_members_user", "members", &["organization_id", "user_id"])).await?;

        manager
            .create_table(owned_table(
                "api_keys",
                vec![
                    text("name"),
                    text("prefix"),
                    text("secret_sha256"),
                    text("scopes"),
                    ColumnDef::new(name("expires_at")).timestamp_with_time_zone().null().to_owned(),
                ],
                vec![],
            ))
            .await?;
        manager.create_index(unique_index("ux_api_keys_name", "api_keys", &["organization_id", "name"])).await?;
        manager.create_index(unique_index("ux_api_keys_secret", "api_keys", &["secret_sha256"])).await?;

        manager
            .create_table(owned_table(
                "device_pools",
                vec![text("name"), text("tunnel_cidr"), text("kind"), optional_text("region")],
                vec![],
            ))
            .await?;
        manager
            .create_index(unique_index("ux_device_pools_name", "device_pools", &["organization_id", "name"]))
            .await?;

        manager
            .create_table(owned_table(
                "devices",
                vec![
                    text("name"),
                    ColumnDef::new(name("pool_id")).uuid().not_null().to_owned(),
                    text("labels"),
                    ColumnDef::new(name("tunnel_address")).big_integer().not_null().to_owned(),
                    optional_text("public_key"),
                    text("state"),
                    ColumnDef::new(name("applied_revision")).big_integer().null().to_owned(),
                    ColumnDef::new(name("last_seen_at")).timestamp_with_time_zone().null().to_owned(),
                    optional_text("enrollment_token_sha256"),
                    ColumnDef::new(name("enrollment_expires_at")).timestamp_with_time_zone().null().to_owned(),
                ],
                vec![foreign_key("devices", "pool_id", "device_pools")],
            ))
            .await?;
        manager.create_index(unique_index("ux_devices_name", "devices", &["organization_id", "name"])).await?;
        // The safety net under address allocation: even a bug cannot hand out an address twice.
        manager.create_index(unique_index("ux_devices_address", "devices", &["pool_id", "tunnel_address"])).await?;

        manager.create_table(owned_table("applications", vec![text("name"), text("spec")], vec![])).await?;
        manager
            .create_index(unique_index("ux_applications_name", "applications", &["organization_id", "name"]))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(name("application_hostnames"))
                    .col(ColumnDef::new(name("hostname")).text().not_null().primary_key())
                    .col(text("parent"))
                    .col(ColumnDef::new(name("wildcard")).boolean().not_null())
                    .col(ColumnDef::new(name("application_id")).uuid().not_null())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .foreign_key(&mut foreign_key("application_hostnames", "application_id", "applications"))
                    .foreign_key(&mut foreign_key("application_hostnames", "organization_id", "organizations"))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_application_hostnames_parent", "application_hostnames", &["parent"])).await?;
        manager
            .create_index(index("ix_application_hostnames_application", "application_hostnames", &["application_id"]))
            .await?;

        manager
            .create_table(owned_table(
                "placements",
                vec![
                    ColumnDef::new(name("application_id")).uuid().not_null().to_owned(),
                    text("strategy"),
                    ColumnDef::new(name("device_id")).uuid().null().to_owned(),
                    ColumnDef::new(name("pool_id")).uuid().null().to_owned(),
                    optional_text("region"),
                ],
                vec![
                    foreign_key("placements", "application_id", "applications"),
                    foreign_key("placements", "device_id", "devices"),
                    foreign_key("placements", "pool_id", "device_pools"),
                ],
            ))
            .await?;
        manager.create_index(unique_index("ux_placements_application", "placements", &["application_id"])).await?;
        manager.create_index(index("ix_placements_device", "placements", &["device_id"])).await?;
        Ok(())
    }
}

/// Agents: enrollment state and credentials of devices, the per-device desired revision and
/// session, reported application statuses and events.
struct Agents;

impl MigrationName for Agents {
    fn name(&self) -> &str {
        "m0002_agents"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Agents {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite alters one column per statement.
        let columns = [
            ColumnDef::new(name("enrollment_used_at")).timestamp_with_time_zone().null().to_owned(),
            optional_text("credential_sha256"),
            ColumnDef::new(name("desired_revision")).big_integer().not_null().default(0).to_owned(),
            ColumnDef::new(name("session_id")).uuid().null().to_owned(),
        ];
        for mut column in columns {
            manager.alter_table(Table::alter().table(name("devices")).add_column(&mut column).to_owned()).await?;
        }
        manager.get_connection().execute_unprepared("UPDATE devices SET desired_revision = revision").await?;
        manager.create_index(unique_index("ux_devices_credential", "devices", &["credential_sha256"])).await?;
        manager.create_index(index("ix_devices_enrollment_token", "devices", &["enrollment_token_sha256"])).await?;

        manager
            .create_table(
                Table::create()
                    .table(name("application_statuses"))
                    .col(ColumnDef::new(name("application_id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(ColumnDef::new(name("device_id")).uuid().not_null())
                    .col(text("phase"))
                    .col(optional_text("message"))
                    .col(ColumnDef::new(name("revision")).big_integer().not_null())
                    .col(ColumnDef::new(name("reported_at")).timestamp_with_time_zone().not_null())
                    .foreign_key(&mut foreign_key("application_statuses", "application_id", "applications"))
                    .foreign_key(&mut foreign_key("application_statuses", "organization_id", "organizations"))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(name("events"))
                    .col(ColumnDef::new(name("id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(ColumnDef::new(name("device_id")).uuid().not_null())
                    .col(ColumnDef::new(name("application_id")).uuid().null())
                    .col(ColumnDef::new(name("at")).timestamp_with_time_zone().not_null())
                    .col(text("message"))
                    .foreign_key(&mut foreign_key("events", "organization_id", "organizations"))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_events_organization", "events", &["organization_id", "id"])).await?;
        manager.create_index(index("ix_events_application", "events", &["application_id", "id"])).await?;
        manager.create_index(index("ix_events_device", "events", &["device_id", "id"])).await?;
        Ok(())
    }
}

/// The data path: edges (the entry points of pools) and the internal certificate authority.
struct DataPath;

impl MigrationName for DataPath {
    fn name(&self) -> &str {
        "m0003_data_path"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for DataPath {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(owned_table(
                "edges",
                vec![
                    text("name"),
                    ColumnDef::new(name("pool_id")).uuid().not_null().to_owned(),
                    text("endpoint"),
                    ColumnDef::new(name("tunnel_address")).big_integer().not_null().to_owned(),
                    optional_text("public_key"),
                    text("state"),
                    ColumnDef::new(name("applied_revision")).big_integer().null().to_owned(),
                    ColumnDef::new(name("last_seen_at")).timestamp_with_time_zone().null().to_owned(),
                    optional_text("enrollment_token_sha256"),
                    ColumnDef::new(name("enrollment_expires_at")).timestamp_with_time_zone().null().to_owned(),
                    ColumnDef::new(name("enrollment_used_at")).timestamp_with_time_zone().null().to_owned(),
                    optional_text("credential_sha256"),
                    ColumnDef::new(name("session_id")).uuid().null().to_owned(),
                ],
                vec![foreign_key("edges", "pool_id", "device_pools")],
            ))
            .await?;
        manager.create_index(unique_index("ux_edges_name", "edges", &["organization_id", "name"])).await?;
        // Devices and edges share a pool's addresses; the allocator looks at both tables, and
        // this index is the safety net among edges (`ux_devices_address` among devices).
        manager.create_index(unique_index("ux_edges_address", "edges", &["pool_id", "tunnel_address"])).await?;
        manager.create_index(unique_index("ux_edges_credential", "edges", &["credential_sha256"])).await?;
        manager.create_index(index("ix_edges_enrollment_token", "edges", &["enrollment_token_sha256"])).await?;
        manager.create_index(index("ix_edges_pool", "edges", &["pool_id"])).await?;

        manager
            .create_table(
                Table::create()
                    .table(name("certificate_authority"))
                    .col(ColumnDef::new(name("id")).integer().not_null().primary_key())
                    .col(text("certificate_pem"))
                    .col(text("key_pem"))
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Domains organizations claim and verify (see `crate::domains`).
struct Domains;

impl MigrationName for Domains {
    fn name(&self) -> &str {
        "m0004_domains"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Domains {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(owned_table(
                "domains",
                vec![
                    text("name"),
                    text("token"),
                    optional_text("verified_name"),
                    ColumnDef::new(name("verified_at")).timestamp_with_time_zone().null().to_owned(),
                ],
                vec![],
            ))
            .await?;
        manager.create_index(unique_index("ux_domains_name", "domains", &["organization_id", "name"])).await?;
        // At most one organization holds a verified domain; pending rows (NULL) never collide.
        manager.create_index(unique_index("ux_domains_verified_name", "domains", &["verified_name"])).await?;
        Ok(())
    }
}

/// ACME: the account (credentials sealed with the server key), orders (persisted so that a
/// restart resumes them instead of ordering again), and each application's certificate status.
/// No foreign keys to applications: these rows are the certificate manager's bookkeeping, read
/// only together with a live application, and must not stand in the way of deleting one.
struct AcmeCertificates;

impl MigrationName for AcmeCertificates {
    fn name(&self) -> &str {
        "m0005_acme_certificates"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for AcmeCertificates {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(name("acme_accounts"))
                    .col(ColumnDef::new(name("directory_url")).text().not_null().primary_key())
                    .col(text("credentials_sealed"))
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(name("acme_orders"))
                    .col(ColumnDef::new(name("id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(ColumnDef::new(name("application_id")).uuid().not_null())
                    .col(ColumnDef::new(name("device_id")).uuid().not_null())
                    .col(text("directory_url"))
                    .col(text("hostnames"))
                    .col(optional_text("order_url"))
                    .col(text("state"))
                    .col(text("csr_pem"))
                    .col(optional_text("error"))
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(name("updated_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_acme_orders_application", "acme_orders", &["application_id"])).await?;
        manager.create_index(index("ix_acme_orders_state", "acme_orders", &["state"])).await?;
        manager
            .create_table(
                Table::create()
                    .table(name("application_certificates"))
                    .col(ColumnDef::new(name("application_id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(text("status"))
                    .col(optional_text("message"))
                    .col(ColumnDef::new(name("not_after")).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(name("updated_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Access policies (issue 7): users' password hashes, the Ed25519 keys login assertions are
/// signed with, application keys (hashes only), short codes, and login sessions of the
/// server's login pages (hashes of the cookie secrets only).
struct Access;

impl MigrationName for Access {
    fn name(&self) -> &str {
        "m0006_access"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Access {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut password = optional_text("password_hash");
        manager.alter_table(Table::alter().table(name("users")).add_column(&mut password).to_owned()).await?;

        manager
            .create_table(
                Table::create()
                    .table(name("assertion_keys"))
                    .col(ColumnDef::new(name("kid")).text().not_null().primary_key())
                    .col(text("pkcs8"))
                    .col(ColumnDef::new(name("sealed")).boolean().not_null())
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(name("retired_at")).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(owned_table(
                "application_keys",
                vec![
                    ColumnDef::new(name("application_id")).uuid().not_null().to_owned(),
                    text("name"),
                    text("prefix"),
                    text("secret_sha256"),
                    ColumnDef::new(name("expires_at")).timestamp_with_time_zone().null().to_owned(),
                ],
                vec![foreign_key("application_keys", "application_id", "applications")],
            ))
            .await?;
        manager
            .create_index(unique_index("ux_application_keys_name", "application_keys", &["application_id", "name"]))
            .await?;
        manager
            .create_index(unique_index("ux_application_keys_secret", "application_keys", &["secret_sha256"]))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(name("short_codes"))
                    .col(ColumnDef::new(name("application_id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(text("code"))
                    .col(ColumnDef::new(name("version")).big_integer().not_null())
                    .col(ColumnDef::new(name("generated")).boolean().not_null())
                    .col(ColumnDef::new(name("expires_at")).timestamp_with_time_zone().null())
                    .foreign_key(&mut foreign_key("short_codes", "application_id", "applications"))
                    .foreign_key(&mut foreign_key("short_codes", "organization_id", "organizations"))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(name("login_sessions"))
                    .col(ColumnDef::new(name("secret_sha256")).text().not_null().primary_key())
                    .col(ColumnDef::new(name("user_id")).uuid().not_null())
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(name("expires_at")).timestamp_with_time_zone().not_null())
                    .foreign_key(&mut foreign_key("login_sessions", "user_id", "users"))
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_login_sessions_user", "login_sessions", &["user_id"])).await?;
        Ok(())
    }
}

/// Cloud placement (issue 9): operator organizations, the capacity a cloud host's agent
/// declared (all three set or none). The scheduler's choice of host is stored in a placement's
/// `device_id`, the column that already says where an application runs.
struct CloudHosts;

impl MigrationName for CloudHosts {
    fn name(&self) -> &str {
        "m0007_cloud_hosts"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for CloudHosts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut operator = ColumnDef::new(name("operator")).boolean().not_null().default(false).to_owned();
        manager.alter_table(Table::alter().table(name("organizations")).add_column(&mut operator).to_owned()).await?;
        // SQLite alters one column per statement.
        for column in ["cloud_vcpus", "cloud_memory_mib", "cloud_disk_mib"] {
            let mut capacity = ColumnDef::new(name(column)).big_integer().null().to_owned();
            manager.alter_table(Table::alter().table(name("devices")).add_column(&mut capacity).to_owned()).await?;
        }
        Ok(())
    }
}

/// Usage metering (issue 9): every record an agent reported, once per `(device_id, seq)`; the
/// per-hour sums the API answers from; and which applications each device was given, so a
/// record that arrives after its application moved away is still accepted (`db::usage`). No
/// foreign keys: usage is a billing record that outlives the application and the device.
struct Usage;

impl MigrationName for Usage {
    fn name(&self) -> &str {
        "m0008_usage"
    }
}

fn counter(column: &'static str) -> ColumnDef {
    ColumnDef::new(name(column)).big_integer().not_null().to_owned()
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Usage {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let counters = ["awake_ms", "requests", "bytes_in", "bytes_out", "wakes"];
        let mut records = Table::create()
            .table(name("usage_records"))
            .col(ColumnDef::new(name("device_id")).uuid().not_null())
            .col(ColumnDef::new(name("seq")).big_integer().not_null())
            .col(ColumnDef::new(name("organization_id")).uuid().not_null())
            .col(ColumnDef::new(name("application_id")).uuid().not_null())
            .col(ColumnDef::new(name("start_at")).timestamp_with_time_zone().not_null())
            .col(ColumnDef::new(name("end_at")).timestamp_with_time_zone().not_null())
            .col(ColumnDef::new(name("received_at")).timestamp_with_time_zone().not_null())
            .primary_key(Index::create().col(name("device_id")).col(name("seq")))
            .to_owned();
        let mut hours = Table::create()
            .table(name("usage_hours"))
            .col(ColumnDef::new(name("organization_id")).uuid().not_null())
            .col(ColumnDef::new(name("hour")).timestamp_with_time_zone().not_null())
            .col(ColumnDef::new(name("application_id")).uuid().not_null())
            .primary_key(Index::create().col(name("organization_id")).col(name("hour")).col(name("application_id")))
            .to_owned();
        for column in counters {
            records.col(counter(column));
            hours.col(counter(column));
        }
        manager.create_table(records).await?;
        manager.create_table(hours).await?;
        manager
            .create_table(
                Table::create()
                    .table(name("usage_placements"))
                    .col(ColumnDef::new(name("device_id")).uuid().not_null())
                    .col(ColumnDef::new(name("application_id")).uuid().not_null())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(ColumnDef::new(name("placed_until")).timestamp_with_time_zone().null())
                    .primary_key(Index::create().col(name("device_id")).col(name("application_id")))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Migrations (issue 10): one row per migration, its whole state machine as JSON (`state`,
/// see `crate::migrations`) beside the columns it is looked up by; and on each placement the
/// migration moving it, with the spec it moves to. No foreign keys: `db::migrations` deletes
/// an application's migrations with it.
struct Migrations;

impl MigrationName for Migrations {
    fn name(&self) -> &str {
        "m0009_migrations"
    }
}

// See `Initial` for why the lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migrations {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(name("migrations"))
                    .col(ColumnDef::new(name("id")).uuid().not_null().primary_key())
                    .col(ColumnDef::new(name("organization_id")).uuid().not_null())
                    .col(ColumnDef::new(name("application_id")).uuid().not_null())
                    .col(ColumnDef::new(name("source_device_id")).uuid().not_null())
                    .col(ColumnDef::new(name("target_device_id")).uuid().not_null())
                    .col(ColumnDef::new(name("extra_device_id")).uuid().null())
                    .col(text("phase"))
                    .col(ColumnDef::new(name("open")).boolean().not_null())
                    .col(text("state"))
                    .col(ColumnDef::new(name("created_at")).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(name("updated_at")).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager.create_index(index("ix_migrations_application", "migrations", &["application_id", "id"])).await?;
        manager.create_index(index("ix_migrations_extra_device", "migrations", &["extra_device_id"])).await?;
        manager.create_index(index("ix_migrations_open", "migrations", &["open"])).await?;
        // SQLite alters one column per statement.
        let columns = [ColumnDef::new(name("migration_id")).uuid().null().to_owned(), optional_text("migration_to")];
        for mut column in columns {
            manager.alter_table(Table::alter().table(name("placements")).add_column(&mut column).to_owned()).await?;
        }
        Ok(())
    }
}
