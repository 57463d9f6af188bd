//! What agents do to the database: enrollment, the device credential, the desired state of a
//! device, sessions (online/offline), acknowledged revisions, application statuses and events.
//!
//! Everything here except enrollment is status the platform writes, not a user's write: it
//! does not bump object revisions (so a user's `If-Match` is never invalidated by an agent
//! checking in), and each change is a single guarded statement that is safe to repeat and
//! never moves a value backwards.

use chrono::{DateTime, Utc};
use edgible::model::{
    ApplicationId, ApplicationPhase, ApplicationStatus, Device, DeviceId, DeviceState, Event, EventId, OrganizationId,
    Page, Revision,
};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    AccessMode, ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait,
    IsolationLevel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use uuid::Uuid;

use super::entities::{application, application_status, device, edge, event, placement};
use super::{Db, StoreError, enum_from_text, enum_text, now, page, revision};
use crate::desired::DesiredState;
use crate::secrets::NewSecret;

/// How many events each application (and each device, for events of no application) keeps.
pub const EVENTS_KEPT: u64 = 1000;

/// Why an enrollment token was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown enrollment token")]
    UnknownToken,
    #[error("enrollment token already used: it was exchanged at {at}")]
    AlreadyUsed { at: DateTime<Utc> },
    #[error("enrollment token expired at {at}")]
    Expired { at: DateTime<Utc> },
    #[error("another device or edge already has this public key")]
    KeyTaken,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DbErr> for EnrollError {
    fn from(error: DbErr) -> Self {
        EnrollError::Store(error.into())
    }
}

/// Refuses a token that was already exchanged or has expired (devices' and edges' alike).
pub(super) fn check_token_usable(
    used_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), EnrollError> {
    if let Some(at) = used_at {
        return Err(EnrollError::AlreadyUsed { at });
    }
    match expires_at {
        Some(at) if at <= now => Err(EnrollError::Expired { at }),
        _ => Ok(()),
    }
}

/// Whether another device or edge than the one enrolling (`enrolling`, its row id) already
/// holds `public_key`: devices and edges share one WireGuard key space.
pub(super) async fn public_key_taken(
    txn: &impl ConnectionTrait,
    public_key: &str,
    enrolling: Uuid,
) -> Result<bool, DbErr> {
    let devices = device::Entity::find()
        .filter(device::Column::PublicKey.eq(public_key))
        .filter(device::Column::Id.ne(enrolling))
        .count(txn)
        .await?;
    let edges = edge::Entity::find()
        .filter(edge::Column::PublicKey.eq(public_key))
        .filter(edge::Column::Id.ne(enrolling))
        .count(txn)
        .await?;
    Ok(devices + edges > 0)
}

/// One application's status as an agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub application_id: ApplicationId,
    pub phase: ApplicationPhase,
    pub message: Option<String>,
    /// The application revision the status describes.
    pub revision: Revision,
}

/// Which events to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub application_id: Option<ApplicationId>,
    pub device_id: Option<DeviceId>,
    /// At most this many (the API bounds it to 1-1000).
    pub limit: u64,
    /// Only events older than this one (the previous page's cursor).
    pub before: Option<Uuid>,
}

fn to_event(row: event::Model) -> Result<Event, StoreError> {
    Ok(Event {
        id: EventId(row.id),
        organization_id: OrganizationId(row.organization_id),
        device_id: DeviceId(row.device_id),
        application_id: row.application_id.map(ApplicationId),
        at: row.at,
        message: row.message,
    })
}

