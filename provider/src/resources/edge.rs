//! `edgible_edge`: the public entry point of one device pool, enrolled with a one-time token
//! like a device.

use std::sync::LazyLock;

use edgible::model::{DevicePoolId, Edge, EdgeCreated, EdgeEndpoint, EdgeSpec, Name};

use super::{Model, flattened_state_json, id_attribute, revision_attribute};
use crate::schema::{Attribute, Block, Check, Schema, parses};
use crate::value::{Type, Value};

pub struct EdgeModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new(
            "An edge: it accepts TLS on :443 for the hostnames of its pool's applications, routes by SNI without \
             decrypting, and forwards over WireGuard to the device that owns the name. Create it here, then enroll \
             the machine with `edgible-edge enroll` and the `enrollment_token`.",
        )
        .attribute(id_attribute())
        .attribute(revision_attribute())
        .attribute(
            Attribute::required("name", Type::String, "Unique name of the edge in the organization.")
                .check(Check::Parse(parses::<Name>)),
        )
        .attribute(
            Attribute::required(
                "pool_id",
                Type::String,
                "The pool the edge serves; its tunnel address comes from the pool's network. Changing it replaces \
                 the edge.",
            )
            .check(Check::Parse(parses::<DevicePoolId>))
            .requires_replace(),
        )
        .attribute(
            Attribute::required(
                "endpoint",
                Type::String,
                "Where devices send WireGuard datagrams: `host:port`, the host an IPv4 address or a DNS name \
                 (`203.0.113.1:51820`).",
            )
            .check(Check::Parse(parses::<EdgeEndpoint>)),
        )
        .attribute(
            Attribute::computed(
                "enrollment_token",
                Type::String,
                "The one-time token `edgible-edge enroll` exchanges for the edge's credential. Known only to the \
                 Terraform run that created the edge (imported edges have none).",
            )
            .sensitive()
            .write_once(),
        )
        .attribute(
            Attribute::computed("enrollment_expires_at", Type::String, "When the enrollment token stops working.")
                .write_once(),
        )
        .attribute(Attribute::computed(
            "tunnel_address",
            Type::String,
            "The edge's address inside its pool's tunnel network.",
        ))
        .attribute(Attribute::computed(
            "public_key",
            Type::String,
            "The edge's WireGuard public key, once it enrolled.",
        ))
        .attribute(Attribute::computed(
            "status",
            Type::String,
            "`pending` (not enrolled yet), `online` or `offline`.",
        )),
    )
});

impl Model for EdgeModel {
    type Object = Edge;
    type Spec = EdgeSpec;
    const TYPE_NAME: &'static str = "edgible_edge";
    const NOUN: &'static str = "edge";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn state_json(edge: &Edge) -> serde_json::Value {
        let mut state = flattened_state_json(edge);
        if let serde_json::Value::Object(state) = &mut state {
            let status = serde_json::to_value(&edge.status).unwrap_or_default();
            for (from, to) in [("tunnel_address", "tunnel_address"), ("public_key", "public_key"), ("state", "status")]
            {
                if let Some(value) = status.get(from) {
                    state.insert(to.to_owned(), value.clone());
                }
            }
        }
        state
    }

    fn created(created: EdgeCreated) -> (Edge, Vec<(&'static str, Value)>) {
        let token = Value::String(created.enrollment_token);
        let expires = Value::String(created.enrollment_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        (created.edge, vec![("enrollment_token", token), ("enrollment_expires_at", expires)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Managed;
    use edgible::model::{DeviceState, EdgeId, EdgeStatus, OrganizationId};

    #[test]
    fn status_fields_are_flattened_into_the_state_and_the_spec_survives() {
        let edge = Edge {
            id: EdgeId::new(),
            organization_id: OrganizationId::new(),
            revision: 4,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: EdgeSpec {
                name: "edge-1".parse().unwrap(),
                pool_id: DevicePoolId::new(),
                endpoint: "edge.example.test:51820".parse().unwrap(),
            },
            status: EdgeStatus {
                tunnel_address: "100.96.0.1".parse().unwrap(),
                public_key: None,
                state: DeviceState::Online,
                applied_revision: Some(9),
                last_seen_at: None,
            },
        };
        let state = Managed::<EdgeModel>::state(&edge).unwrap();
        assert_eq!(state.get("tunnel_address"), &Value::string("100.96.0.1"));
        assert_eq!(state.get("status"), &Value::string("online"));
        assert_eq!(state.get("endpoint"), &Value::string("edge.example.test:51820"));
        assert_eq!(Managed::<EdgeModel>::spec(&state).unwrap(), edge.spec);
    }
}
