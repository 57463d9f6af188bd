//! The `tfplugin6.Provider` gRPC service: decodes Terraform's requests, hands them to the
//! resource or data source they name, and encodes the answers.
//!
//! Errors never become gRPC failures: Terraform shows gRPC errors as bare "rpc error" text,
//! while diagnostics are shown with their summary, detail and source location.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgible::Client;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::config::{EnvSource, ProviderConfig};
use crate::data_sources::{self, DataSource};
use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics, client_error, error_chain};
use crate::planning::{self, Against};
use crate::proto::tfplugin6::{self as proto, provider_server::Provider};
use crate::resources::{self, ManagedResource, WriteError};
use crate::schema::Schema;
use crate::value::{Type, Value};

/// How long configuring waits for the server to answer before calling it unreachable.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EdgibleProvider {
    resources: BTreeMap<&'static str, Box<dyn ManagedResource>>,
    data_sources: BTreeMap<&'static str, Box<dyn DataSource>>,
    client: RwLock<Option<Client>>,
    env: Arc<EnvSource>,
    /// Set by `StopProvider`: running operations give up.
    stop: watch::Sender<bool>,
}

impl EdgibleProvider {
    /// A provider reading its defaults from `env`.
    pub fn new(env: Arc<EnvSource>) -> Self {
        Self {
            resources: resources::all().into_iter().map(|resource| (resource.type_name(), resource)).collect(),
            data_sources: data_sources::all().into_iter().map(|source| (source.type_name(), source)).collect(),
            client: RwLock::new(None),
            env,
            stop: watch::channel(false).0,
        }
    }

    pub fn resources(&self) -> impl Iterator<Item = &dyn ManagedResource> {
        self.resources.values().map(AsRef::as_ref)
    }

    pub fn data_sources(&self) -> impl Iterator<Item = &dyn DataSource> {
        self.data_sources.values().map(AsRef::as_ref)
    }

    fn resource(&self, type_name: &str) -> Result<&dyn ManagedResource, Diagnostics> {
        self.resources.get(type_name).map(AsRef::as_ref).ok_or_else(|| {
            Diagnostic::error("Unknown resource type", format!("This provider has no resource type {type_name:?}."))
                .into()
        })
    }

    fn data_source(&self, type_name: &str) -> Result<&dyn DataSource, Diagnostics> {
        self.data_sources.get(type_name).map(AsRef::as_ref).ok_or_else(|| {
            Diagnostic::error("Unknown data source", format!("This provider has no data source {type_name:?}.")).into()
        })
    }

    fn client(&self) -> Result<Client, Diagnostics> {
        let client =
            self.client.read().map(|client| client.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        client.ok_or_else(|| {
            Diagnostic::error(
                "The provider is not configured",
                "Terraform did not configure the edgible provider before using it.",
            )
            .into()
        })
    }

    /// Runs an operation unless `StopProvider` interrupts it first.
    async fn interruptible<T, E: From<Diagnostics>>(
        &self,
        operation: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            result = operation => result,
            _ = stop.wait_for(|stopped| *stopped) => Err(Diagnostics::from(Diagnostic::error(
                "Interrupted",
                "Terraform asked the provider to stop; the operation may or may not have reached the server.",
            )).into()),
        }
    }