fn revision_column(value: Revision) -> i64 {
    // Revisions come from the server's own counter or are checked against it; they stay far
    // below i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Db {
    /// Exchanges an enrollment token (by its hash) for a device credential: records the
    /// public key and the credential's hash and marks the token used.
    pub async fn enroll(
        &self,
        token_sha256: &str,
        public_key: &str,
        credential: &NewSecret,
    ) -> Result<Device, EnrollError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = device::Entity::find()
                .filter(device::Column::EnrollmentTokenSha256.eq(token_sha256))
                .one(&write.txn)
                .await?
                .ok_or(EnrollError::UnknownToken)?;
            check_token_usable(row.enrollment_used_at, row.enrollment_expires_at, write.now)?;
            if public_key_taken(&write.txn, public_key, row.id).await? {
                return Err(EnrollError::KeyTaken);
            }
            // The pool's edges add the device to their peers.
            write.touch_pool_edges(edgible::model::DevicePoolId(row.pool_id)).await?;
            let mut active: device::ActiveModel = row.into();
            active.public_key = Set(Some(public_key.to_owned()));
            active.credential_sha256 = Set(Some(credential.sha256.clone()));
            active.enrollment_used_at = Set(Some(write.now));
            active.state = Set(enum_text(&DeviceState::Offline)?);
            Ok(super::devices::to_model(active.update(&write.txn).await?)?)
        }
        .await;
        write.finish(result).await
    }

    /// The device a credential (by its hash) belongs to.
    pub async fn device_by_credential(&self, credential_sha256: &str) -> Result<Option<Device>, StoreError> {
        let row = device::Entity::find()
            .filter(device::Column::CredentialSha256.eq(credential_sha256))
            .one(&self.conn)
            .await?;
        row.map(super::devices::to_model).transpose()
    }

    /// The applications placed on a device and the device's desired revision, read from one
    /// snapshot of the database; `None` if the device no longer exists.
    pub async fn desired_state(&self, device_id: DeviceId) -> Result<Option<DesiredState>, StoreError> {
        let txn = match self.conn.get_database_backend() {
            DbBackend::Postgres => {
                self.conn.begin_with_config(Some(IsolationLevel::RepeatableRead), Some(AccessMode::ReadOnly)).await?
            }
            // A SQLite transaction reads one snapshot from its first read on.
            _ => self.conn.begin().await?,
        };
        let Some(row) = device::Entity::find_by_id(device_id.0).one(&txn).await? else {
            txn.commit().await?;
            return Ok(None);
        };
        let mut placed: Vec<Uuid> = placement::Entity::find()
            .select_only()
            .column(placement::Column::ApplicationId)
            .filter(placement::Column::DeviceId.eq(device_id.0))
            .into_tuple()
            .all(&txn)
            .await?;
        // A migration's target runs the application from its restore on, a draining source
        // until the drain ends (`db::migrations`).
        placed.extend(super::migrations::extra_placed(&txn, device_id).await?);
        let rows = if placed.is_empty() {
            Vec::new()
        } else {
            application::Entity::find()
                .filter(application::Column::Id.is_in(placed))
                .order_by_asc(application::Column::Id)
                .all(&txn)
                .await?
        };
        txn.commit().await?;
        let mut applications = rows.into_iter().map(super::applications::to_model).collect::<Result<Vec<_>, _>>()?;
        // Devices get the short code only as a digest (the `access` message), never in clear.
        for application in &mut applications {
            if let Some(short_code) = &mut application.spec.access.short_code {
                short_code.code = None;
            }
        }
        Ok(Some(DesiredState { revision: revision(row.desired_revision)?, applications }))
    }

    /// Marks the device online for session `session_id`; false if the device is gone.
    pub async fn agent_connected(&self, device_id: DeviceId, session_id: Uuid) -> Result<bool, StoreError> {
        let update = device::Entity::update_many()
            .col_expr(device::Column::State, Expr::value(enum_text(&DeviceState::Online)?))
            .col_expr(device::Column::SessionId, Expr::value(Some(session_id)))
            .col_expr(device::Column::LastSeenAt, Expr::value(now()))
            .filter(device::Column::Id.eq(device_id.0));
        self.change_online_state(device_id, update).await
    }

    /// Marks the device offline, unless a newer session has taken it over meanwhile.
    pub async fn agent_disconnected(&self, device_id: DeviceId, session_id: Uuid) -> Result<(), StoreError> {
        let update = device::Entity::update_many()
            .col_expr(device::Column::State, Expr::value(enum_text(&DeviceState::Offline)?))
            .col_expr(device::Column::SessionId, Expr::value(None::<Uuid>))
            .col_expr(device::Column::LastSeenAt, Expr::value(now()))
            .filter(device::Column::Id.eq(device_id.0))
            .filter(device::Column::SessionId.eq(session_id));
        self.change_online_state(device_id, update).await?;
        Ok(())
    }

    /// Runs a guarded change of a device's online state; answers whether it applied. A change
    /// that applied also moves the revision counter on (no object's revision changes), so the
    /// configuration the pool's edges are sent next, whose routes carry the online state,
    /// has a newer revision than any sent before; the edges are woken after commit.
    async fn change_online_state(
        &self,
        device_id: DeviceId,
        update: sea_orm::UpdateMany<device::Entity>,
    ) -> Result<bool, StoreError> {
        let guard = self.status_write_lock().await;
        let txn = self.conn.begin().await?;
        // The counter first, like every write transaction: on PostgreSQL, taking its row lock
        // before the device's keeps one lock order, so this cannot deadlock with a writer.
        txn.execute_unprepared("UPDATE revision_counter SET value = value + 1 WHERE id = 1").await?;
        let updated = update.exec(&txn).await?;
        if updated.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        let pool: Option<Uuid> = device::Entity::find_by_id(device_id.0)
            .select_only()
            .column(device::Column::PoolId)
            .into_tuple()
            .one(&txn)
            .await?;
        let edges = match pool {
            Some(pool) => super::edges::edges_of_pool(&txn, edgible::model::DevicePoolId(pool)).await?,
            None => Vec::new(),
        };
        txn.commit().await?;
        drop(guard);
        if let Some(listener) = self.listener()
            && !edges.is_empty()
        {
            listener(&super::Woken { devices: Vec::new(), edges });
        }
        Ok(true)
    }

    /// Records that the session's agent was heard from now.
    pub async fn agent_seen(&self, device_id: DeviceId, session_id: Uuid) -> Result<(), StoreError> {
        let _guard = self.status_write_lock().await;
        device::Entity::update_many()
            .col_expr(device::Column::LastSeenAt, Expr::value(now()))
            .filter(device::Column::Id.eq(device_id.0))
            .filter(device::Column::SessionId.eq(session_id))
            .exec(&self.conn)
            .await?;
        Ok(())
    }

    /// Marks every device and edge offline. Run at startup by the only server replica, when no session
    /// can be open yet; with several replicas each would own and clean up its own sessions.
    pub async fn mark_all_offline(&self) -> Result<u64, StoreError> {
        let _guard = self.status_write_lock().await;
        let updated = device::Entity::update_many()
            .col_expr(device::Column::State, Expr::value(enum_text(&DeviceState::Offline)?))
            .col_expr(device::Column::SessionId, Expr::value(None::<Uuid>))
            .filter(device::Column::State.eq(enum_text(&DeviceState::Online)?))
            .exec(&self.conn)
            .await?;
        let edges = edge::Entity::update_many()
            .col_expr(edge::Column::State, Expr::value(enum_text(&DeviceState::Offline)?))
            .col_expr(edge::Column::SessionId, Expr::value(None::<Uuid>))
            .filter(edge::Column::State.eq(enum_text(&DeviceState::Online)?))
            .exec(&self.conn)
            .await?;
        Ok(updated.rows_affected + edges.rows_affected)
    }

    /// Stores `revision` as the device's applied revision if it moves it forward and is not
    /// beyond the desired revision; answers whether it did.
    pub async fn record_applied(&self, device_id: DeviceId, applied: Revision) -> Result<bool, StoreError> {
        let applied = revision_column(applied);
        let _guard = self.status_write_lock().await;
        let updated = device::Entity::update_many()
            .col_expr(device::Column::AppliedRevision, Expr::value(Some(applied)))
            .col_expr(device::Column::LastSeenAt, Expr::value(now()))
            .filter(device::Column::Id.eq(device_id.0))
            .filter(device::Column::DesiredRevision.gte(applied))
            .filter(
                Condition::any()
                    .add(device::Column::AppliedRevision.is_null())
                    .add(device::Column::AppliedRevision.lt(applied)),
            )
            .exec(&self.conn)
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// Stores the statuses of the applications that are placed on `device`; reports about
    /// any other application are ignored. Answers how many were stored.
    pub async fn record_statuses(&self, device: &Device, reports: &[StatusReport]) -> Result<usize, StoreError> {
        if reports.is_empty() {
            return Ok(0);
        }
        // With each application's organization: a cloud host runs other organizations' ones.
        let placed: Vec<(Uuid, Uuid)> = placement::Entity::find()
            .select_only()
            .column(placement::Column::ApplicationId)
            .column(placement::Column::OrganizationId)
            .filter(placement::Column::DeviceId.eq(device.id.0))
            .filter(placement::Column::ApplicationId.is_in(reports.iter().map(|report| report.application_id.0)))
            .into_tuple()
            .all(&self.conn)
            .await?;
        let now = now();
        let _guard = self.status_write_lock().await;
        let mut stored = 0;
        for report in reports {
            let Some(&(_, organization_id)) = placed.iter().find(|(id, _)| *id == report.application_id.0) else {
                continue;
            };
            let row = application_status::ActiveModel {
                application_id: Set(report.application_id.0),
                organization_id: Set(organization_id),
                device_id: Set(device.id.0),
                phase: Set(enum_text(&report.phase)?),
                message: Set(report.message.clone()),
                revision: Set(revision_column(report.revision)),
                reported_at: Set(now),
            };
            application_status::Entity::insert(row)
                .on_conflict(
                    OnConflict::column(application_status::Column::ApplicationId)
                        .update_columns([
                            application_status::Column::DeviceId,
                            application_status::Column::Phase,
                            application_status::Column::Message,
                            application_status::Column::Revision,
                            application_status::Column::ReportedAt,
                        ])
                        .to_owned(),
                )
                .exec(&self.conn)
                .await?;
            stored += 1;
        }
        Ok(stored)
    }

    /// The status of an application: what its current device last reported, or `pending`.
    pub async fn application_status(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
    ) -> Result<ApplicationStatus, StoreError> {
        let application = self.application(organization_id, id).await?;
        let device_id = super::placements::placed_device(&self.conn, id).await?;
        let row = application_status::Entity::find_by_id(id.0).one(&self.conn).await?;
        let mut status = ApplicationStatus {
            application_id: id,
            application_revision: application.revision,
            device_id,
            phase: ApplicationPhase::Pending,
            message: None,
            revision: None,
            reported_at: None,
            certificate_expires_at: None,
            certificate_status: None,
        };
        if let Some(certificate) = self.certificate_summary(id).await? {
            status.certificate_expires_at = certificate.expires_at;
            status.certificate_status = Some(certificate.status);
        }
        if let Some(row) = row.filter(|row| Some(DeviceId(row.device_id)) == device_id) {
            status.phase = enum_from_text("application phase", &row.phase)?;
            status.message = row.message;
            status.revision = Some(revision(row.revision)?);
            status.reported_at = Some(row.reported_at);
        }
        Ok(status)
    }

    /// Whether the application exists in the organization.
    pub async fn application_exists(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
    ) -> Result<bool, StoreError> {
        let count = application::Entity::find_by_id(id.0)
            .filter(application::Column::OrganizationId.eq(organization_id.0))
            .count(&self.conn)
            .await?;
        Ok(count > 0)
    }

    /// Stores an event of `device` and drops the oldest beyond [`EVENTS_KEPT`] of the same
    /// application (or device, for events of no application). An event naming an application
    /// neither of the device's organization nor placed on the device (a cloud host runs other
    /// organizations' applications) is ignored; answers whether it was stored. An
    /// application's event belongs to the application's organization.
    pub async fn record_event(
        &self,
        device: &Device,
        application_id: Option<ApplicationId>,
        at: DateTime<Utc>,
        message: &str,
    ) -> Result<bool, StoreError> {
        let mut organization_id = device.organization_id;
        if let Some(application_id) = application_id
            && !self.application_exists(device.organization_id, application_id).await?
        {
            let guest: Option<Uuid> = placement::Entity::find()
                .select_only()
                .column(placement::Column::OrganizationId)
                .filter(placement::Column::ApplicationId.eq(application_id.0))
                .filter(placement::Column::DeviceId.eq(device.id.0))
                .into_tuple()
                .one(&self.conn)
                .await?;
            let Some(guest) = guest else {
                return Ok(false);
            };
            organization_id = OrganizationId(guest);
        }
        self.insert_event(organization_id, device.id, application_id, at, message).await
    }

    /// Stores an event and drops the oldest beyond [`EVENTS_KEPT`] of its scope.
    pub(super) async fn insert_event(
        &self,
        organization_id: OrganizationId,
        device_id: DeviceId,
        application_id: Option<ApplicationId>,
        at: DateTime<Utc>,
        message: &str,
    ) -> Result<bool, StoreError> {
        let _guard = self.status_write_lock().await;
        event::ActiveModel {
            id: Set(EventId::new().0),
            organization_id: Set(organization_id.0),
            device_id: Set(device_id.0),
            application_id: Set(application_id.map(|id| id.0)),
            at: Set(at),
            message: Set(message.to_owned()),
        }
        .insert(&self.conn)
        .await?;
        let scope = match application_id {
            Some(application_id) => Condition::all().add(event::Column::ApplicationId.eq(application_id.0)),
            None => Condition::all()
                .add(event::Column::DeviceId.eq(device_id.0))
                .add(event::Column::ApplicationId.is_null()),
        };
        let oldest_kept: Option<Uuid> = event::Entity::find()
            .select_only()
            .column(event::Column::Id)
            .filter(scope.clone())
            .order_by_desc(event::Column::Id)
            .offset(EVENTS_KEPT - 1)
            .limit(1)
            .into_tuple()
            .one(&self.conn)
            .await?;
        if let Some(oldest_kept) = oldest_kept {
            event::Entity::delete_many()
                .filter(scope)
                .filter(event::Column::Id.lt(oldest_kept))
                .exec(&self.conn)
                .await?;
        }
        Ok(true)
    }

    /// Events of the organization, newest first.
    pub async fn list_events(
        &self,
        organization_id: OrganizationId,
        query: &EventQuery,
    ) -> Result<Page<Event>, StoreError> {
        let mut select = event::Entity::find().filter(event::Column::OrganizationId.eq(organization_id.0));
        if let Some(application_id) = query.application_id {
            select = select.filter(event::Column::ApplicationId.eq(application_id.0));
        }
        if let Some(device_id) = query.device_id {
            select = select.filter(event::Column::DeviceId.eq(device_id.0));
        }
        if let Some(before) = query.before {
            select = select.filter(event::Column::Id.lt(before));
        }
        let rows = select.order_by_desc(event::Column::Id).limit(query.limit + 1).all(&self.conn).await?;
        page(rows, query.limit, |row| row.id, to_event)
    }
}
