//! Memberships and the global users behind them. A user is created the first time any
//! organization adds their e-mail address and reused after that; an organization only ever
//! sees its own memberships.

use edgible::model::{Member, MemberId, MemberSpec, OrganizationId, Page, Revision, Role, UserId};
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, Set};

use super::entities::{member, user};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, Write, check_revision, enum_from_text, enum_text, revision};

/// How memberships are read within an organization; their listing filters by e-mail address.
const MEMBERS: Scoped<member::Entity> = Scoped {
    organization: member::Column::OrganizationId,
    id: member::Column::Id,
    name: Some(member::Column::Email),
    row_id: |row| row.id,
};

pub(super) fn to_model(row: member::Model) -> Result<Member, StoreError> {
    Ok(Member {
        id: MemberId(row.id),
        organization_id: OrganizationId(row.organization_id),
        user_id: UserId(row.user_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: MemberSpec {
            email: row.email,
            display_name: row.display_name,
            role: enum_from_text("member role", &row.role)?,
        },
    })
}

/// The user with this e-mail address, created if new.
async fn user_for(write: &Write, email: &str) -> Result<UserId, StoreError> {
    if let Some(row) = user::Entity::find().filter(user::Column::Email.eq(email)).one(&write.txn).await? {
        return Ok(UserId(row.id));
    }
    let id = UserId::new();
    user::ActiveModel {
        id: Set(id.0),
        email: Set(email.to_owned()),
        created_at: Set(write.now),
        password_hash: Set(None),
    }
    .insert(&write.txn)
    .await?;
    Ok(id)
}

/// Fails if `except` is the organization's last owner.
async fn check_other_owner(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    except: MemberId,
    field: Option<&str>,
) -> Result<(), StoreError> {
    let owner = enum_text(&Role::Owner)?;
    let others = member::Entity::find()
        .filter(member::Column::OrganizationId.eq(organization_id.0))
        .filter(member::Column::Role.eq(owner))
        .filter(member::Column::Id.ne(except.0))
        .count(conn)
        .await?;
    if others == 0 {
        return Err(StoreError::Conflict {
            field: field.map(str::to_owned),
            message: "an organization needs at least one owner and this is the last one".into(),
        });
    }
    Ok(())
}

impl Db {
    pub async fn member(&self, organization_id: OrganizationId, id: MemberId) -> Result<Member, StoreError> {
        let row = MEMBERS.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    /// Memberships in creation order; `request.name` filters by e-mail address.
    pub async fn list_members(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Member>, StoreError> {
        MEMBERS.page(&self.conn, organization_id.0, request, to_model).await
    }

    pub async fn create_member(
        &self,
        organization_id: OrganizationId,
        spec: &MemberSpec,
    ) -> Result<Member, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let user_id = user_for(&write, &spec.email).await?;
            let existing = member::Entity::find()
                .filter(member::Column::OrganizationId.eq(organization_id.0))
                .filter(member::Column::UserId.eq(user_id.0))
                .count(&write.txn)
                .await?;
            if existing > 0 {
                return Err(StoreError::conflict("email", format!("{} is already a member", spec.email)));
            }
            let row = member::ActiveModel {
                id: Set(MemberId::new().0),
                organization_id: Set(organization_id.0),
                user_id: Set(user_id.0),
                email: Set(spec.email.clone()),
                display_name: Set(spec.display_name.clone()),
                role: Set(enum_text(&spec.role)?),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            to_model(row)
        }
        .await;
        write.finish(result).await
    }

    pub async fn update_member(
        &self,
        organization_id: OrganizationId,
        id: MemberId,
        expected: Option<Revision>,
        spec: &MemberSpec,
    ) -> Result<Member, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = MEMBERS.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec.email != spec.email {
                return Err(StoreError::invalid(
                    "email",
                    "cannot be changed; remove the member and add the new address",
                ));
            }
            if current.spec == *spec {
                return Ok(current);
            }
            if current.spec.role == Role::Owner && spec.role != Role::Owner {
                check_other_owner(&write.txn, organization_id, id, Some("role")).await?;
            }
            let mut active: member::ActiveModel = row.into();
            active.display_name = Set(spec.display_name.clone());
            active.role = Set(enum_text(&spec.role)?);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    pub async fn delete_member(&self, organization_id: OrganizationId, id: MemberId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = MEMBERS.row(&write.txn, organization_id.0, id.0).await?;
            if enum_from_text::<Role>("member role", &row.role)? == Role::Owner {
                check_other_owner(&write.txn, organization_id, id, None).await?;
            }
            member::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