    /// Resolves the configuration, checks that the server answers and accepts the key, and
    /// keeps the client for the operations that follow.
    async fn configure(&self, config: &Value) -> Result<(), Diagnostics> {
        let settings = ProviderConfig::resolve(config, self.env.as_ref())?;
        let client = Client::new(&settings.endpoint, &settings.api_key).map_err(|error| {
            Diagnostics::from(Diagnostic::error_at(
                AttributePath::attribute("endpoint"),
                "Invalid value for endpoint",
                error_chain(&error),
            ))
        })?;
        let whoami = tokio::time::timeout(CONFIGURE_TIMEOUT, client.whoami()).await.map_err(|_| {
            Diagnostics::from(Diagnostic::error_at(
                AttributePath::attribute("endpoint"),
                "Cannot reach the Edgible server",
                format!("{} did not answer within {} seconds.", settings.endpoint, CONFIGURE_TIMEOUT.as_secs()),
            ))
        })?;
        match whoami {
            Ok(whoami) => {
                tracing::info!(organization = %whoami.organization.spec.name, endpoint = %settings.endpoint, "configured");
            }
            Err(error) if error.status().is_none() => {
                return Err(Diagnostic::error_at(
                    AttributePath::attribute("endpoint"),
                    "Cannot reach the Edgible server",
                    format!(
                        "Could not connect to {}: {}. Check `endpoint` (or {}).",
                        settings.endpoint,
                        error_chain(&error),
                        crate::config::ENDPOINT_ENV
                    ),
                )
                .into());
            }
            Err(error) if error.status().is_some_and(|status| status.as_u16() == 401) => {
                return Err(Diagnostic::error_at(
                    AttributePath::attribute("api_key"),
                    "The Edgible server refused the API key",
                    format!(
                        "{} answered: {}. Check `api_key` (or {}).",
                        settings.endpoint,
                        error.message(),
                        crate::config::API_KEY_ENV
                    ),
                )
                .into());
            }
            Err(error) => {
                return Err(client_error("check the API key", &error, |_| AttributePath::root()).into());
            }
        }
        let mut slot = self.client.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(client);
        Ok(())
    }

    async fn read_resource(&self, type_name: &str, current: &Value) -> Result<Value, Diagnostics> {
        let resource = self.resource(type_name)?;
        if current.is_null() {
            return Ok(Value::Null);
        }
        let client = self.client()?;
        match self.interruptible(resource.refresh(&client, current)).await? {
            Some(fresh) => {
                Ok(planning::reconcile(&resource.schema().block, fresh, current, Against::Prior).unknowns_to_null())
            }
            // Deleted outside Terraform: a null state makes Terraform plan to create it again.
            None => Ok(Value::Null),
        }
    }

    fn plan_resource(
        &self,
        type_name: &str,
        prior: &Value,
        proposed: &Value,
        config: &Value,
    ) -> Result<planning::Plan, Diagnostics> {
        let resource = self.resource(type_name)?;
        if !proposed.is_null() {
            let diagnostics = resource.validate(config);
            if diagnostics.has_errors() {
                return Err(diagnostics);
            }
        }
        Ok(planning::plan(&resource.schema().block, prior, proposed, config))
    }

    /// The state after applying `planned`. A failed update may carry the object as it is now
    /// (shaped like the prior state), which Terraform keeps instead of the prior state.
    async fn apply_resource(&self, type_name: &str, prior: &Value, planned: &Value) -> Result<Value, WriteError> {
        let resource = self.resource(type_name)?;
        let client = self.client()?;
        let block = &resource.schema().block;
        if planned.is_null() {
            self.interruptible(resource.delete(&client, prior)).await?;
            return Ok(Value::Null);
        }
        let fresh = if prior.is_null() {
            self.interruptible(resource.create(&client, planned)).await?
        } else {
            self.interruptible(resource.update(&client, prior, planned)).await.map_err(|mut error| {
                error.state = error
                    .state
                    .map(|state| planning::reconcile(block, state, prior, Against::Prior).unknowns_to_null());
                error
            })?
        };
        Ok(planning::reconcile(block, fresh, planned, Against::Planned).unknowns_to_null())
    }

    async fn import_resource(&self, type_name: &str, id: &str) -> Result<Value, Diagnostics> {
        let resource = self.resource(type_name)?;
        let client = self.client()?;
        // An import has no configuration to point at: drop attribute paths.
        let read = self.interruptible(resource.read(&client, id.trim())).await.map_err(|mut diagnostics| {
            for diagnostic in &mut diagnostics.0 {
                diagnostic.path = None;
            }
            diagnostics
        })?;
        match read {
            Some(state) => Ok(state),
            None => Err(Diagnostic::error(
                "Cannot import a missing object",
                format!("There is no {type_name} with id {id} in the organization of the provider's API key."),
            )
            .into()),
        }
    }

