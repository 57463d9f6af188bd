//! The provider configuration: where the Edgible server is and which API key to use.

use std::sync::LazyLock;

use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics};
use crate::schema::{Attribute, Block, Schema};
use crate::value::{Type, Value};

/// The environment variable `endpoint` defaults to.
pub const ENDPOINT_ENV: &str = "EDGIBLE_ENDPOINT";
/// The environment variable `api_key` defaults to.
pub const API_KEY_ENV: &str = "EDGIBLE_API_KEY";

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new("The Edgible provider manages the objects of one organization on an Edgible server.")
            .attribute(Attribute::optional(
                "endpoint",
                Type::String,
                "The server's URL, such as `https://edgible.example.com`. Defaults to the `EDGIBLE_ENDPOINT` \
                 environment variable.",
            ))
            .attribute(
                Attribute::optional(
                    "api_key",
                    Type::String,
                    "An API key of the organization to manage. Defaults to the `EDGIBLE_API_KEY` environment variable.",
                )
                .sensitive(),
            ),
    )
});

pub fn schema() -> &'static Schema {
    &SCHEMA
}

/// Where environment variables are read from; tests pass their own instead of mutating the
/// process environment.
pub type EnvSource = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A resolved provider configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    pub endpoint: String,
    pub api_key: String,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl ProviderConfig {
    /// The configuration's values, or the environment's where the configuration leaves them
    /// out. Every problem is reported at once, each at its attribute.
    pub fn resolve(config: &Value, env: &EnvSource) -> Result<Self, Diagnostics> {
        let mut diagnostics = Diagnostics::new();
        let endpoint = setting(config, env, "endpoint", ENDPOINT_ENV, &mut diagnostics);
        let api_key = setting(config, env, "api_key", API_KEY_ENV, &mut diagnostics);
        if let Some(endpoint) = &endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            diagnostics.push(Diagnostic::error_at(
                AttributePath::attribute("endpoint"),
                "Invalid value for endpoint",
                format!("{endpoint:?} is not an http:// or https:// URL of an Edgible server."),
            ));
        }
        match (endpoint, api_key) {
            (Some(endpoint), Some(api_key)) if !diagnostics.has_errors() => Ok(Self { endpoint, api_key }),
            _ => Err(diagnostics),
        }
    }
}

fn setting(
    config: &Value,
    env: &EnvSource,
    name: &str,
    env_name: &str,
    diagnostics: &mut Diagnostics,
) -> Option<String> {
    match config.get(name) {
        Value::String(value) if !value.trim().is_empty() => return Some(value.trim().to_owned()),
        Value::Unknown(_) => {
            diagnostics.push(Diagnostic::error_at(
                AttributePath::attribute(name),
                format!("The provider's {name} is not known yet"),
                format!(
                    "`{name}` depends on a value that is only known after apply. The provider needs it to plan; \
                     set it from a variable or the {env_name} environment variable."
                ),
            ));
            return None;
        }
        _ => {}
    }
    match env(env_name) {
        Some(value) if !value.trim().is_empty() => Some(value.trim().to_owned()),
        _ => {
            diagnostics.push(Diagnostic::error_at(
                AttributePath::attribute(name),
                format!("Missing {name}"),
                format!("Set `{name}` in the provider \"edgible\" block or the {env_name} environment variable."),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: Option<&str>, api_key: Option<&str>) -> Value {
        let mut value = Value::Map(Default::default());
        value.set("endpoint", endpoint.map(Value::string).unwrap_or(Value::Null));
        value.set("api_key", api_key.map(Value::string).unwrap_or(Value::Null));
        value
    }

    #[test]
    fn configuration_wins_over_the_environment() {
        let env = |name: &str| Some(format!("http://env/{name}"));
        let resolved = ProviderConfig::resolve(&config(Some("http://config"), None), &env).unwrap();
        assert_eq!(resolved.endpoint, "http://config");
        assert_eq!(resolved.api_key, "http://env/EDGIBLE_API_KEY");
    }

    #[test]
    fn missing_settings_name_the_attribute_and_the_variable() {
        let diagnostics = ProviderConfig::resolve(&config(None, None), &|_| None).unwrap_err();
        assert_eq!(diagnostics.0.len(), 2);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("endpoint")));
        assert!(diagnostics.0[0].detail.contains("EDGIBLE_ENDPOINT"));
        assert!(diagnostics.0[1].detail.contains("EDGIBLE_API_KEY"));
    }

    #[test]
    fn endpoints_must_be_urls() {
        let diagnostics =
            ProviderConfig::resolve(&config(Some("edgible.example.com"), Some("k")), &|_| None).unwrap_err();
        assert_eq!(diagnostics.0[0].summary, "Invalid value for endpoint");
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let resolved = ProviderConfig::resolve(&config(Some("http://x"), Some("edg_secret")), &|_| None).unwrap();
        assert!(!format!("{resolved:?}").contains("edg_secret"));
    }
}
