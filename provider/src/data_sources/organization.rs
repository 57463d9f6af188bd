//! The `edgible_organization` data source: the organization of the provider's API key.

use std::sync::LazyLock;

use async_trait::async_trait;
use edgible::Client;

use super::DataSource;
use crate::diagnostics::{AttributePath, Diagnostics, client_error};
use crate::schema::{Attribute, Block, Schema};
use crate::value::{Type, Value};

pub struct OrganizationData;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new("The organization the provider's API key belongs to.")
            .attribute(Attribute::computed("id", Type::String, "The organization's id."))
            .attribute(Attribute::computed("name", Type::String, "The organization's name."))
            .attribute(Attribute::computed(
                "operator",
                Type::Bool,
                "Whether it is an operator organization, whose cloud hosts run `cloud` placements.",
            ))
            .attribute(Attribute::computed(
                "revision",
                Type::Number,
                "The revision of the organization's last change.",
            )),
    )
});

#[async_trait]
impl DataSource for OrganizationData {
    fn type_name(&self) -> &'static str {
        "edgible_organization"
    }

    fn schema(&self) -> &Schema {
        &SCHEMA
    }

    fn validate(&self, _config: &Value) -> Diagnostics {
        Diagnostics::new()
    }

    async fn read(&self, client: &Client, _config: &Value) -> Result<Value, Diagnostics> {
        let whoami = client.whoami().await.map_err(|error| {
            Diagnostics::from(client_error("read the organization", &error, |_| AttributePath::root()))
        })?;
        let mut state = Value::Map(Default::default());
        state.set("id", Value::string(whoami.organization.id.to_string()));
        state.set("name", Value::string(whoami.organization.spec.name.to_string()));
        state.set("operator", Value::Bool(whoami.organization.spec.operator));
        state.set("revision", Value::int(i64::try_from(whoami.organization.revision).unwrap_or(i64::MAX)));
        Ok(state)
    }
}