    async fn read_data(&self, type_name: &str, config: &Value) -> Result<Value, Diagnostics> {
        let source = self.data_source(type_name)?;
        let diagnostics = source.validate(config);
        if diagnostics.has_errors() {
            return Err(diagnostics);
        }
        let client = self.client()?;
        let mut state = self.interruptible(source.read(&client, config)).await?;
        // What the configuration set must come back exactly as written.
        for attribute in &source.schema().block.attributes {
            let configured = config.get(attribute.name);
            if !configured.is_null() && !configured.is_unknown() {
                state.set(attribute.name, configured.clone());
            }
        }
        Ok(state)
    }
}

fn decode(value: Option<&proto::DynamicValue>, ty: &Type) -> Result<Value, Diagnostics> {
    let Some(value) = value else { return Ok(Value::Null) };
    let decoded = if !value.msgpack.is_empty() {
        Value::from_msgpack(&value.msgpack, ty)
    } else if !value.json.is_empty() {
        serde_json::from_slice::<serde_json::Value>(&value.json)
            .map_err(|error| crate::value::ValueError { path: String::new(), message: error.to_string() })
            .and_then(|json| Value::from_json(&json, ty))
    } else {
        Ok(Value::Null)
    };
    decoded.map_err(|error| {
        Diagnostic::error("Invalid value from Terraform", format!("The provider could not decode a value: {error}"))
            .into()
    })
}

fn encode(value: &Value, ty: &Type) -> Result<proto::DynamicValue, Diagnostics> {
    let msgpack = value.to_msgpack(ty).map_err(|error| {
        Diagnostics::from(Diagnostic::error("Provider bug", format!("The provider could not encode a value: {error}")))
    })?;
    Ok(proto::DynamicValue { msgpack, json: Vec::new() })
}

fn schema_type(schema: &Schema) -> Type {
    schema.value_type()
}

/// The type of a resource, or a diagnostic for an unknown one.
fn resource_type(provider: &EdgibleProvider, type_name: &str) -> Result<Type, Diagnostics> {
    provider.resource(type_name).map(|resource| schema_type(resource.schema()))
}

fn diagnostics_of<T>(result: &Result<T, Diagnostics>) -> Vec<proto::Diagnostic> {
    match result {
        Ok(_) => Vec::new(),
        Err(diagnostics) => diagnostics.to_proto(),
    }
}

#[tonic::async_trait]
impl Provider for EdgibleProvider {
    async fn get_metadata(
        &self,
        _request: Request<proto::get_metadata::Request>,
    ) -> Result<Response<proto::get_metadata::Response>, Status> {
        Ok(Response::new(proto::get_metadata::Response {
            server_capabilities: Some(proto::ServerCapabilities::default()),
            diagnostics: Vec::new(),
            data_sources: self
                .data_sources
                .keys()
                .map(|name| proto::get_metadata::DataSourceMetadata { type_name: (*name).to_owned() })
                .collect(),
            resources: self
                .resources
                .keys()
                .map(|name| proto::get_metadata::ResourceMetadata { type_name: (*name).to_owned() })
                .collect(),
        }))
    }

    async fn get_provider_schema(
        &self,
        _request: Request<proto::get_provider_schema::Request>,
    ) -> Result<Response<proto::get_provider_schema::Response>, Status> {
        Ok(Response::new(proto::get_provider_schema::Response {
            provider: Some(crate::config::schema().to_proto()),
            resource_schemas: self
                .resources
                .iter()
                .map(|(name, resource)| ((*name).to_owned(), resource.schema().to_proto()))
                .collect(),
            data_source_schemas: self
                .data_sources
                .iter()
                .map(|(name, source)| ((*name).to_owned(), source.schema().to_proto()))
                .collect(),
            diagnostics: Vec::new(),
            provider_meta: None,
            server_capabilities: Some(proto::ServerCapabilities::default()),
        }))
    }

