//! Migrations (issue 10): the stored state machines of `crate::migrations`, the synchronous
//! checks that start one, and the placement and desired-state changes their transitions make.
//!
//! A row keeps the whole [`MigrationState`] as JSON in `state`, and beside it the columns it is
//! looked up by: the application, the two devices, `extra_device_id` (the device whose desired
//! state has the application besides its placement's host: the target between restore and
//! cutover, a draining source after it), the phase and whether anything is left to do
//! (`open`). A transition saves the new state and applies its placement changes in one write,
//! so a restart finds either the old state with the old placement or the new with the new.
//!
//! The placement keeps describing where the application runs (its host) until cutover; while a
//! migration runs it also names the migration and the spec it moves to, which is the spec the
//! API shows (`placements::to_model`).

use edgible::model::{
    Application, ApplicationId, DeviceId, DeviceState, Migration, MigrationId, OrganizationId, Placement,
    PlacementSpec, Revision,
};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use uuid::Uuid;

use super::entities::{device, placement};
use super::{Db, StoreError, Write, check_revision, enum_text, parse_json, to_json};
use crate::migrations::{Action, MigrationState, NewMigration};

/// The `migrations` table.
pub(super) mod migration {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "migrations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub organization_id: Uuid,
        pub application_id: Uuid,
        pub source_device_id: Uuid,
        pub target_device_id: Uuid,
        pub extra_device_id: Option<Uuid>,
        pub phase: String,
        pub open: bool,
        /// The `crate::migrations::MigrationState`, JSON.
        pub state: String,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

fn state_of(row: migration::Model) -> Result<MigrationState, StoreError> {
    parse_json("migration state", &row.state)
}

/// The applications open migrations run on `device` besides their placements' hosts.
pub(super) async fn extra_placed(conn: &impl ConnectionTrait, device_id: DeviceId) -> Result<Vec<Uuid>, StoreError> {
    let rows = migration::Entity::find()
        .filter(migration::Column::ExtraDeviceId.eq(device_id.0))
        .filter(migration::Column::Open.eq(true))
        .all(conn)
        .await?;
    Ok(rows.into_iter().map(|row| row.application_id).collect())
}

/// The devices that run `application_id` because of a migration (to wake when it changes).
pub(super) async fn extra_devices(
    conn: &impl ConnectionTrait,
    application_id: ApplicationId,
) -> Result<Vec<DeviceId>, StoreError> {
    let rows = migration::Entity::find()
        .filter(migration::Column::ApplicationId.eq(application_id.0))
        .filter(migration::Column::ExtraDeviceId.is_not_null())
        .all(conn)
        .await?;
    Ok(rows.into_iter().filter_map(|row| row.extra_device_id.map(DeviceId)).collect())
}

/// Refuses to delete an application a migration is moving, and deletes the records of its
/// finished ones.
pub(super) async fn delete_of_application(write: &Write, application_id: ApplicationId) -> Result<(), StoreError> {
    let rows =
        migration::Entity::find().filter(migration::Column::ApplicationId.eq(application_id.0)).all(&write.txn).await?;
    for row in &rows {
        let state = state_of(row.clone())?;
        if !state.phase.is_final() {
            return Err(StoreError::conflict(
                "migration_id",
                format!("migration {} of the application is running; wait for it to end", state.id),
            ));
        }
    }
    migration::Entity::delete_many()
        .filter(migration::Column::ApplicationId.eq(application_id.0))
        .exec(&write.txn)
        .await?;
    Ok(())
}

/// Deletes the migrations of an organization that goes away; answers the devices that ran
/// one of its applications for a migration.
pub(super) async fn delete_of_organization(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
) -> Result<Vec<DeviceId>, StoreError> {
    let rows =
        migration::Entity::find().filter(migration::Column::OrganizationId.eq(organization_id.0)).all(conn).await?;
    migration::Entity::delete_many().filter(migration::Column::OrganizationId.eq(organization_id.0)).exec(conn).await?;
    Ok(rows.into_iter().filter_map(|row| row.extra_device_id.map(DeviceId)).collect())
}

fn row_of(state: &MigrationState) -> Result<migration::ActiveModel, StoreError> {
    Ok(migration::ActiveModel {
        id: Set(state.id.0),
        organization_id: Set(state.organization_id.0),
        application_id: Set(state.application_id.0),
        source_device_id: Set(state.source.0),
        target_device_id: Set(state.target.0),
        extra_device_id: Set(state.extra_device().map(|device| device.0)),
        phase: Set(state.phase.as_str().to_owned()),
        open: Set(state.is_open()),
        state: Set(to_json(state)?),
        created_at: Set(state.created_at),
        updated_at: Set(state.updated_at),
    })
}

impl Db {
    /// Whether moving the application of `current` to `to` through `PUT /v1/placements/{id}`
    /// goes through a migration, or is a plain move of the placement. An application with
    /// volumes always migrates: its data must follow it, or the move is refused. A stateless
    /// one migrates when that buys something, a handover without downtime, which needs its
    /// current device and a target device online; otherwise the placement just moves and the
    /// target starts the application whenever it connects (as before migrations existed, so
    /// placements can be written before the devices are enrolled).
    pub async fn move_needs_migration(
        &self,
        organization_id: OrganizationId,
        current: &Placement,
        to: &PlacementSpec,
    ) -> Result<bool, StoreError> {
        let Some(source) = current.host else { return Ok(false) };
        let application = self.application(organization_id, current.spec.application_id()).await?;
        if !application.spec.storage.is_empty() {
            return Ok(true);
        }
        let online = |device_id: DeviceId| async move {
            let row = device::Entity::find_by_id(device_id.0)
                .filter(device::Column::State.eq(enum_text(&DeviceState::Online)?))
                .one(&self.conn)
                .await?;
            Ok::<bool, StoreError>(row.is_some())
        };
        if !online(source).await? {
            return Ok(false);
        }
        match to {
            PlacementSpec::ServingDevice { device_id, .. } => online(*device_id).await,
            // The scheduler only ever picks an online host.
            PlacementSpec::Cloud { .. } => Ok(true),
        }
    }

