//! `edgible_domain`: a domain the organization claims. Creating it answers the TXT record to
//! publish; verification (`edgible domain verify` or `POST /v1/domains/{id}/verify`) happens
//! once the record is in DNS, and the next refresh shows it in `status`.

use std::sync::LazyLock;

use edgible::model::{Domain, DomainSpec, Hostname};

use super::{Model, flattened_state_json, id_attribute, revision_attribute};
use crate::schema::{Attribute, Block, Check, Schema, parses};
use crate::value::{Type, Value};

pub struct DomainModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new(
            "A domain the organization proves it owns with a DNS TXT record, so that its applications may use the \
             domain and every name below it as hostnames. Publish `txt_record_value` as the TXT record \
             `txt_record_name` (for example with your DNS provider's Terraform resource), then verify with \
             `edgible domain verify`.",
        )
        .attribute(id_attribute())
        .attribute(revision_attribute())
        .attribute(
            Attribute::required(
                "name",
                Type::String,
                "The domain, e.g. `example.com` (no wildcard). Changing it replaces the domain.",
            )
            .check(Check::Parse(parses::<Hostname>))
            .requires_replace(),
        )
        .attribute(Attribute::computed(
            "status",
            Type::String,
            "`pending` until the TXT record was found holding the token, then `verified`.",
        ))
        .attribute(Attribute::computed(
            "txt_record_name",
            Type::String,
            "The name of the TXT record to publish: `_edgible-challenge.<name>`.",
        ))
        .attribute(Attribute::computed(
            "txt_record_value",
            Type::String,
            "The value the TXT record must hold (not a secret: it is published in DNS).",
        ))
        .attribute(Attribute::computed(
            "verified_at",
            Type::String,
            "When the domain was verified (RFC 3339).",
        )),
    )
});

impl Model for DomainModel {
    type Object = Domain;
    type Spec = DomainSpec;
    const TYPE_NAME: &'static str = "edgible_domain";
    const NOUN: &'static str = "domain";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn state_json(domain: &Domain) -> serde_json::Value {
        let mut state = flattened_state_json(domain);
        if let serde_json::Value::Object(state) = &mut state {
            let status = serde_json::to_value(&domain.status).unwrap_or_default();
            for (from, to) in [
                ("state", "status"),
                ("txt_record_name", "txt_record_name"),
                ("txt_record_value", "txt_record_value"),
                ("verified_at", "verified_at"),
            ] {
                if let Some(value) = status.get(from) {
                    state.insert(to.to_owned(), value.clone());
                }
            }
        }
        state
    }

    fn created(created: Domain) -> (Domain, Vec<(&'static str, Value)>) {
        (created, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};
    use edgible::model::{DomainId, DomainState, DomainStatus, OrganizationId};

    fn domain(state: DomainState) -> Domain {
        Domain {
            id: DomainId::new(),
            organization_id: OrganizationId::new(),
            revision: 3,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: DomainSpec { name: "example.test".parse().unwrap() },
            status: DomainStatus {
                state,
                txt_record_name: "_edgible-challenge.example.test".into(),
                txt_record_value: "token".into(),
                verified_at: (state == DomainState::Verified).then(chrono::Utc::now),
            },
        }
    }

    #[test]
    fn status_fields_are_flattened_into_the_state_and_the_spec_survives() {
        let pending = domain(DomainState::Pending);
        let state = Managed::<DomainModel>::state(&pending).unwrap();
        assert_eq!(state.get("status"), &Value::string("pending"));
        assert_eq!(state.get("txt_record_name"), &Value::string("_edgible-challenge.example.test"));
        assert_eq!(state.get("txt_record_value"), &Value::string("token"));
        assert_eq!(state.get("verified_at"), &Value::Null);
        assert_eq!(Managed::<DomainModel>::spec(&state).unwrap(), pending.spec);

        let verified = Managed::<DomainModel>::state(&domain(DomainState::Verified)).unwrap();
        assert_eq!(verified.get("status"), &Value::string("verified"));
        assert!(verified.get("verified_at").as_str().is_some());
    }

    #[test]
    fn wildcards_and_bad_names_are_refused_at_the_name() {
        let resource = Managed::<DomainModel>::new();
        for bad in ["*.example.test", "Example.test", "example"] {
            let mut config = Managed::<DomainModel>::state(&domain(DomainState::Pending)).unwrap();
            config.set("name", Value::string(bad));
            let diagnostics = resource.validate(&config);
            assert!(diagnostics.has_errors(), "{bad} should be refused");
        }
    }
}
