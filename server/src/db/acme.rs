//! What the certificate manager keeps: the ACME account per directory (sealed credentials),
//! orders (so a restart resumes them), and each application's certificate status.
//!
//! All of it is platform status like what agents report: no object revision changes, each
//! write one statement (the account's is insert-or-keep, so two servers starting at once end
//! up using the same stored account).

use chrono::{DateTime, Utc};
use edgible::model::{ApplicationId, DeviceId, Hostname, OrganizationId};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use uuid::Uuid;

use super::entities::{acme_account, acme_order, application_certificate};
use super::{Db, StoreError, now, parse_json, to_json};
use crate::certs::orders::OrderState;

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOrder {
    pub id: Uuid,
    pub organization_id: OrganizationId,
    pub application_id: ApplicationId,
    pub device_id: DeviceId,
    pub hostnames: Vec<Hostname>,
    pub order_url: Option<String>,
    pub state: OrderState,
    pub csr_pem: String,
    pub error: Option<String>,
}

/// The status of an application's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateState {
    /// Issued; served until `not_after`.
    Valid { not_after: DateTime<Utc> },
    /// An order is running.
    Pending,
    /// The last attempt failed, with the reason.
    Failed { message: String },
}

/// What `GET /v1/applications/{id}/status` shows of the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// `valid`, `pending` or `failed: <message>`.
    pub status: String,
    /// When the last issued certificate expires, if one was issued.
    pub expires_at: Option<DateTime<Utc>>,
}

fn to_order(row: acme_order::Model) -> Result<StoredOrder, StoreError> {
    Ok(StoredOrder {
        id: row.id,
        organization_id: OrganizationId(row.organization_id),
        application_id: ApplicationId(row.application_id),
        device_id: DeviceId(row.device_id),
        hostnames: parse_json("acme order hostnames", &row.hostnames)?,
        order_url: row.order_url,
        state: OrderState::parse(&row.state)
            .ok_or_else(|| StoreError::Corrupt(format!("acme order state {:?}", row.state)))?,
        csr_pem: row.csr_pem,
        error: row.error,
    })
}

impl Db {
    /// The sealed credentials of the account at `directory_url`, if one was stored.
    pub async fn acme_account(&self, directory_url: &str) -> Result<Option<String>, StoreError> {
        let row = acme_account::Entity::find_by_id(directory_url.to_owned()).one(&self.conn).await?;
        Ok(row.map(|row| row.credentials_sealed))
    }

    /// Stores an account's sealed credentials unless one is stored already; answers the
    /// stored ones (the first writer's, if two raced).
    pub async fn store_acme_account(&self, directory_url: &str, sealed: &str) -> Result<String, StoreError> {
        let row = acme_account::ActiveModel {
            directory_url: Set(directory_url.to_owned()),
            credentials_sealed: Set(sealed.to_owned()),
            created_at: Set(now()),
        };
        acme_account::Entity::insert(row)
            .on_conflict(OnConflict::column(acme_account::Column::DirectoryUrl).do_nothing().to_owned())
            .exec_without_returning(&self.conn)
            .await?;
        self.acme_account(directory_url)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the acme account row vanished".into()))
    }

    /// Records a new order (state `new`, not yet created at the CA).
    pub async fn create_acme_order(
        &self,
        directory_url: &str,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        device_id: DeviceId,
        hostnames: &[Hostname],
        csr_pem: &str,
    ) -> Result<StoredOrder, StoreError> {
        let now = now();
        let row = acme_order::ActiveModel {
            id: Set(Uuid::now_v7()),
            organization_id: Set(organization_id.0),
            application_id: Set(application_id.0),
            device_id: Set(device_id.0),
            directory_url: Set(directory_url.to_owned()),
            hostnames: Set(to_json(&hostnames)?),
            order_url: Set(None),
            state: Set(OrderState::New.as_str().to_owned()),
            csr_pem: Set(csr_pem.to_owned()),
            error: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(&self.conn)
        .await?;
        to_order(row)
    }

    /// Moves an order to `state`, recording its URL at the CA once known and why it failed.
    pub async fn update_acme_order(
        &self,
        id: Uuid,
        state: OrderState,
        order_url: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut update = acme_order::Entity::update_many()
            .col_expr(acme_order::Column::State, state.as_str().into())
            .col_expr(acme_order::Column::UpdatedAt, now().into())
            .col_expr(acme_order::Column::Error, error.map(str::to_owned).into());
        if let Some(url) = order_url {
            update = update.col_expr(acme_order::Column::OrderUrl, url.to_owned().into());
        }
        update.filter(acme_order::Column::Id.eq(id)).exec(&self.conn).await?;
        Ok(())
    }

    /// The orders of `directory_url` still in flight, oldest first: what a starting server
    /// resumes.
    pub async fn acme_orders_in_flight(&self, directory_url: &str) -> Result<Vec<StoredOrder>, StoreError> {
        let states = [OrderState::New, OrderState::Pending, OrderState::Finalized].map(|state| state.as_str());
        let rows = acme_order::Entity::find()
            .filter(acme_order::Column::DirectoryUrl.eq(directory_url))
            .filter(acme_order::Column::State.is_in(states))
            .order_by_asc(acme_order::Column::Id)
            .all(&self.conn)
            .await?;
        rows.into_iter().map(to_order).collect()
    }

    /// Every order of an application, oldest first.
    pub async fn acme_orders_of(&self, application_id: ApplicationId) -> Result<Vec<StoredOrder>, StoreError> {
        let rows = acme_order::Entity::find()
            .filter(acme_order::Column::ApplicationId.eq(application_id.0))
            .order_by_asc(acme_order::Column::Id)
            .all(&self.conn)
            .await?;
        rows.into_iter().map(to_order).collect()
    }

    /// Records the status of an application's certificate. A failure or a pending order keeps
    /// the expiry of the certificate issued before, which the device still serves.
    pub async fn record_certificate(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        state: &CertificateState,
    ) -> Result<(), StoreError> {
        let (status, message, not_after) = match state {
            CertificateState::Valid { not_after } => ("valid", None, Some(*not_after)),
            CertificateState::Pending => ("pending", None, None),
            CertificateState::Failed { message } => ("failed", Some(message.clone()), None),
        };
        let mut columns = vec![
            application_certificate::Column::Status,
            application_certificate::Column::Message,
            application_certificate::Column::UpdatedAt,
        ];
        if not_after.is_some() {
            columns.push(application_certificate::Column::NotAfter);
        }
        let _guard = self.status_write_lock().await;
        application_certificate::Entity::insert(application_certificate::ActiveModel {
            application_id: Set(application_id.0),
            organization_id: Set(organization_id.0),
            status: Set(status.to_owned()),
            message: Set(message),
            not_after: Set(not_after),
            updated_at: Set(now()),
        })
        .on_conflict(
            OnConflict::column(application_certificate::Column::ApplicationId).update_columns(columns).to_owned(),
        )
        .exec_without_returning(&self.conn)
        .await?;
        Ok(())
    }

    /// The certificate status of an application, if the server ever issued or ordered one.
    pub async fn certificate_summary(
        &self,
        application_id: ApplicationId,
    ) -> Result<Option<CertificateSummary>, StoreError> {
        let row = application_certificate::Entity::find_by_id(application_id.0).one(&self.conn).await?;
        Ok(row.map(|row| CertificateSummary {
            status: match row.message {
                Some(message) if row.status == "failed" => format!("failed: {message}"),
                _ => row.status,
            },
            expires_at: row.not_after,
        }))
    }
}
