//! Managed resources: one [`Model`] per platform object kind, and the generic CRUD that turns
//! Terraform values into sdk specs and server answers back into Terraform values.

mod api_key;
mod application;
mod application_key;
pub(crate) mod device;
mod device_pool;
mod domain;
mod edge;
mod placement;

use std::fmt::Display;
use std::str::FromStr;

use async_trait::async_trait;
use edgible::client::Resource;
use edgible::model::{Validate, ValidationError};
use edgible::{Client, ClientError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics, client_error};
use crate::schema::{Attribute, Block, Schema, validation_error};
use crate::value::Value;

pub use api_key::ApiKeyModel;
pub use application::ApplicationModel;
pub use application_key::ApplicationKeyResource;
pub use device::DeviceModel;
pub use device_pool::DevicePoolModel;
pub use domain::DomainModel;
pub use edge::EdgeModel;
pub use placement::PlacementModel;

/// A resource type as the provider service sees it.
#[async_trait]
pub trait ManagedResource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> &Schema;
    /// Checks a configuration, which may hold unknown values: per-value rules, the rules that
    /// span values, and, once everything is known, the full model validation.
    fn validate(&self, config: &Value) -> Diagnostics;
    async fn create(&self, client: &Client, planned: &Value) -> Result<Value, Diagnostics>;
    /// The object with this id (as `terraform import` gives it), or `None` when it no longer
    /// exists.
    async fn read(&self, client: &Client, id: &str) -> Result<Option<Value>, Diagnostics>;
    /// The object a state describes, or `None` when it no longer exists. Objects found by
    /// their id alone need nothing but `read`; objects below another one (an application's
    /// keys) find their parent in the state.
    async fn refresh(&self, client: &Client, current: &Value) -> Result<Option<Value>, Diagnostics> {
        self.read(client, current.get("id").as_str().unwrap_or_default()).await
    }
    /// Writes the planned state. An update may fail after the server changed the object (a
    /// placement whose migration failed): the error then carries the object as it is now.
    async fn update(&self, client: &Client, prior: &Value, planned: &Value) -> Result<Value, WriteError>;
    async fn delete(&self, client: &Client, prior: &Value) -> Result<(), Diagnostics>;
}

/// A failed write, and the object as it is now when the failure came after the server changed
/// it: Terraform keeps that state instead of the prior one, so that it shows what really runs.
#[derive(Debug)]
pub struct WriteError {
    pub diagnostics: Diagnostics,
    pub state: Option<Value>,
}

impl From<Diagnostics> for WriteError {
    fn from(diagnostics: Diagnostics) -> Self {
        Self { diagnostics, state: None }
    }
}

/// Every resource type of the provider.
pub fn all() -> Vec<Box<dyn ManagedResource>> {
    vec![
        Box::new(Managed::<DevicePoolModel>::new()),
        Box::new(Managed::<DeviceModel>::new()),
        Box::new(Managed::<ApplicationModel>::new()),
        Box::new(Managed::<PlacementModel>::new()),
        Box::new(Managed::<ApiKeyModel>::new()),
        Box::new(Managed::<EdgeModel>::new()),
        Box::new(Managed::<DomainModel>::new()),
        Box::new(ApplicationKeyResource),
    ]
}

