//! `edgible_application_key`: a key that passes one application's `api_key` access policy.
//!
//! Application keys live below their application (`/v1/applications/{id}/keys/{key_id}`), so
//! they do not fit the generic [`Model`](super::Model) CRUD, whose objects have one flat
//! collection: this resource implements [`ManagedResource`] itself. Keys cannot be changed,
//! so every attribute the user sets replaces the key. A refresh reads the key through the
//! `application_id` in state; an import takes `APPLICATION_ID/KEY_ID`.

use std::sync::LazyLock;

use async_trait::async_trait;
use edgible::model::{ApplicationId, ApplicationKey, ApplicationKeyId, ApplicationKeySpec, Name};
use edgible::{Client, ClientError};

use super::{ManagedResource, WriteError, flattened_state_json, id_attribute, revision_attribute};
use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics, client_error};
use crate::resources::application::parse_timestamp;
use crate::schema::{Attribute, Block, Check, Schema, parses, validation_error};
use crate::value::{Type, Value};

const TYPE_NAME: &str = "edgible_application_key";

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new(
            "A key that lets requests through one application's `api_key` access policy. Managing keys needs a \
             provider key with the `write` scope. Any change replaces the key.",
        )
        .attribute(id_attribute())
        .attribute(revision_attribute())
        .attribute(
            Attribute::required("application_id", Type::String, "The application the key opens.")
                .check(Check::Parse(parses::<ApplicationId>))
                .requires_replace(),
        )
        .attribute(
            Attribute::required("name", Type::String, "Name of the key, to tell keys apart.")
                .check(Check::Parse(parses::<Name>))
                .requires_replace(),
        )
        .attribute(
            Attribute::optional("expires_at", Type::String, "When the key stops working (RFC 3339); never if unset.")
                .timestamp()
                .check(Check::Parse(parse_timestamp))
                .requires_replace(),
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
                "The key itself, sent as `Authorization: Bearer <secret>` or `X-Edgible-Key: <secret>`. Known only to \
                 the Terraform run that created the key, and kept in state (imported keys have none).",
            )
            .sensitive()
            .write_once(),
        ),
    )
});

pub struct ApplicationKeyResource;

impl ApplicationKeyResource {
    fn block() -> &'static Block {
        &SCHEMA.block
    }

    /// The spec a (planned) value describes: every attribute the user sets but the
    /// application, which is the key's place rather than part of it.
    fn spec_json(value: &Value) -> (serde_json::Value, bool) {
        Self::block()
            .to_model_json(value, &|attribute| !attribute.is_computed_only() && attribute.name != "application_id")
    }

    fn spec(value: &Value) -> Result<ApplicationKeySpec, Diagnostics> {
        let (json, _) = Self::spec_json(value);
        edgible::model::parse_json::<ApplicationKeySpec>(json.to_string().as_bytes())
            .map_err(|error| validation_error(Self::block(), &error).into())
    }

    fn application_id(value: &Value) -> Result<ApplicationId, Diagnostics> {
        value.get("application_id").as_str().unwrap_or_default().parse().map_err(
            |error: edgible::model::ValidationError| {
                Diagnostic::error_at(
                    AttributePath::attribute("application_id"),
                    "Invalid application id",
                    error.message,
                )
                .into()
            },
        )
    }

    fn key_id(text: &str) -> Result<ApplicationKeyId, Diagnostics> {
        text.parse().map_err(|error: edgible::model::ValidationError| {
            Diagnostic::error_at(AttributePath::attribute("id"), "Invalid application key id", error.message).into()
        })
    }

    /// The state of a key, in canonical form.
    pub fn state(key: &ApplicationKey) -> Result<Value, Diagnostics> {
        let mut json = flattened_state_json(key);
        if let serde_json::Value::Object(state) = &mut json {
            state.insert("application_id".to_owned(), serde_json::Value::String(key.application_id.to_string()));
            state.insert("prefix".to_owned(), serde_json::Value::String(key.prefix.clone()));
        }
        Self::block().from_model_json(&json).map_err(|error| {
            Diagnostic::error(
                "Unexpected application key from the server",
                format!("The server's answer does not fit the schema of {TYPE_NAME}: {error}"),
            )
            .into()
        })
    }

    fn failed(action: &str, error: &ClientError) -> Diagnostics {
        client_error(&format!("{action} the application key"), error, |field| Self::block().path_of(field)).into()
    }

    async fn fetch(
        client: &Client,
        application: ApplicationId,
        key: ApplicationKeyId,
    ) -> Result<Option<Value>, Diagnostics> {
        match client.application_key(&application, &key).await {
            Ok(key) => Self::state(&key).map(Some),
            // The key or its whole application is gone.
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(Self::failed("read", &error)),
        }
    }
}