    /// Checks a migration of `application_id` to `to` and stores it, with the state `begin`
    /// makes of it; the placement names the migration and shows `to` as its spec. Refused
    /// with a conflict, storing nothing, when another migration of the application runs, it is
    /// not placed, a volume is not movable, the target is not a device of the organization
    /// (or no cloud host fits), is the source, or is offline. `expected` is the placement's
    /// revision the caller saw (`If-Match` of `PUT /v1/placements/{id}`).
    pub async fn create_migration(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        to: &PlacementSpec,
        expected: Option<Revision>,
        begin: impl FnOnce(NewMigration, &Application) -> (MigrationState, Vec<Action>),
    ) -> Result<(MigrationState, Vec<Action>, Placement), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let application = super::applications::to_model(
                super::entities::application::Entity::find_by_id(application_id.0)
                    .filter(super::entities::application::Column::OrganizationId.eq(organization_id.0))
                    .one(&write.txn)
                    .await?
                    .ok_or(StoreError::NotFound)?,
            )?;
            if to.application_id() != application_id {
                return Err(StoreError::invalid(
                    "to.application_id",
                    format!("must be the application migrated ({application_id}), not {}", to.application_id()),
                ));
            }
            let row = placement::Entity::find()
                .filter(placement::Column::ApplicationId.eq(application_id.0))
                .filter(placement::Column::OrganizationId.eq(organization_id.0))
                .one(&write.txn)
                .await?
                .ok_or_else(|| {
                    StoreError::conflict("application_id", "the application is not placed; create a placement instead")
                })?;
            check_revision(expected, row.revision)?;
            super::placements::refuse_while_migrating(&row)?;
            let current = super::placements::to_model(row.clone())?;
            let source = current.host.ok_or_else(|| {
                StoreError::conflict("application_id", "the application runs nowhere yet; nothing to migrate")
            })?;
            if let Some(volume) = application.spec.storage.iter().find(|volume| !volume.movable) {
                return Err(StoreError::conflict(
                    "storage",
                    format!("volume {} is not movable, so the application cannot migrate", volume.name),
                ));
            }
            let target = match to {
                PlacementSpec::ServingDevice { device_id, .. } => {
                    let found = device::Entity::find_by_id(device_id.0)
                        .filter(device::Column::OrganizationId.eq(organization_id.0))
                        .one(&write.txn)
                        .await?;
                    if found.is_none() {
                        return Err(StoreError::conflict(
                            "device_id",
                            format!("no device {device_id} in the organization"),
                        ));
                    }
                    *device_id
                }
                PlacementSpec::Cloud { .. } => super::cloud::choose_host(&write.txn, to, &application.spec).await?,
            };
            if target == source {
                return Err(StoreError::conflict(
                    "device_id",
                    format!("the application already runs on device {target}; nothing to migrate"),
                ));
            }
            let online = device::Entity::find_by_id(target.0)
                .filter(device::Column::State.eq(enum_text(&DeviceState::Online)?))
                .one(&write.txn)
                .await?;
            if online.is_none() {
                return Err(StoreError::conflict(
                    "device_id",
                    format!("device {target} is offline; a migration needs its target online"),
                ));
            }
            let new = NewMigration {
                id: MigrationId::new(),
                placement_id: current.id,
                source,
                target,
                from: current.spec.clone(),
                to: to.clone(),
            };
            let (state, actions) = begin(new, &for_agents(application));
            // A release still owed to the target by an earlier migration would delete what
            // this one restores there.
            let earlier = migration::Entity::find()
                .filter(migration::Column::ApplicationId.eq(application_id.0))
                .filter(migration::Column::Open.eq(true))
                .all(&write.txn)
                .await?;
            for row in earlier {
                let mut earlier = state_of(row)?;
                if earlier.cancel_release(target) {
                    earlier.updated_at = write.now;
                    row_of(&earlier)?.update(&write.txn).await?;
                }
            }
            row_of(&state)?.insert(&write.txn).await?;
            let mut active: placement::ActiveModel = row.into();
            active.migration_id = Set(Some(state.id.0));
            active.migration_to = Set(Some(to_json(to)?));
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            let placement = super::placements::to_model(active.update(&write.txn).await?)?;
            Ok((state, actions, placement))
        }
        .await;
        write.finish(result).await
    }

    /// Stores a migration's new state and applies the placement and desired-state changes of
    /// the transition's `actions`, in one write.
    pub async fn save_migration(&self, state: &MigrationState, actions: &[Action]) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            row_of(state)?.update(&write.txn).await?;
            let ours = || {
                Condition::all()
                    .add(placement::Column::Id.eq(state.placement_id.0))
                    .add(placement::Column::MigrationId.eq(state.id.0))
            };
            for action in actions {
                match action {
                    Action::DesiredChanged(devices) => write.change_desired(devices).await?,
                    Action::MoveRoute => {
                        let (strategy, device_id, pool_id, region) =
                            super::placements::columns(&state.to, state.target);
                        let moved = placement::Entity::update_many()
                            .col_expr(placement::Column::Strategy, Expr::value(strategy))
                            .col_expr(placement::Column::DeviceId, Expr::value(device_id))
                            .col_expr(placement::Column::PoolId, Expr::value(pool_id))
                            .col_expr(placement::Column::Region, Expr::value(region))
                            .col_expr(placement::Column::MigrationTo, Expr::value(None::<String>))
                            .col_expr(placement::Column::Revision, Expr::value(write.revision_column()))
                            .col_expr(placement::Column::UpdatedAt, Expr::value(write.now))
                            .filter(ours())
                            .exec(&write.txn)
                            .await?;
                        if moved.rows_affected > 0 {
                            write.change_desired(&[state.source, state.target]).await?;
                            super::placements::forget_status(&write.txn, state.application_id).await?;
                        }
                    }
                    Action::RevertPlacement | Action::EndPlacementMigration => {
                        placement::Entity::update_many()
                            .col_expr(placement::Column::MigrationId, Expr::value(None::<Uuid>))
                            .col_expr(placement::Column::MigrationTo, Expr::value(None::<String>))
                            .col_expr(placement::Column::Revision, Expr::value(write.revision_column()))
                            .col_expr(placement::Column::UpdatedAt, Expr::value(write.now))
                            .filter(ours())
                            .exec(&write.txn)
                            .await?;
                    }
                    Action::Send { .. } | Action::Event { .. } | Action::DeleteBlobs => {}
                }
            }
            Ok(())
        }
        .await;
        write.finish(result).await
    }

    /// A migration's state, in any organization (for the driver and the agents' endpoints).
    pub async fn migration_state(&self, id: MigrationId) -> Result<Option<MigrationState>, StoreError> {
        migration::Entity::find_by_id(id.0).one(&self.conn).await?.map(state_of).transpose()
    }

    /// Every migration with something left to do, oldest first.
    pub async fn open_migrations(&self) -> Result<Vec<MigrationState>, StoreError> {
        let rows = migration::Entity::find()
            .filter(migration::Column::Open.eq(true))
            .order_by_asc(migration::Column::Id)
            .all(&self.conn)
            .await?;
        rows.into_iter().map(state_of).collect()
    }

    /// The open migrations `device` is the source or the target of.
    pub async fn open_migrations_of_device(&self, device_id: DeviceId) -> Result<Vec<MigrationState>, StoreError> {
        let rows = migration::Entity::find()
            .filter(migration::Column::Open.eq(true))
            .filter(
                Condition::any()
                    .add(migration::Column::SourceDeviceId.eq(device_id.0))
                    .add(migration::Column::TargetDeviceId.eq(device_id.0)),
            )
            .order_by_asc(migration::Column::Id)
            .all(&self.conn)
            .await?;
        rows.into_iter().map(state_of).collect()
    }

    /// The migrations waiting for `device`, their target, to report the application running.
    pub async fn migrations_awaiting_health(&self, device_id: DeviceId) -> Result<Vec<MigrationState>, StoreError> {
        let rows = migration::Entity::find()
            .filter(migration::Column::ExtraDeviceId.eq(device_id.0))
            .filter(migration::Column::TargetDeviceId.eq(device_id.0))
            .filter(migration::Column::Phase.eq(edgible::model::MigrationPhase::Restore.as_str()))
            .all(&self.conn)
            .await?;
        rows.into_iter().map(state_of).collect()
    }

    /// One migration of the organization.
    pub async fn migration(&self, organization_id: OrganizationId, id: MigrationId) -> Result<Migration, StoreError> {
        let row = migration::Entity::find_by_id(id.0)
            .filter(migration::Column::OrganizationId.eq(organization_id.0))
            .one(&self.conn)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(state_of(row)?.to_model())
    }

    /// The application's migrations, newest first; not found if the application is not the
    /// organization's.
    pub async fn application_migrations(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
    ) -> Result<Vec<Migration>, StoreError> {
        if !self.application_exists(organization_id, application_id).await? {
            return Err(StoreError::NotFound);
        }
        let rows = migration::Entity::find()
            .filter(migration::Column::ApplicationId.eq(application_id.0))
            .filter(migration::Column::OrganizationId.eq(organization_id.0))
            .order_by_desc(migration::Column::Id)
            .all(&self.conn)
            .await?;
        rows.into_iter().map(|row| Ok(state_of(row)?.to_model())).collect()
    }

    /// The application as the driver hands it to agents, in any organization; `None` once
    /// it was deleted. Devices get the short code only as a digest, never in clear.
    pub async fn migrating_application(&self, id: ApplicationId) -> Result<Option<Application>, StoreError> {
        let row = super::entities::application::Entity::find_by_id(id.0).one(&self.conn).await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(for_agents(super::applications::to_model(row)?)))
    }
}

/// The application as agents are sent it: the short code only as a digest, never in clear.
fn for_agents(mut application: Application) -> Application {
    if let Some(short_code) = &mut application.spec.access.short_code {
        short_code.code = None;
    }
    application
}
