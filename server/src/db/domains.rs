//! Domains organizations claim, and the ownership check of application hostnames (the rules
//! are `crate::domains`'s; this is where they meet the database, inside write transactions).
//!
//! A domain is verified by one organization at most: before marking one verified, the write
//! re-checks (serialized with every other write) that no other organization holds it, a name
//! above it or a name below it, and that no other organization's application uses a name
//! under it; the unique index on `verified_name` is the safety net for the first rule.

use edgible::model::{
    Domain, DomainId, DomainSpec, DomainState, DomainStatus, Hostname, OrganizationId, Page, is_at_or_below,
};
use sea_orm::sea_query::Condition;
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, Set};

use super::entities::{application_hostname, domain};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, parse, revision};
use crate::domains::{HostnamePolicy, Standing, challenge_name, covered_by, new_token};

/// How domains are read within an organization; a listing's `name` filter is the domain name.
const DOMAINS: Scoped<domain::Entity> = Scoped {
    organization: domain::Column::OrganizationId,
    id: domain::Column::Id,
    name: Some(domain::Column::Name),
    row_id: |row| row.id,
};

fn to_model(row: domain::Model) -> Result<Domain, StoreError> {
    Ok(Domain {
        id: DomainId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        status: DomainStatus {
            state: if row.verified_at.is_some() { DomainState::Verified } else { DomainState::Pending },
            txt_record_name: challenge_name(&row.name),
            txt_record_value: row.token,
            verified_at: row.verified_at,
        },
        spec: DomainSpec { name: parse("domain name", &row.name)? },
    })
}

/// Matches a name column at or below `name`: the name itself or anything ending in `.name`
/// (names hold only letters, digits, '-', '.' and a leading '*', so `LIKE` has nothing to
/// escape).
fn at_or_below(column: impl ColumnTrait, name: &str) -> Condition {
    Condition::any().add(column.eq(name)).add(column.like(format!("%.{name}")))
}

/// `name` and every name above it: `a.example.com`, `example.com`, `com`.
fn self_and_ancestors(name: &str) -> Vec<String> {
    let mut names = vec![name.to_owned()];
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        names.push(parent.to_owned());
        rest = parent;
    }
    names
}

/// Refuses (409, `name`) a domain another organization holds: the same name verified, a
/// verified name above or below it, or application hostnames at or below it.
async fn check_free(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    name: &str,
) -> Result<(), StoreError> {
    let held = domain::Entity::find()
        .filter(domain::Column::OrganizationId.ne(organization_id.0))
        .filter(
            Condition::any()
                .add(domain::Column::VerifiedName.is_in(self_and_ancestors(name)))
                .add(domain::Column::VerifiedName.like(format!("%.{name}"))),
        )
        .one(conn)
        .await?;
    if let Some(held) = held {
        let verified = held.verified_name.unwrap_or(held.name);
        let how = if verified == name {
            "is verified by another organization".to_owned()
        } else if is_at_or_below(name, &verified) {
            format!("is under {verified}, which another organization verified")
        } else {
            format!("is above {verified}, which another organization verified")
        };
        return Err(StoreError::conflict("name", format!("{name} {how}")));
    }
    let used = application_hostname::Entity::find()
        .filter(application_hostname::Column::OrganizationId.ne(organization_id.0))
        .filter(at_or_below(application_hostname::Column::Hostname, name))
        .one(conn)
        .await?;
    if let Some(used) = used {
        return Err(StoreError::conflict(
            "name",
            format!("{} is used by another organization's application", used.hostname),
        ));
    }
    Ok(())
}

