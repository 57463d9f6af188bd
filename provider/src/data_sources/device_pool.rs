//! The `edgible_device_pool` data source.

use std::sync::LazyLock;

use async_trait::async_trait;
use edgible::Client;
use edgible::model::{DevicePool, DevicePoolId};

use super::{DataSource, check_lookup, find, lookup_attributes};
use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::resources::flattened_state_json;
use crate::schema::{Attribute, Block, Schema, parses};
use crate::value::{Type, Value};

pub struct DevicePoolData;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut block = Block::new("A device pool of the organization, found by id or name.");
    for attribute in lookup_attributes(parses::<DevicePoolId>) {
        block = block.attribute(attribute);
    }
    Schema::new(
        block
            .attribute(Attribute::computed("revision", Type::Number, "The revision of the pool's last change."))
            .attribute(Attribute::computed("tunnel_cidr", Type::String, "The pool's tunnel network."))
            .attribute(Attribute::computed("kind", Type::String, "`devices` or `cloud`."))
            .attribute(Attribute::computed("region", Type::String, "The pool's region, if any.")),
    )
});

#[async_trait]
impl DataSource for DevicePoolData {
    fn type_name(&self) -> &'static str {
        "edgible_device_pool"
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
        let pool: DevicePool = find(client, config, "device pool").await?;
        SCHEMA
            .block
            .from_model_json(&flattened_state_json(&pool))
            .map_err(|error| Diagnostic::error("Unexpected device pool from the server", error.to_string()).into())
    }
}
