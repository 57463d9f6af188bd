//! `edgible_device_pool`: a group of devices sharing a tunnel network.

use std::sync::LazyLock;

use edgible::model::{DevicePool, DevicePoolSpec, Name, Region, TunnelCidr};

use super::{Model, id_attribute, revision_attribute};
use crate::schema::{Attribute, Block, Check, Schema, parses};
use crate::value::{Type, Value};

pub struct DevicePoolModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new("A pool of devices (or cloud hosts) whose tunnel addresses come from one IPv4 network.")
            .attribute(id_attribute())
            .attribute(revision_attribute())
            .attribute(
                Attribute::required("name", Type::String, "Unique name of the pool in the organization.")
                    .check(Check::Parse(parses::<Name>)),
            )
            .attribute(
                Attribute::required(
                    "tunnel_cidr",
                    Type::String,
                    "The IPv4 network (/8 to /30, such as `100.96.0.0/16`) each device's tunnel address is taken \
                     from. Changing it replaces the pool.",
                )
                .check(Check::Parse(parses::<TunnelCidr>))
                .requires_replace(),
            )
            .attribute(
                Attribute::defaulted(
                    "kind",
                    Type::String,
                    Value::string("devices"),
                    "`devices` (hardware users own) or `cloud` (operator cloud hosts). Changing it replaces the pool.",
                )
                .check(Check::OneOf(&["devices", "cloud"]))
                .requires_replace(),
            )
            .attribute(
                Attribute::optional("region", Type::String, "The region of the pool; required for `cloud` pools.")
                    .check(Check::Parse(parses::<Region>)),
            ),
    )
});

impl Model for DevicePoolModel {
    type Object = DevicePool;
    type Spec = DevicePoolSpec;
    const TYPE_NAME: &'static str = "edgible_device_pool";
    const NOUN: &'static str = "device pool";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn created(created: DevicePool) -> (DevicePool, Vec<(&'static str, Value)>) {
        (created, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};

    #[test]
    fn cloud_pools_need_a_region() {
        let config = Value::from_json(
            &serde_json::json!({"name": "edge", "tunnel_cidr": "100.96.0.0/16", "kind": "cloud"}),
            &SCHEMA.value_type(),
        )
        .unwrap();
        let diagnostics = Managed::<DevicePoolModel>::new().validate(&config);
        assert_eq!(diagnostics.0.len(), 1);
        assert_eq!(diagnostics.0[0].path.as_ref().map(ToString::to_string).as_deref(), Some("region"));
    }

    #[test]
    fn cidrs_are_checked_with_the_models_message() {
        let config = Value::from_json(
            &serde_json::json!({"name": "edge", "tunnel_cidr": "100.96.0.1/16"}),
            &SCHEMA.value_type(),
        )
        .unwrap();
        let diagnostics = Managed::<DevicePoolModel>::new().validate(&config);
        assert!(diagnostics.0[0].detail.contains("did you mean 100.96.0.0/16"), "{diagnostics}");
    }
}