/// Refuses (422, `hostnames[i]`) hostnames the organization may not use under `policy`.
/// Names `application_id` already holds are not checked again, so that turning enforcement on
/// does not freeze existing applications.
pub(super) async fn check_ownership(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    application_id: edgible::model::ApplicationId,
    hostnames: &[Hostname],
    policy: &HostnamePolicy,
) -> Result<(), StoreError> {
    if !policy.enforced() {
        return Ok(());
    }
    let held: Vec<String> = application_hostname::Entity::find()
        .select_only()
        .column(application_hostname::Column::Hostname)
        .filter(application_hostname::Column::ApplicationId.eq(application_id.0))
        .into_tuple()
        .all(conn)
        .await?;
    let mut verified: Option<Vec<String>> = None;
    for (index, hostname) in hostnames.iter().enumerate() {
        if held.iter().any(|name| name == hostname.as_str()) {
            continue;
        }
        if !matches!(policy.standing(hostname), Standing::NeedsDomain) {
            continue;
        }
        let domains = match &mut verified {
            Some(domains) => domains,
            None => verified.insert(
                domain::Entity::find()
                    .select_only()
                    .column(domain::Column::Name)
                    .filter(domain::Column::OrganizationId.eq(organization_id.0))
                    .filter(domain::Column::VerifiedAt.is_not_null())
                    .into_tuple()
                    .all(conn)
                    .await?,
            ),
        };
        if domains.iter().any(|domain| covered_by(hostname, domain)) {
            continue;
        }
        let zones = if policy.platform_zones.is_empty() {
            String::new()
        } else {
            format!("below a platform zone ({}) nor ", policy.zones_text())
        };
        let neither = if zones.is_empty() { "not" } else { "neither" };
        return Err(StoreError::invalid(
            format!("hostnames[{index}]"),
            format!(
                "{hostname} is {neither} {zones}under a verified domain of this organization: create its domain \
                 (POST /v1/domains, `edgible domain create`), publish the TXT record and verify it"
            ),
        ));
    }
    Ok(())
}

impl Db {
    pub async fn domain(&self, organization_id: OrganizationId, id: DomainId) -> Result<Domain, StoreError> {
        to_model(DOMAINS.row(&self.conn, organization_id.0, id.0).await?)
    }

    pub async fn list_domains(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Domain>, StoreError> {
        DOMAINS.page(&self.conn, organization_id.0, request, to_model).await
    }

    /// Creates a pending domain with a fresh verification token. Another organization may
    /// hold the same name (verified or not): this one can then never verify it while the other
    /// holds it, which [`Db::verify_domain`] enforces.
    pub async fn create_domain(
        &self,
        organization_id: OrganizationId,
        spec: &DomainSpec,
        policy: &HostnamePolicy,
    ) -> Result<Domain, StoreError> {
        if let Some(zone) = policy.overlapping_zone(&spec.name) {
            return Err(StoreError::invalid(
                "name",
                format!(
                    "{} overlaps the platform zone {zone}, whose names are first come, first served: use names \
                     below the zone without a domain",
                    spec.name
                ),
            ));
        }
        let write = self.begin_write().await?;
        let result = async {
            if DOMAINS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), None).await? {
                return Err(StoreError::conflict(
                    "name",
                    format!("this organization already has the domain {}", spec.name),
                ));
            }
            let row = domain::ActiveModel {
                id: Set(DomainId::new().0),
                organization_id: Set(organization_id.0),
                name: Set(spec.name.to_string()),
                token: Set(new_token()),
                verified_name: Set(None),
                verified_at: Set(None),
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

    /// Refuses (409, `name`) when another organization holds the domain; checked before the
    /// DNS lookup so that a taken domain fails fast, and again by [`Db::verify_domain`].
    pub async fn check_domain_free(&self, organization_id: OrganizationId, name: &Hostname) -> Result<(), StoreError> {
        check_free(&self.conn, organization_id, name.as_str()).await
    }

    /// Marks the domain verified (its TXT record was found holding its token), unless another
    /// organization took it meanwhile. Verifying a verified domain changes nothing.
    pub async fn verify_domain(&self, organization_id: OrganizationId, id: DomainId) -> Result<Domain, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = DOMAINS.row(&write.txn, organization_id.0, id.0).await?;
            if row.verified_at.is_some() {
                return to_model(row);
            }
            check_free(&write.txn, organization_id, &row.name).await?;
            let name = row.name.clone();
            let mut active: domain::ActiveModel = row.into();
            active.verified_name = Set(Some(name));
            active.verified_at = Set(Some(write.now));
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    /// Deletes a domain, unless it is verified and applications of the organization use names
    /// at or below it (409).
    pub async fn delete_domain(&self, organization_id: OrganizationId, id: DomainId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = DOMAINS.row(&write.txn, organization_id.0, id.0).await?;
            if row.verified_at.is_some() {
                let used = application_hostname::Entity::find()
                    .filter(application_hostname::Column::OrganizationId.eq(organization_id.0))
                    .filter(at_or_below(application_hostname::Column::Hostname, &row.name))
                    .one(&write.txn)
                    .await?;
                if let Some(used) = used {
                    return Err(StoreError::Conflict {
                        field: None,
                        message: format!(
                            "the domain {} is used by the hostname {} of application {}; change or delete the \
                             application first",
                            row.name, used.hostname, used.application_id
                        ),
                    });
                }
            }
            domain::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_run_up_to_the_top_label() {
        assert_eq!(self_and_ancestors("a.example.com"), ["a.example.com", "example.com", "com"]);
    }
}
