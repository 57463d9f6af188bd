//! `edgible_api_key`: a key for the API, whose secret is shown once.

use std::sync::LazyLock;

use edgible::model::{ApiKey, ApiKeyCreated, ApiKeySpec, Name};

use super::{Model, flattened_state_json, id_attribute, revision_attribute};
use crate::resources::application::parse_timestamp;
use crate::schema::{Attribute, Block, Check, Schema, parses};
use crate::value::{Type, Value};

pub struct ApiKeyModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new("An API key of the organization. Managing keys needs a key with the `admin` scope.")
            .attribute(id_attribute())
            .attribute(revision_attribute())
            .attribute(
                Attribute::required("name", Type::String, "Unique name of the key in the organization.")
                    .check(Check::Parse(parses::<Name>)),
            )
            .attribute(
                Attribute::required(
                    "scopes",
                    Type::set(Type::String),
                    "What the key may do: `read`, `write` (implies read) or `admin` (keys and members, implies write); \
                     or `access`, which only lets requests through the `api_key` access policy of the organization's \
                     applications and grants nothing on the API.",
                )
                .check(Check::OneOf(&["read", "write", "admin", "platform", "access"])),
            )
            .attribute(
                Attribute::optional(
                    "expires_at",
                    Type::String,
                    "When the key stops working (RFC 3339); never if unset.",
                )
                .timestamp()
                .check(Check::Parse(parse_timestamp)),
            )
            .attribute(Attribute::computed(
                "prefix",
                Type::String,
                "The first characters of the secret, to tell keys apart.",
            ))
            .attribute(
                Attribute::computed(
                    "secret",
                    Type::String,
                    "The key itself. Known only to the Terraform run that created the key (imported keys have none).",
                )
                .sensitive()
                .write_once(),
            ),
    )
});

impl Model for ApiKeyModel {
    type Object = ApiKey;
    type Spec = ApiKeySpec;
    const TYPE_NAME: &'static str = "edgible_api_key";
    const NOUN: &'static str = "API key";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn state_json(object: &ApiKey) -> serde_json::Value {
        let mut state = flattened_state_json(object);
        if let serde_json::Value::Object(state) = &mut state {
            state.insert("prefix".to_owned(), serde_json::Value::String(object.prefix.clone()));
        }
        state
    }

    fn created(created: ApiKeyCreated) -> (ApiKey, Vec<(&'static str, Value)>) {
        (created.api_key, vec![("secret", Value::String(created.secret))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};

    #[test]
    fn scopes_and_expiry_are_checked() {
        let config = Value::from_json(
            &serde_json::json!({"name": "ci", "scopes": ["read", "root"], "expires_at": "tomorrow"}),
            &SCHEMA.value_type(),
        )
        .unwrap();
        let diagnostics = Managed::<ApiKeyModel>::new().validate(&config);
        let paths: Vec<String> =
            diagnostics.0.iter().map(|d| d.path.as_ref().map(ToString::to_string).unwrap_or_default()).collect();
        assert_eq!(paths, ["scopes", "expires_at"]);
    }

    #[test]
    fn the_access_scope_is_accepted() {
        let config =
            Value::from_json(&serde_json::json!({"name": "robot", "scopes": ["access"]}), &SCHEMA.value_type())
                .unwrap();
        let resource = Managed::<ApiKeyModel>::new();
        assert!(resource.validate(&config).is_empty(), "{}", resource.validate(&config));
        let spec = Managed::<ApiKeyModel>::spec(&config).unwrap();
        assert_eq!(spec.scopes.into_iter().collect::<Vec<_>>(), [edgible::model::Scope::Access]);
    }
}