/// How one platform object kind maps to a Terraform resource.
pub trait Model: Send + Sync + 'static {
    type Object: Resource<Spec = Self::Spec> + Serialize;
    type Spec: Serialize + DeserializeOwned + Validate + Send + Sync;
    const TYPE_NAME: &'static str;
    /// What users call the object in messages ("application").
    const NOUN: &'static str;

    fn schema() -> &'static Schema;

    /// Rules spanning several values that deserve a clearer message than the model's parse
    /// error (which variant of a block, which attributes go with a strategy). Runs on
    /// configurations that may hold unknowns.
    fn check(_config: &Value) -> Diagnostics {
        Diagnostics::new()
    }

    /// The object as the JSON of its state: the spec's fields at the top, plus `id`,
    /// `revision` and whatever else the schema computes.
    fn state_json(object: &Self::Object) -> serde_json::Value {
        flattened_state_json(object)
    }

    /// The object a creation answered, and the write-once values only that answer carries.
    fn created(created: <Self::Object as Resource>::Created) -> (Self::Object, Vec<(&'static str, Value)>);

    /// What follows an update the server accepted, before the apply ends (a placement waits for
    /// the migration the update started). `planned` holds the provider's own settings. On
    /// failure: the diagnostics and, when it could be read, the object as it is now.
    fn after_update(
        _client: &Client,
        object: Self::Object,
        _planned: &Value,
    ) -> impl std::future::Future<Output = Result<Self::Object, (Option<Self::Object>, Diagnostics)>> + Send {
        async { Ok(object) }
    }

    /// Computed values that live beside the object rather than in it (an application's
    /// certificate, from its status), read on every refresh. They only change on a refresh:
    /// an apply keeps what the plan knew, so they never make an apply inconsistent.
    fn observed(
        _client: &Client,
        _object: &Self::Object,
    ) -> impl std::future::Future<Output = Result<Vec<(&'static str, Value)>, ClientError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// The default state JSON: `spec` flattened, `id` and `revision` beside it.
pub fn flattened_state_json(object: &impl Serialize) -> serde_json::Value {
    let json = serde_json::to_value(object).unwrap_or_default();
    let mut state = match json.get("spec") {
        Some(serde_json::Value::Object(spec)) => spec.clone(),
        _ => serde_json::Map::new(),
    };
    for name in ["id", "revision"] {
        if let Some(value) = json.get(name) {
            state.insert(name.to_owned(), value.clone());
        }
    }
    serde_json::Value::Object(state)
}

/// The generic resource over a [`Model`].
pub struct Managed<M>(std::marker::PhantomData<M>);

impl<M: Model> Managed<M> {
    pub fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<M: Model> Default for Managed<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// Attributes the user writes, which make up the spec (the provider's own settings do not).
fn is_spec_attribute(attribute: &Attribute) -> bool {
    !attribute.is_computed_only() && !attribute.local
}

impl<M: Model> Managed<M>
where
    <M::Object as Resource>::Id: FromStr<Err = ValidationError> + Display,
{
    fn block() -> &'static Block {
        &M::schema().block
    }

    /// The spec a (planned) value describes, validated like the server validates it.
    pub fn spec(value: &Value) -> Result<M::Spec, Diagnostics> {
        let (json, _) = Self::block().to_model_json(value, &is_spec_attribute);
        edgible::model::parse_json::<M::Spec>(json.to_string().as_bytes())
            .map_err(|error| validation_error(Self::block(), &error).into())
    }

    /// The state of an object, in canonical form.
    pub fn state(object: &M::Object) -> Result<Value, Diagnostics> {
        Self::block().from_model_json(&M::state_json(object)).map_err(|error| {
            Diagnostic::error(
                format!("Unexpected {} from the server", M::NOUN),
                format!("The server's answer does not fit the schema of {}: {error}", M::TYPE_NAME),
            )
            .into()
        })
    }

    fn id(value: &Value) -> Result<<M::Object as Resource>::Id, Diagnostics> {
        let text = value.get("id").as_str().unwrap_or_default();
        Self::parse_id(text)
    }

    fn parse_id(text: &str) -> Result<<M::Object as Resource>::Id, Diagnostics> {
        text.parse().map_err(|error: ValidationError| {
            Diagnostic::error_at(
                AttributePath::attribute("id"),
                format!("Invalid {} id", M::NOUN),
                format!("{}. Import {} by the id the API shows for it.", error.message, M::TYPE_NAME),
            )
            .into()
        })
    }

    fn failed(action: &str, error: &ClientError) -> Diagnostics {
        client_error(&format!("{action} the {}", M::NOUN), error, |field| Self::block().path_of(field)).into()
    }

    /// The observed values right after a write, for the ones the plan left unknown (all of
    /// them on a creation; those that change on write on an update); the apply keeps the
    /// ones the plan knew. The object exists by now, so failing to read them must not fail
    /// the apply (Terraform would lose the object): they stay null until the next refresh.
    fn merge_observed_after_write(state: &mut Value, observed: Result<Vec<(&'static str, Value)>, ClientError>) {
        if let Ok(observed) = observed {
            for (name, value) in observed {
                state.set(name, value);
            }
        }
    }
}

#[async_trait]
impl<M: Model> ManagedResource for Managed<M>
where
    <M::Object as Resource>::Id: FromStr<Err = ValidationError> + Display,
{
    fn type_name(&self) -> &'static str {
        M::TYPE_NAME
    }

    fn schema(&self) -> &Schema {
        M::schema()
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let block = Self::block();
        let mut diagnostics = block.check_values(config, &AttributePath::root());
        diagnostics.extend(M::check(config));
        if diagnostics.has_errors() {
            return diagnostics;
        }
        let (json, known) = block.to_model_json(config, &is_spec_attribute);
        if known && let Err(error) = edgible::model::parse_json::<M::Spec>(json.to_string().as_bytes()) {
            diagnostics.push(validation_error(block, &error));
        }
        diagnostics
    }

    async fn create(&self, client: &Client, planned: &Value) -> Result<Value, Diagnostics> {
        let spec = Self::spec(planned)?;
        let created = client.create::<M::Object>(&spec).await.map_err(|error| Self::failed("create", &error))?;
        let (object, write_once) = M::created(created);
        let mut state = Self::state(&object)?;
        for (name, value) in write_once {
            state.set(name, value);
        }
        let observed = M::observed(client, &object).await;
        Self::merge_observed_after_write(&mut state, observed);
        Ok(state)
    }

    async fn read(&self, client: &Client, id: &str) -> Result<Option<Value>, Diagnostics> {
        let id = Self::parse_id(id)?;
        match client.get::<M::Object>(&id).await {
            Ok(object) => {
                let mut state = Self::state(&object)?;
                let observed = M::observed(client, &object).await.map_err(|error| Self::failed("read", &error))?;
                for (name, value) in observed {
                    state.set(name, value);
                }
                Ok(Some(state))
            }
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(Self::failed("read", &error)),
        }
    }

    async fn update(&self, client: &Client, prior: &Value, planned: &Value) -> Result<Value, WriteError> {
        if crate::planning::only_local_changes(Self::block(), prior, planned) {
            // Only the provider's own settings change: there is nothing to write.
            return Ok(planned.clone());
        }
        let id = Self::id(prior)?;
        let spec = Self::spec(planned)?;
        let revision = prior.get("revision").as_i64().and_then(|revision| u64::try_from(revision).ok());
        let object =
            client.update::<M::Object>(&id, revision, &spec).await.map_err(|error| Self::failed("update", &error))?;
        let object = match M::after_update(client, object, planned).await {
            Ok(object) => object,
            Err((now, diagnostics)) => {
                let state = now.and_then(|object| Self::state(&object).ok());
                return Err(WriteError { diagnostics, state });
            }
        };
        let mut state = Self::state(&object)?;
        let observed = M::observed(client, &object).await;
        Self::merge_observed_after_write(&mut state, observed);
        Ok(state)
    }

    async fn delete(&self, client: &Client, prior: &Value) -> Result<(), Diagnostics> {
        let id = Self::id(prior)?;
        match client.delete::<M::Object>(&id).await {
            Ok(()) => Ok(()),
            // Already gone: what destroy wanted.
            Err(error) if error.is_not_found() => Ok(()),
            Err(error) => Err(Self::failed("delete", &error)),
        }
    }
}

/// The common computed attributes of every resource.
pub fn id_attribute() -> Attribute {
    Attribute::computed("id", crate::value::Type::String, "The object's id (a UUID), assigned by the server.")
}

pub fn revision_attribute() -> Attribute {
    Attribute::computed(
        "revision",
        crate::value::Type::Number,
        "The server-wide revision of the object's last change; grows with every update.",
    )
    .changes_on_write()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_has_id_and_revision() {
        for resource in all() {
            let block = &resource.schema().block;
            for name in ["id", "revision"] {
                let attribute =
                    block.find_attribute(name).unwrap_or_else(|| panic!("{} lacks {name}", resource.type_name()));
                assert!(attribute.is_computed_only());
            }
            assert!(resource.type_name().starts_with("edgible_"));
        }
    }
}
