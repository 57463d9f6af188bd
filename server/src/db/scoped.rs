//! Reads shared by every kind of object that belongs to an organization: one row by id and a
//! page of rows, both limited to the caller's organization.

use edgible::model::Page;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::{PageRequest, StoreError, page};

/// The columns through which a kind of object is scoped, looked up and filtered.
pub(super) struct Scoped<E: EntityTrait> {
    /// The column holding the owning organization's id (for organizations, their own id).
    pub organization: E::Column,
    pub id: E::Column,
    /// The column a listing's `name` filter matches; `None` for kinds without a name, where a
    /// `name` filter matches nothing.
    pub name: Option<E::Column>,
    /// The id of a row, which becomes a page's cursor.
    pub row_id: fn(&E::Model) -> Uuid,
}

impl<E> Scoped<E>
where
    E: EntityTrait,
    E::Model: Sync,
{
    /// The row with this id in this organization.
    pub async fn row(
        &self,
        conn: &impl ConnectionTrait,
        organization_id: Uuid,
        id: Uuid,
    ) -> Result<E::Model, StoreError> {
        E::find()
            .filter(self.id.eq(id))
            .filter(self.organization.eq(organization_id))
            .one(conn)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// One page of the organization's rows in id order, converted by `convert`.
    pub async fn page<T>(
        &self,
        conn: &impl ConnectionTrait,
        organization_id: Uuid,
        request: &PageRequest,
        convert: impl Fn(E::Model) -> Result<T, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        let mut query = E::find().filter(self.organization.eq(organization_id));
        if let Some(name) = &request.name {
            let Some(column) = self.name else {
                return Ok(Page { items: Vec::new(), next_cursor: None });
            };
            query = query.filter(column.eq(name.as_str()));
        }
        if let Some(after) = request.after {
            query = query.filter(self.id.gt(after));
        }
        let rows = query.order_by_asc(self.id).limit(request.limit + 1).all(conn).await?;
        page(rows, request.limit, self.row_id, convert)
    }

    /// Whether another of the organization's rows already has this name.
    pub async fn name_taken(
        &self,
        conn: &impl ConnectionTrait,
        organization_id: Uuid,
        name: &str,
        except: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let Some(column) = self.name else {
            return Ok(false);
        };
        let mut query = E::find().filter(self.organization.eq(organization_id)).filter(column.eq(name));
        if let Some(except) = except {
            query = query.filter(self.id.ne(except));
        }
        Ok(query.count(conn).await? > 0)
    }
}