#[async_trait]
impl ManagedResource for ApplicationKeyResource {
    fn type_name(&self) -> &'static str {
        TYPE_NAME
    }

    fn schema(&self) -> &Schema {
        &SCHEMA
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut diagnostics = Self::block().check_values(config, &AttributePath::root());
        if diagnostics.has_errors() {
            return diagnostics;
        }
        let (json, known) = Self::spec_json(config);
        if known && let Err(error) = edgible::model::parse_json::<ApplicationKeySpec>(json.to_string().as_bytes()) {
            diagnostics.push(validation_error(Self::block(), &error));
        }
        diagnostics
    }

    async fn create(&self, client: &Client, planned: &Value) -> Result<Value, Diagnostics> {
        let application = Self::application_id(planned)?;
        let spec = Self::spec(planned)?;
        let created =
            client.create_application_key(&application, &spec).await.map_err(|error| Self::failed("create", &error))?;
        let mut state = Self::state(&created.application_key)?;
        state.set("secret", Value::String(created.secret));
        Ok(state)
    }

    /// An import: the id is `APPLICATION_ID/KEY_ID`, since a key is found through its
    /// application.
    async fn read(&self, client: &Client, id: &str) -> Result<Option<Value>, Diagnostics> {
        let Some((application, key)) = id.split_once('/') else {
            return Err(Diagnostic::error(
                "Invalid import id",
                format!(
                    "{TYPE_NAME} is imported as APPLICATION_ID/KEY_ID (both UUIDs, as the API and `edgible app key \
                     list` show them), not {id:?}."
                ),
            )
            .into());
        };
        let application = application.trim().parse::<ApplicationId>().map_err(|error| {
            Diagnostics::from(Diagnostic::error("Invalid import id", format!("the application id: {}", error.message)))
        })?;
        let key = Self::key_id(key.trim())?;
        Self::fetch(client, application, key).await
    }

    async fn refresh(&self, client: &Client, current: &Value) -> Result<Option<Value>, Diagnostics> {
        let application = Self::application_id(current)?;
        let key = Self::key_id(current.get("id").as_str().unwrap_or_default())?;
        Self::fetch(client, application, key).await
    }

    /// Never planned: every attribute the user sets requires a replacement.
    async fn update(&self, _client: &Client, _prior: &Value, _planned: &Value) -> Result<Value, WriteError> {
        Err(Diagnostics::from(Diagnostic::error(
            "Application keys cannot be changed",
            "An application key is replaced, not updated; this is a bug in the provider's plan.",
        ))
        .into())
    }

    async fn delete(&self, client: &Client, prior: &Value) -> Result<(), Diagnostics> {
        let application = Self::application_id(prior)?;
        let key = Self::key_id(prior.get("id").as_str().unwrap_or_default())?;
        match client.delete_application_key(&application, &key).await {
            Ok(()) => Ok(()),
            // Already gone (or its application is): what destroy wanted.
            Err(error) if error.is_not_found() => Ok(()),
            Err(error) => Err(Self::failed("delete", &error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planning;

    fn config(json: serde_json::Value) -> Value {
        Value::from_json(&json, &SCHEMA.value_type()).unwrap()
    }

    fn paths(diagnostics: &Diagnostics) -> Vec<String> {
        diagnostics.0.iter().map(|d| d.path.as_ref().map(ToString::to_string).unwrap_or_default()).collect()
    }

    fn key() -> ApplicationKey {
        ApplicationKey {
            id: ApplicationKeyId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            application_id: ApplicationId::new(),
            revision: 5,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            prefix: "edgak_12".into(),
            spec: ApplicationKeySpec {
                name: "ci".parse().unwrap(),
                expires_at: Some("2030-01-01T00:00:00Z".parse().unwrap()),
            },
        }
    }

    #[test]
    fn values_are_checked_at_their_attribute() {
        let config = config(serde_json::json!({
            "application_id": "not-a-uuid", "name": "Bad Name", "expires_at": "tomorrow",
        }));
        assert_eq!(paths(&ApplicationKeyResource.validate(&config)), ["application_id", "name", "expires_at"]);
    }

    #[test]
    fn a_valid_configuration_becomes_a_spec_without_the_application() {
        let value = config(serde_json::json!({
            "application_id": ApplicationId::new().to_string(), "name": "ci", "expires_at": "2030-01-01T00:00:00Z",
        }));
        assert!(ApplicationKeyResource.validate(&value).is_empty());
        let spec = ApplicationKeyResource::spec(&value).unwrap();
        assert_eq!(spec.name.as_str(), "ci");
        assert!(spec.expires_at.is_some());
    }

    #[test]
    fn a_key_reads_back_with_its_application_and_prefix() {
        let key = key();
        let state = ApplicationKeyResource::state(&key).unwrap();
        assert_eq!(state.get("id"), &Value::string(key.id.to_string()));
        assert_eq!(state.get("application_id"), &Value::string(key.application_id.to_string()));
        assert_eq!(state.get("prefix"), &Value::string("edgak_12"));
        assert_eq!(state.get("revision"), &Value::int(5));
        assert_eq!(state.get("secret"), &Value::Null);
        assert_eq!(ApplicationKeyResource::spec(&state).unwrap(), key.spec);
    }

    #[test]
    fn every_change_replaces_the_key_and_keeps_nothing_computed() {
        let key = key();
        let mut prior = ApplicationKeyResource::state(&key).unwrap();
        prior.set("secret", Value::string("edgak_secret"));
        for (name, changed) in [
            ("name", Value::string("other")),
            ("expires_at", Value::string("2031-01-01T00:00:00Z")),
            ("application_id", Value::string(ApplicationId::new().to_string())),
        ] {
            let mut proposed = prior.clone();
            proposed.set(name, changed);
            let outcome = planning::plan(&SCHEMA.block, &prior, &proposed, &proposed);
            assert_eq!(outcome.requires_replace, vec![AttributePath::attribute(name)]);
            for computed in ["id", "secret", "prefix"] {
                assert!(outcome.planned.get(computed).is_unknown(), "{computed} is new after replacing {name}");
            }
        }
        // The same instant written another way is no change.
        let mut proposed = prior.clone();
        proposed.set("expires_at", Value::string("2030-01-01T01:00:00+01:00"));
        let outcome = planning::plan(&SCHEMA.block, &prior, &proposed, &proposed);
        assert!(outcome.requires_replace.is_empty());
        assert_eq!(outcome.planned, prior);
    }

    #[tokio::test]
    async fn an_import_id_names_the_application_too() {
        let client = Client::new("http://127.0.0.1:9", "edg_test").unwrap();
        let error = ApplicationKeyResource.read(&client, &ApplicationKeyId::new().to_string()).await.unwrap_err();
        assert!(error.0[0].detail.contains("APPLICATION_ID/KEY_ID"), "{error}");
        let error = ApplicationKeyResource.read(&client, "nope/nope").await.unwrap_err();
        assert!(error.0[0].detail.contains("application id"), "{error}");
    }
}