    async fn validate_provider_config(
        &self,
        request: Request<proto::validate_provider_config::Request>,
    ) -> Result<Response<proto::validate_provider_config::Response>, Status> {
        let request = request.into_inner();
        let schema = crate::config::schema();
        let diagnostics = match decode(request.config.as_ref(), &schema.value_type()) {
            Ok(config) => schema.block.check_values(&config, &AttributePath::root()).to_proto(),
            Err(diagnostics) => diagnostics.to_proto(),
        };
        Ok(Response::new(proto::validate_provider_config::Response { diagnostics }))
    }

    async fn validate_resource_config(
        &self,
        request: Request<proto::validate_resource_config::Request>,
    ) -> Result<Response<proto::validate_resource_config::Response>, Status> {
        let request = request.into_inner();
        let result = self.resource(&request.type_name).and_then(|resource| {
            let config = decode(request.config.as_ref(), &schema_type(resource.schema()))?;
            let diagnostics = resource.validate(&config);
            if diagnostics.is_empty() { Ok(()) } else { Err(diagnostics) }
        });
        Ok(Response::new(proto::validate_resource_config::Response { diagnostics: diagnostics_of(&result) }))
    }

    async fn validate_data_resource_config(
        &self,
        request: Request<proto::validate_data_resource_config::Request>,
    ) -> Result<Response<proto::validate_data_resource_config::Response>, Status> {
        let request = request.into_inner();
        let result = self.data_source(&request.type_name).and_then(|source| {
            let config = decode(request.config.as_ref(), &schema_type(source.schema()))?;
            let diagnostics = source.validate(&config);
            if diagnostics.is_empty() { Ok(()) } else { Err(diagnostics) }
        });
        Ok(Response::new(proto::validate_data_resource_config::Response { diagnostics: diagnostics_of(&result) }))
    }

    async fn upgrade_resource_state(
        &self,
        request: Request<proto::upgrade_resource_state::Request>,
    ) -> Result<Response<proto::upgrade_resource_state::Response>, Status> {
        let request = request.into_inner();
        let result = (|| {
            let resource = self.resource(&request.type_name)?;
            let schema = resource.schema();
            if request.version > schema.version {
                return Err(Diagnostics::from(Diagnostic::error(
                    "State from a newer provider",
                    format!(
                        "The state of this {} was written by a newer version of the provider (schema {}, this one \
                         knows {}). Upgrade the provider.",
                        request.type_name, request.version, schema.version
                    ),
                )));
            }
            let raw = request.raw_state.unwrap_or_default();
            if raw.json.is_empty() {
                return Err(Diagnostic::error(
                    "Unsupported state format",
                    "The stored state is not JSON; it was not written by this provider.",
                )
                .into());
            }
            // Schema version 0 is the only one so far: the stored JSON already has the current
            // shape, minus attributes added since (which decode as null).
            let ty = schema_type(schema);
            let upgraded = decode(Some(&proto::DynamicValue { msgpack: Vec::new(), json: raw.json }), &ty)?;
            encode(&upgraded, &ty)
        })();
        let (upgraded_state, diagnostics) = match result {
            Ok(value) => (Some(value), Vec::new()),
            Err(diagnostics) => (None, diagnostics.to_proto()),
        };
        Ok(Response::new(proto::upgrade_resource_state::Response { upgraded_state, diagnostics }))
    }

    async fn configure_provider(
        &self,
        request: Request<proto::configure_provider::Request>,
    ) -> Result<Response<proto::configure_provider::Response>, Status> {
        let request = request.into_inner();
        let schema = crate::config::schema();
        let result = match decode(request.config.as_ref(), &schema.value_type()) {
            Ok(config) => self.configure(&config).await,
            Err(diagnostics) => Err(diagnostics),
        };
        Ok(Response::new(proto::configure_provider::Response { diagnostics: diagnostics_of(&result) }))
    }

