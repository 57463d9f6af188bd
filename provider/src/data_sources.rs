//! Data sources: read-only views of platform objects for use in configurations.

mod device;
mod device_pool;
mod organization;

use std::fmt::Display;
use std::str::FromStr;

use async_trait::async_trait;
use edgible::client::Resource;
use edgible::model::ValidationError;
use edgible::{Client, ClientError};

use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics, client_error};
use crate::schema::{Attribute, Check, Schema};
use crate::value::{Type, Value};

#[async_trait]
pub trait DataSource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> &Schema;
    fn validate(&self, config: &Value) -> Diagnostics;
    async fn read(&self, client: &Client, config: &Value) -> Result<Value, Diagnostics>;
}

/// Every data source of the provider.
pub fn all() -> Vec<Box<dyn DataSource>> {
    vec![Box::new(device::DeviceData), Box::new(device_pool::DevicePoolData), Box::new(organization::OrganizationData)]
}

/// The `id` and `name` attributes of a data source that finds an object by either.
fn lookup_attributes(parse_id: fn(&str) -> Result<(), ValidationError>) -> [Attribute; 2] {
    [
        Attribute::optional_computed("id", Type::String, "The id of the object to read. Give `id` or `name`.")
            .check(Check::Parse(parse_id)),
        Attribute::optional_computed("name", Type::String, "The name of the object to read. Give `id` or `name`."),
    ]
}

/// Exactly one of `id` and `name`, when both are known.
fn check_lookup(config: &Value) -> Diagnostics {
    let mut diagnostics = Diagnostics::new();
    match (config.get("id"), config.get("name")) {
        (Value::Null, Value::Null) => {
            diagnostics.push(Diagnostic::error("Missing lookup", "Give the `id` or the `name` of the object to read."))
        }
        (id, name) if !id.is_null() && !name.is_null() => diagnostics.push(Diagnostic::error_at(
            AttributePath::attribute("name"),
            "Conflicting lookup",
            "Give either `id` or `name`, not both.",
        )),
        _ => {}
    }
    diagnostics
}

/// Finds the object a lookup configuration names.
async fn find<R>(client: &Client, config: &Value, noun: &str) -> Result<R, Diagnostics>
where
    R: Resource,
    R::Id: FromStr<Err = ValidationError> + Display,
{
    let failed = |error: ClientError| -> Diagnostics {
        client_error(&format!("read the {noun}"), &error, |_| AttributePath::root()).into()
    };
    if let Some(id) = config.get("id").as_str() {
        let parsed: R::Id = id.parse().map_err(|error: ValidationError| {
            Diagnostics::from(Diagnostic::error_at(
                AttributePath::attribute("id"),
                format!("Invalid {noun} id"),
                error.message,
            ))
        })?;
        return match client.get::<R>(&parsed).await {
            Ok(object) => Ok(object),
            Err(error) if error.is_not_found() => Err(Diagnostic::error_at(
                AttributePath::attribute("id"),
                format!("No such {noun}"),
                format!("There is no {noun} with id {id} in the organization of the API key."),
            )
            .into()),
            Err(error) => Err(failed(error)),
        };
    }
    let name = config.get("name").as_str().unwrap_or_default();
    match client.find_by_name::<R>(name).await {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(Diagnostic::error_at(
            AttributePath::attribute("name"),
            format!("No such {noun}"),
            format!("There is no {noun} named {name:?} in the organization of the API key."),
        )
        .into()),
        Err(error) => Err(failed(error)),
    }
}
