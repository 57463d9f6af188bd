//! The `edgible_device` data source.

use std::sync::LazyLock;

use async_trait::async_trait;
use edgible::Client;
use edgible::model::{Device, DeviceId};

use super::{DataSource, check_lookup, find, lookup_attributes};
use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::resources::device::{device_state_json, status_attributes};
use crate::schema::{Attribute, Block, Schema, parses};
use crate::value::{Type, Value};

pub struct DeviceData;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut block = Block::new("A device of the organization, found by id or name.");
    for attribute in lookup_attributes(parses::<DeviceId>) {
        block = block.attribute(attribute);
    }
    block = block
        .attribute(Attribute::computed("revision", Type::Number, "The revision of the device's last change."))
        .attribute(Attribute::computed("pool_id", Type::String, "The pool the device belongs to."))
        .attribute(Attribute::computed("labels", Type::map(Type::String), "The device's labels."));
    for attribute in status_attributes() {
        block = block.attribute(attribute);
    }
    Schema::new(block)
});

#[async_trait]
impl DataSource for DeviceData {
    fn type_name(&self) -> &'static str {
        "edgible_device"
    }

    fn schema(&self) -> &Schema {
        &SCHEMA
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut diagnostics = SCHEMA.block.check_values(config, &Default::default());
        diagnostics.extend(check_lookup(config));
        diagnostics
    }

    async fn read(&self, client: &Client, config: &Value) -> Result<Value, Diagnostics> {
        let device: Device = find(client, config, "device").await?;
        SCHEMA
            .block
            .from_model_json(&device_state_json(&device))
            .map_err(|error| Diagnostic::error("Unexpected device from the server", error.to_string()).into())
    }
}
