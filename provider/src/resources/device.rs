//! `edgible_device`: a machine that runs applications, enrolled with a one-time token.

use std::sync::LazyLock;

use edgible::model::{Device, DeviceCreated, DevicePoolId, DeviceSpec, LabelKey, Name};

use super::{Model, flattened_state_json, id_attribute, revision_attribute};
use crate::schema::{Attribute, Block, Check, Schema, parses};
use crate::value::{Type, Value};

pub struct DeviceModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut block = Block::new(
        "A device that runs applications. Create it here, then enroll the machine with \
         `edgible-agent enroll` and the `enrollment_token`.",
    )
    .attribute(id_attribute())
    .attribute(revision_attribute())
    .attribute(
        Attribute::required("name", Type::String, "Unique name of the device in the organization.")
            .check(Check::Parse(parses::<Name>)),
    )
    .attribute(
        Attribute::required(
            "pool_id",
            Type::String,
            "The pool the device's tunnel address comes from. Changing it replaces the device.",
        )
        .check(Check::Parse(parses::<DevicePoolId>))
        .requires_replace(),
    )
    .attribute(
        Attribute::optional("labels", Type::map(Type::String), "Labels for selecting devices.")
            .keys(parses::<LabelKey>),
    )
    .attribute(
        Attribute::computed(
            "enrollment_token",
            Type::String,
            "The one-time token `edgible-agent enroll` exchanges for the device's credential. Known only to the \
             Terraform run that created the device (imported devices have none).",
        )
        .sensitive()
        .write_once(),
    )
    .attribute(
        Attribute::computed("enrollment_expires_at", Type::String, "When the enrollment token stops working.")
            .write_once(),
    );
    for attribute in status_attributes() {
        block = block.attribute(attribute);
    }
    Schema::new(block)
});

/// The attributes only the platform writes, shared with the `edgible_device` data source.
pub fn status_attributes() -> Vec<Attribute> {
    vec![
        Attribute::computed("tunnel_address", Type::String, "The device's address inside its pool's tunnel network."),
        Attribute::computed("public_key", Type::String, "The device's WireGuard public key, once it enrolled."),
        Attribute::computed("status", Type::String, "`pending` (not enrolled yet), `online` or `offline`."),
        Attribute::computed(
            "applied_revision",
            Type::Number,
            "The revision of desired state the device's agent last reported as applied.",
        ),
    ]
}

/// The state JSON of a device: its spec, id, revision and status.
pub fn device_state_json(device: &Device) -> serde_json::Value {
    let mut state = flattened_state_json(device);
    if let serde_json::Value::Object(state) = &mut state {
        let status = serde_json::to_value(&device.status).unwrap_or_default();
        for (from, to) in [
            ("tunnel_address", "tunnel_address"),
            ("public_key", "public_key"),
            ("state", "status"),
            ("applied_revision", "applied_revision"),
        ] {
            if let Some(value) = status.get(from) {
                state.insert(to.to_owned(), value.clone());
            }
        }
    }
    state
}

impl Model for DeviceModel {
    type Object = Device;
    type Spec = DeviceSpec;
    const TYPE_NAME: &'static str = "edgible_device";
    const NOUN: &'static str = "device";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn state_json(object: &Device) -> serde_json::Value {
        device_state_json(object)
    }

    fn created(created: DeviceCreated) -> (Device, Vec<(&'static str, Value)>) {
        let token = Value::String(created.enrollment_token);
        let expires = Value::String(created.enrollment_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        (created.device, vec![("enrollment_token", token), ("enrollment_expires_at", expires)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Managed;
    use edgible::model::{DeviceId, DeviceState, DeviceStatus, OrganizationId};

    #[test]
    fn status_fields_are_flattened_into_the_state() {
        let device = Device {
            id: DeviceId::new(),
            organization_id: OrganizationId::new(),
            revision: 3,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: DeviceSpec {
                name: "laptop".parse().unwrap(),
                pool_id: DevicePoolId::new(),
                labels: [("site".parse().unwrap(), "home".to_owned())].into(),
            },
            status: DeviceStatus {
                tunnel_address: "100.96.0.1".parse().unwrap(),
                public_key: None,
                state: DeviceState::Pending,
                applied_revision: None,
                last_seen_at: None,
                cloud_host: None,
            },
        };
        let state = Managed::<DeviceModel>::state(&device).unwrap();
        assert_eq!(state.get("tunnel_address"), &Value::string("100.96.0.1"));
        assert_eq!(state.get("status"), &Value::string("pending"));
        assert_eq!(state.get("public_key"), &Value::Null);
        assert_eq!(state.get("labels").get("site"), &Value::string("home"));
        assert_eq!(Managed::<DeviceModel>::spec(&state).unwrap(), device.spec);
    }
}
