//! `edgible_placement`: where an application runs.

use std::sync::LazyLock;

use edgible::model::{ApplicationId, DeviceId, DevicePoolId, Placement, PlacementSpec, Region};

use super::{Model, id_attribute, revision_attribute};
use crate::diagnostics::{AttributePath, Diagnostics};
use crate::schema::{Attribute, Block, Check, Schema, invalid, parses};
use crate::value::{Type, Value};

pub struct PlacementModel;

const SERVING_DEVICE: &str = "serving-device";
const CLOUD: &str = "cloud";

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new(
            "Where an application runs: on one of the organization's devices (`serving-device`) or on an operator \
             cloud host (`cloud`). Changing the device moves the application in place.",
        )
        .attribute(id_attribute())
        .attribute(revision_attribute())
        .attribute(
            Attribute::required(
                "application_id",
                Type::String,
                "The application to place. Changing it replaces the placement.",
            )
            .check(Check::Parse(parses::<ApplicationId>))
            .requires_replace(),
        )
        .attribute(
            Attribute::required("strategy", Type::String, "`serving-device` or `cloud`.")
                .check(Check::OneOf(&[SERVING_DEVICE, CLOUD])),
        )
        .attribute(
            Attribute::optional("device_id", Type::String, "The device to run on; required for `serving-device`.")
                .check(Check::Parse(parses::<DeviceId>)),
        )
        .attribute(
            Attribute::optional("pool_id", Type::String, "For `cloud`: the pool of cloud hosts to choose from.")
                .check(Check::Parse(parses::<DevicePoolId>)),
        )
        .attribute(
            Attribute::optional("region", Type::String, "For `cloud`: the region to choose a host in.")
                .check(Check::Parse(parses::<Region>)),
        )
        .attribute(
            Attribute::computed(
                "host",
                Type::String,
                "The id of the device the application runs on: `device_id` for `serving-device`, the cloud host \
                 the scheduler chose for `cloud` (the host itself belongs to the operator and cannot be read).",
            )
            // Any change of the placement may move the application: the new host is known only
            // once the server chose it.
            .changes_on_write(),
        ),
    )
});

impl Model for PlacementModel {
    type Object = Placement;
    type Spec = PlacementSpec;
    const TYPE_NAME: &'static str = "edgible_placement";
    const NOUN: &'static str = "placement";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    /// Which attributes go with which strategy. Unknown values count as set: they will be.
    fn check(config: &Value) -> Diagnostics {
        let mut diagnostics = Diagnostics::new();
        let set = |name: &str| !config.get(name).is_null();
        match config.get("strategy").as_str() {
            Some(SERVING_DEVICE) => {
                if !set("device_id") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("device_id"),
                        "required with strategy \"serving-device\"",
                    ));
                }
                for name in ["pool_id", "region"] {
                    if set(name) {
                        diagnostics.push(invalid(
                            &AttributePath::attribute(name),
                            "only for strategy \"cloud\"; a serving-device placement runs on `device_id`",
                        ));
                    }
                }
            }
            Some(CLOUD) => {
                if set("device_id") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("device_id"),
                        "only for strategy \"serving-device\"; a cloud placement chooses a host by `pool_id` or `region`",
                    ));
                }
                if !set("pool_id") && !set("region") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("pool_id"),
                        "a cloud placement needs `pool_id` or `region`",
                    ));
                }
            }
            _ => {}
        }
        diagnostics
    }

    /// The spec's fields, `id`, `revision` and the platform's choice of `host`.
    fn state_json(object: &Placement) -> serde_json::Value {
        let mut state = super::flattened_state_json(object);
        if let (serde_json::Value::Object(state), Some(host)) = (&mut state, object.host) {
            state.insert("host".into(), serde_json::Value::String(host.to_string()));
        }
        state
    }

    fn created(created: Placement) -> (Placement, Vec<(&'static str, Value)>) {
        (created, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};

    fn config(json: serde_json::Value) -> Value {
        Value::from_json(&json, &SCHEMA.value_type()).unwrap()
    }

    #[test]
    fn strategies_take_their_own_attributes() {
        let resource = Managed::<PlacementModel>::new();
        let application_id = ApplicationId::new().to_string();
        let device_id = DeviceId::new().to_string();
        let good = config(
            serde_json::json!({"application_id": application_id, "strategy": "serving-device", "device_id": device_id}),
        );
        assert!(resource.validate(&good).is_empty(), "{}", resource.validate(&good));
        let spec = Managed::<PlacementModel>::spec(&good).unwrap();
        assert_eq!(spec.strategy(), "serving-device");

        let missing = config(serde_json::json!({"application_id": application_id, "strategy": "serving-device"}));
        let diagnostics = resource.validate(&missing);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("device_id")));

        let mixed = config(
            serde_json::json!({"application_id": application_id, "strategy": "cloud", "device_id": device_id, "region": "eu-west"}),
        );
        let diagnostics = resource.validate(&mixed);
        assert_eq!(diagnostics.0.len(), 1);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("device_id")));

        let mut unknown = missing.clone();
        unknown.set("device_id", Value::unknown());
        assert!(resource.validate(&unknown).is_empty());
    }

    #[test]
    fn placement_state_is_flat() {
        let placement = Placement {
            id: edgible::model::PlacementId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            host: None,
            migration_id: None,
            spec: PlacementSpec::Cloud {
                application_id: ApplicationId::new(),
                pool_id: None,
                region: Some("eu-west".parse().unwrap()),
            },
        };
        let state = Managed::<PlacementModel>::state(&placement).unwrap();
        assert_eq!(state.get("strategy"), &Value::string("cloud"));
        assert_eq!(state.get("region"), &Value::string("eu-west"));
        assert_eq!(state.get("device_id"), &Value::Null);
        assert_eq!(state.get("host"), &Value::Null, "not scheduled");
        assert_eq!(Managed::<PlacementModel>::spec(&state).unwrap(), placement.spec);
    }

    #[test]
    fn the_chosen_host_is_computed_state_not_spec() {
        let host = DeviceId::new();
        let application_id = ApplicationId::new();
        let spec = PlacementSpec::Cloud { application_id, pool_id: None, region: Some("eu-west".parse().unwrap()) };
        let placement = Placement {
            id: edgible::model::PlacementId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            host: Some(host),
            migration_id: None,
            spec: spec.clone(),
        };
        let state = Managed::<PlacementModel>::state(&placement).unwrap();
        assert_eq!(state.get("host"), &Value::string(host.to_string()));
        assert_eq!(Managed::<PlacementModel>::spec(&state).unwrap(), spec, "host is not sent back");
        let attribute = SCHEMA.block.attributes.iter().find(|a| a.name == "host").unwrap();
        assert!(attribute.is_computed_only(), "users cannot set it");
        assert!(attribute.changes_on_write, "a changed placement may move: its host is unknown until applied");
    }
}