    async fn read_resource(
        &self,
        request: Request<proto::read_resource::Request>,
    ) -> Result<Response<proto::read_resource::Response>, Status> {
        let request = request.into_inner();
        let result = async {
            let ty = resource_type(self, &request.type_name)?;
            let current = decode(request.current_state.as_ref(), &ty)?;
            let fresh = self.read_resource(&request.type_name, &current).await?;
            encode(&fresh, &ty)
        }
        .await;
        let (new_state, diagnostics) = match result {
            Ok(state) => (Some(state), Vec::new()),
            // On failure the prior state stays as it is.
            Err(diagnostics) => (request.current_state, diagnostics.to_proto()),
        };
        Ok(Response::new(proto::read_resource::Response { new_state, diagnostics, private: request.private }))
    }

    async fn plan_resource_change(
        &self,
        request: Request<proto::plan_resource_change::Request>,
    ) -> Result<Response<proto::plan_resource_change::Response>, Status> {
        let request = request.into_inner();
        let result = (|| {
            let ty = resource_type(self, &request.type_name)?;
            let prior = decode(request.prior_state.as_ref(), &ty)?;
            let proposed = decode(request.proposed_new_state.as_ref(), &ty)?;
            let config = decode(request.config.as_ref(), &ty)?;
            let plan = self.plan_resource(&request.type_name, &prior, &proposed, &config)?;
            Ok::<_, Diagnostics>((encode(&plan.planned, &ty)?, plan.requires_replace))
        })();
        let response = match result {
            Ok((planned, requires_replace)) => proto::plan_resource_change::Response {
                planned_state: Some(planned),
                requires_replace: requires_replace.iter().map(AttributePath::to_proto).collect(),
                planned_private: request.prior_private,
                diagnostics: Vec::new(),
            },
            Err(diagnostics) => {
                proto::plan_resource_change::Response { diagnostics: diagnostics.to_proto(), ..Default::default() }
            }
        };
        Ok(Response::new(response))
    }

    async fn apply_resource_change(
        &self,
        request: Request<proto::apply_resource_change::Request>,
    ) -> Result<Response<proto::apply_resource_change::Response>, Status> {
        let request = request.into_inner();
        // Errors come with the object as it is now when the server changed it anyway.
        let without_state = |diagnostics| (None, diagnostics);
        let result = async {
            let ty = resource_type(self, &request.type_name).map_err(without_state)?;
            let prior = decode(request.prior_state.as_ref(), &ty).map_err(without_state)?;
            let planned = decode(request.planned_state.as_ref(), &ty).map_err(without_state)?;
            let state = self.apply_resource(&request.type_name, &prior, &planned).await.map_err(|error| {
                let now = error.state.and_then(|state| encode(&state, &ty).ok());
                (now, error.diagnostics)
            })?;
            encode(&state, &ty).map_err(without_state)
        }
        .await;
        let response = match result {
            Ok(state) => proto::apply_resource_change::Response {
                new_state: Some(state),
                private: request.planned_private,
                diagnostics: Vec::new(),
            },
            // A failed apply leaves the object as it was: absent for a creation, the prior
            // state for an update or a deletion; unless the update failed after the server
            // changed the object (a failed migration), which the state then shows.
            Err((now, diagnostics)) => proto::apply_resource_change::Response {
                new_state: now.or(request.prior_state),
                private: Vec::new(),
                diagnostics: diagnostics.to_proto(),
            },
        };
        Ok(Response::new(response))
    }

    async fn import_resource_state(
        &self,
        request: Request<proto::import_resource_state::Request>,
    ) -> Result<Response<proto::import_resource_state::Response>, Status> {
        let request = request.into_inner();
        let result = async {
            let ty = resource_type(self, &request.type_name)?;
            let state = self.import_resource(&request.type_name, &request.id).await?;
            encode(&state, &ty)
        }
        .await;
        let response = match result {
            Ok(state) => proto::import_resource_state::Response {
                imported_resources: vec![proto::import_resource_state::ImportedResource {
                    type_name: request.type_name,
                    state: Some(state),
                    private: Vec::new(),
                }],
                diagnostics: Vec::new(),
            },
            Err(diagnostics) => proto::import_resource_state::Response {
                imported_resources: Vec::new(),
                diagnostics: diagnostics.to_proto(),
            },
        };
        Ok(Response::new(response))
    }

