//! The internal CA's row: created once by the first server on a database, read by every
//! later one. Two servers starting at once both try to insert; the primary key keeps the
//! first, and both then read the same row.

use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, Set};

use super::entities::certificate_authority;
use super::{Db, StoreError, now};
use crate::certs::GeneratedCa;

/// The one row's key.
const ROW: i32 = 1;

impl Db {
    /// The stored CA's certificate and key (PEM), storing `generate()`'s if there is none.
    pub async fn certificate_authority<E: From<StoreError>>(
        &self,
        generate: impl FnOnce() -> Result<GeneratedCa, E>,
    ) -> Result<GeneratedCa, E> {
        let stored = certificate_authority::Entity::find_by_id(ROW).one(&self.conn).await.map_err(StoreError::from)?;
        if let Some(row) = stored {
            return Ok(GeneratedCa { certificate_pem: row.certificate_pem, key_pem: row.key_pem });
        }
        let generated = generate()?;
        let row = certificate_authority::ActiveModel {
            id: Set(ROW),
            certificate_pem: Set(generated.certificate_pem),
            key_pem: Set(generated.key_pem),
            created_at: Set(now()),
        };
        certificate_authority::Entity::insert(row)
            .on_conflict(OnConflict::column(certificate_authority::Column::Id).do_nothing().to_owned())
            .exec_without_returning(&self.conn)
            .await
            .map_err(StoreError::from)?;
        let row = certificate_authority::Entity::find_by_id(ROW)
            .one(&self.conn)
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| StoreError::Corrupt("the certificate authority row vanished".into()))?;
        Ok(GeneratedCa { certificate_pem: row.certificate_pem, key_pem: row.key_pem })
    }
}