    async fn move_resource_state(
        &self,
        request: Request<proto::move_resource_state::Request>,
    ) -> Result<Response<proto::move_resource_state::Response>, Status> {
        let request = request.into_inner();
        let diagnostic = Diagnostic::error(
            "Moving between resource types is not supported",
            format!(
                "{} cannot be moved to {}; remove the old resource from state and import the object instead.",
                request.source_type_name, request.target_type_name
            ),
        );
        Ok(Response::new(proto::move_resource_state::Response {
            target_state: None,
            diagnostics: vec![diagnostic.to_proto()],
        }))
    }

    async fn read_data_source(
        &self,
        request: Request<proto::read_data_source::Request>,
    ) -> Result<Response<proto::read_data_source::Response>, Status> {
        let request = request.into_inner();
        let result = async {
            let source = self.data_source(&request.type_name)?;
            let ty = schema_type(source.schema());
            let config = decode(request.config.as_ref(), &ty)?;
            let state = self.read_data(&request.type_name, &config).await?;
            encode(&state, &ty)
        }
        .await;
        let (state, diagnostics) = match result {
            Ok(state) => (Some(state), Vec::new()),
            Err(diagnostics) => (None, diagnostics.to_proto()),
        };
        Ok(Response::new(proto::read_data_source::Response { state, diagnostics }))
    }

    async fn get_functions(
        &self,
        _request: Request<proto::get_functions::Request>,
    ) -> Result<Response<proto::get_functions::Response>, Status> {
        Ok(Response::new(proto::get_functions::Response { diagnostics: Vec::new() }))
    }

    async fn call_function(
        &self,
        request: Request<proto::call_function::Request>,
    ) -> Result<Response<proto::call_function::Response>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(proto::call_function::Response {
            result: None,
            error: Some(proto::FunctionError { text: format!("the edgible provider has no function {name:?}") }),
        }))
    }

    async fn stop_provider(
        &self,
        _request: Request<proto::stop_provider::Request>,
    ) -> Result<Response<proto::stop_provider::Response>, Status> {
        self.stop.send_replace(true);
        tracing::info!("Terraform asked the provider to stop");
        Ok(Response::new(proto::stop_provider::Response { error: String::new() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> EdgibleProvider {
        EdgibleProvider::new(Arc::new(|_: &str| None))
    }

    fn dynamic(value: &Value, ty: &Type) -> Option<proto::DynamicValue> {
        Some(proto::DynamicValue { msgpack: value.to_msgpack(ty).unwrap(), json: Vec::new() })
    }

    #[tokio::test]
    async fn the_schema_lists_every_resource_and_data_source() {
        let response = provider().get_provider_schema(Request::new(Default::default())).await.unwrap().into_inner();
        let mut resources: Vec<&str> = response.resource_schemas.keys().map(String::as_str).collect();
        resources.sort_unstable();
        assert_eq!(
            resources,
            [
                "edgible_api_key",
                "edgible_application",
                "edgible_application_key",
                "edgible_device",
                "edgible_device_pool",
                "edgible_domain",
                "edgible_edge",
                "edgible_placement"
            ]
        );
        let mut data_sources: Vec<&str> = response.data_source_schemas.keys().map(String::as_str).collect();
        data_sources.sort_unstable();
        assert_eq!(data_sources, ["edgible_device", "edgible_device_pool", "edgible_organization"]);
        let provider_block = response.provider.unwrap().block.unwrap();
        assert!(provider_block.attributes.iter().any(|attribute| attribute.name == "api_key" && attribute.sensitive));
    }

    #[tokio::test]
    async fn configuring_without_settings_names_both_attributes() {
        let schema = crate::config::schema();
        let config = Value::from_json(&serde_json::json!({}), &schema.value_type()).unwrap();
        let request = proto::configure_provider::Request {
            terraform_version: "1.11.4".into(),
            config: dynamic(&config, &schema.value_type()),
        };
        let response = provider().configure_provider(Request::new(request)).await.unwrap().into_inner();
        let summaries: Vec<&str> = response.diagnostics.iter().map(|d| d.summary.as_str()).collect();
        assert_eq!(summaries, ["Missing endpoint", "Missing api_key"]);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let schema = crate::config::schema();
        let config =
            Value::from_json(&serde_json::json!({"endpoint": endpoint, "api_key": "k"}), &schema.value_type()).unwrap();
        let request = proto::configure_provider::Request {
            terraform_version: String::new(),
            config: dynamic(&config, &schema.value_type()),
        };
        let response = provider().configure_provider(Request::new(request)).await.unwrap().into_inner();
        assert_eq!(response.diagnostics.len(), 1);
        let diagnostic = &response.diagnostics[0];
        assert_eq!(diagnostic.summary, "Cannot reach the Edgible server");
        assert!(diagnostic.detail.contains(&endpoint), "{}", diagnostic.detail);
        assert!(!diagnostic.detail.contains("stack backtrace"), "{}", diagnostic.detail);
    }

    #[tokio::test]
    async fn invalid_configurations_fail_validation_with_paths() {
        let provider = provider();
        let ty = provider.resource("edgible_application").unwrap().schema().value_type();
        let config = Value::from_json(
            &serde_json::json!({
                "name": "web",
                "hostnames": ["ok.example.test", "Not Valid"],
                "port": 8080,
                "workload": {"process": {"command": "/bin/web"}},
                "storage": [{"name": "data", "size_mib": 1, "mount_path": "relative"}],
            }),
            &ty,
        )
        .unwrap();
        let request = proto::validate_resource_config::Request {
            type_name: "edgible_application".into(),
            config: dynamic(&config, &ty),
        };
        let response = provider.validate_resource_config(Request::new(request)).await.unwrap().into_inner();
        let paths: Vec<String> = response
            .diagnostics
            .iter()
            .map(|diagnostic| {
                use proto::attribute_path::step::Selector;
                diagnostic
                    .attribute
                    .iter()
                    .flat_map(|path| &path.steps)
                    .map(|step| match &step.selector {
                        Some(Selector::AttributeName(name)) => format!(".{name}"),
                        Some(Selector::ElementKeyInt(index)) => format!("[{index}]"),
                        Some(Selector::ElementKeyString(key)) => format!("[{key:?}]"),
                        None => String::new(),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(paths, [".hostnames[1]", ".storage[0].mount_path"]);
    }

    #[tokio::test]
    async fn planning_a_creation_leaves_server_values_unknown() {
        let provider = provider();
        let ty = provider.resource("edgible_device_pool").unwrap().schema().value_type();
        let config =
            Value::from_json(&serde_json::json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}), &ty).unwrap();
        let request = proto::plan_resource_change::Request {
            type_name: "edgible_device_pool".into(),
            prior_state: dynamic(&Value::Null, &ty),
            proposed_new_state: dynamic(&config, &ty),
            config: dynamic(&config, &ty),
            prior_private: Vec::new(),
        };
        let response = provider.plan_resource_change(Request::new(request)).await.unwrap().into_inner();
        assert!(response.diagnostics.is_empty(), "{:?}", response.diagnostics);
        let planned = Value::from_msgpack(&response.planned_state.unwrap().msgpack, &ty).unwrap();
        assert!(planned.get("id").is_unknown());
        assert_eq!(planned.get("kind"), &Value::string("devices"));
    }

    #[tokio::test]
    async fn stopping_interrupts_running_operations() {
        let provider = provider();
        let slow = provider.interruptible(async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, Diagnostics>(())
        });
        let stop = async {
            provider.stop_provider(Request::new(Default::default())).await.unwrap();
        };
        let (result, ()) = tokio::join!(slow, stop);
        assert_eq!(result.unwrap_err().0[0].summary, "Interrupted");
    }
}
