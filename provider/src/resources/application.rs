//! `edgible_application`: a workload and how it is exposed.

use std::sync::LazyLock;

use edgible::model::{
    AbsolutePath, Application, ApplicationSpec, ApplicationStatus, EnvName, Hostname, HttpPath, Name,
};
use edgible::{Client, ClientError};

use super::{Model, id_attribute, revision_attribute};
use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics};
use crate::schema::{Attribute, Block, Check, NestedBlock, Schema, parses};
use crate::value::{Type, Value};

pub struct ApplicationModel;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new("An application: a workload running on a device or a cloud host, published at HTTPS hostnames.")
            .attribute(id_attribute())
            .attribute(revision_attribute())
            .attribute(
                Attribute::required("name", Type::String, "Unique name of the application in the organization.")
                    .check(Check::Parse(parses::<Name>)),
            )
            .attribute(
                Attribute::required(
                    "hostnames",
                    Type::list(Type::String),
                    "Public hostnames the application answers at (`app.example.com`, or a wildcard `*.example.com`). \
                     Unique across the platform.",
                )
                .check(Check::Parse(parses::<Hostname>)),
            )
            .attribute(
                Attribute::required(
                    "port",
                    Type::Number,
                    "The port the workload listens on (also given to it as `PORT`).",
                )
                .check(Check::Range(1, 65535)),
            )
            .attribute(env_attribute("Environment for the workload, whatever its kind; workload-level `env` wins."))
            .attribute(
                Attribute::defaulted(
                    "protocol",
                    Type::String,
                    Value::string("http"),
                    "What the device's proxy speaks to the workload after terminating TLS: `http` (HTTP/1.1 and \
                     HTTP/2, with access policies and `X-Forwarded-*` headers) or `tcp` (the decrypted stream as is).",
                )
                .check(Check::OneOf(&["http", "tcp"])),
            )
            .attribute(Attribute::computed(
                "certificate_status",
                Type::String,
                "The application's certificate as last refreshed: `valid`, `pending` (an ACME order is running) or \
                 `failed: <reason>` (the device keeps serving the previous one); null until its device asked for one.",
            ))
            .attribute(
                Attribute::computed(
                    "short_code",
                    Type::String,
                    "The code that passes the `short_code` access policy (the one set in `access.short_code.code`, or \
                     the one the server generated), read on every refresh, so a rotation through the API shows up; \
                     null without that policy.",
                )
                .sensitive()
                .changes_on_write(),
            )
            .attribute(Attribute::computed(
                "certificate_expires_at",
                Type::String,
                "When the certificate the server last issued expires (RFC 3339), as last refreshed; null until one \
                 was issued.",
            ))
            .block(NestedBlock::required("workload", workload_block()))
            .block(NestedBlock::single("health_check", health_check_block()))
            .block(NestedBlock::single("access", access_block()).empty_is_absent())
            .block(NestedBlock::list("storage", volume_block()))
            .block(NestedBlock::single("sleep", sleep_block()))
            .block(NestedBlock::single("resources", resources_block())),
    )
});

fn env_attribute(description: &'static str) -> Attribute {
    Attribute::optional("env", Type::map(Type::String), description).keys(parses::<EnvName>)
}

fn workload_block() -> Block {
    Block::new("What runs. Exactly one of `process`, `container` or `vm`.")
        .block(NestedBlock::single(
            "process",
            Block::new("A supervised process on the device.")
                .attribute(Attribute::required(
                    "command",
                    Type::String,
                    "The program to run, a path or a name looked up on the device's `PATH`.",
                ))
                .attribute(Attribute::optional("args", Type::list(Type::String), "Arguments to the program."))
                .attribute(env_attribute("Environment variables of the process."))
                .attribute(
                    Attribute::optional("working_dir", Type::String, "Absolute working directory.")
                        .check(Check::Parse(parses::<AbsolutePath>)),
                ),
        ))
        .block(NestedBlock::single(
            "container",
            Block::new("A container run through the device's Docker Engine or Podman.")
                .attribute(Attribute::required(
                    "image",
                    Type::String,
                    "An image reference such as `registry.example/app:1.2`.",
                ))
                .attribute(env_attribute("Environment variables of the container."))
                .attribute(
                    Attribute::optional(
                        "ports",
                        Type::list(Type::Number),
                        "Container ports to publish on the device's loopback.",
                    )
                    .check(Check::Range(1, 65535)),
                ),
        ))
        .block(NestedBlock::single(
            "vm",
            Block::new("A microVM: either `image`, or `kernel` and `rootfs`.")
                .attribute(Attribute::optional("kernel", Type::String, "A kernel image; requires `rootfs`."))
                .attribute(Attribute::optional("rootfs", Type::String, "A root filesystem image; requires `kernel`."))
                .attribute(Attribute::optional("image", Type::String, "A bootable disk image.")),
        ))
}

fn health_check_block() -> Block {
    Block::new("How the agent decides that the workload is healthy.")
        .attribute(
            Attribute::required("protocol", Type::String, "`http` or `tcp`.").check(Check::OneOf(&["http", "tcp"])),
        )
        .attribute(
            Attribute::optional("path", Type::String, "The path to GET; required for `http`, not allowed for `tcp`.")
                .check(Check::Parse(parses::<HttpPath>)),
        )
        .attribute(
            Attribute::defaulted("interval_seconds", Type::Number, Value::int(10), "Seconds between checks (1-3600).")
                .check(Check::Range(1, 3600)),
        )
        .attribute(
            Attribute::defaulted(
                "timeout_seconds",
                Type::Number,
                Value::int(2),
                "Seconds one check may take (1-300, less than the interval).",
            )
            .check(Check::Range(1, 300)),
        )
        .attribute(
            Attribute::defaulted(
                "unhealthy_threshold",
                Type::Number,
                Value::int(3),
                "Consecutive failures before the application is unhealthy (1-100).",
            )
            .check(Check::Range(1, 100)),
        )
}

fn access_block() -> Block {
    Block::new(
        "Who may reach the application. Without any policy the application is public; with several, a request \
         passing any one of them is let through.",
    )
    .block(NestedBlock::single(
        "organization",
        Block::new("Members of the organization, after logging in.").attribute(
            Attribute::optional(
                "roles",
                Type::set(Type::String),
                "Only members with one of these roles (`owner`, `admin`, `member`); any member if empty.",
            )
            .check(Check::OneOf(&["owner", "admin", "member"])),
        ),
    ))
    .block(NestedBlock::single(
        "api_key",
        Block::new(
            "Holders of a key of the application (`edgible_application_key`) or of an organization API key with the \
             `access` scope.",
        ),
    ))
    .block(NestedBlock::single(
        "short_code",
        Block::new("Anyone who knows a short code.")
            .attribute(Attribute::optional(
                "code",
                Type::String,
                "The code (6-64 letters and digits). When left out, the server generates one, which the \
                 application's `short_code` attribute holds (it is not written back here).",
            ))
            .attribute(
                Attribute::optional("expires_at", Type::String, "When the code stops working (RFC 3339).")
                    .timestamp()
                    .check(Check::Parse(parse_timestamp)),
            ),
    ))
}

fn volume_block() -> Block {
    Block::new("A named volume that survives restarts.")
        .attribute(Attribute::required("name", Type::String, "Name of the volume.").check(Check::Parse(parses::<Name>)))
        .attribute(
            Attribute::required("size_mib", Type::Number, "The most the volume may hold, in MiB (1 to 1048576).")
                .check(Check::Range(1, 1_048_576)),
        )
        .attribute(
            Attribute::required("mount_path", Type::String, "Where the workload sees the volume.")
                .check(Check::Parse(parses::<AbsolutePath>)),
        )
        .attribute(Attribute::defaulted(
            "movable",
            Type::Bool,
            Value::Bool(false),
            "Whether the volume moves with the application when it migrates.",
        ))
}

fn sleep_block() -> Block {
    Block::new("Put the application to sleep when idle and wake it on the next request.")
        .attribute(
            Attribute::required(
                "idle_timeout_seconds",
                Type::Number,
                "Seconds without connections or requests before sleeping (10 to 604800).",
            )
            .check(Check::Range(10, 604_800)),
        )
        .attribute(
            Attribute::required("mode", Type::String, "`stop` the workload or `suspend` it.")
                .check(Check::OneOf(&["stop", "suspend"])),
        )
        .attribute(
            Attribute::defaulted(
                "wake_timeout_seconds",
                Type::Number,
                Value::int(60),
                "Seconds a wake may take before requests get 503 (1 to 600).",
            )
            .check(Check::Range(1, 600)),
        )
}

fn resources_block() -> Block {
    Block::new("Compute limits for the workload.")
        .attribute(Attribute::required("vcpus", Type::Number, "Virtual CPUs (1-64).").check(Check::Range(1, 64)))
        .attribute(
            Attribute::required("memory_mib", Type::Number, "Memory in MiB (16 to 262144).")
                .check(Check::Range(16, 262_144)),
        )
}

/// A check for RFC 3339 timestamps.
pub fn parse_timestamp(text: &str) -> Result<(), edgible::model::ValidationError> {
    chrono::DateTime::parse_from_rfc3339(text).map(drop).map_err(|_| {
        edgible::model::ValidationError::new(format!(
            "{text:?} is not an RFC 3339 timestamp such as 2030-01-31T12:00:00Z"
        ))
    })
}

impl Model for ApplicationModel {
    type Object = Application;
    type Spec = ApplicationSpec;
    const TYPE_NAME: &'static str = "edgible_application";
    const NOUN: &'static str = "application";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    fn check(config: &Value) -> Diagnostics {
        let mut diagnostics = Diagnostics::new();
        let workload = config.get("workload");
        if let Value::Map(_) = workload {
            let given: Vec<&str> =
                ["process", "container", "vm"].into_iter().filter(|kind| !workload.get(kind).is_null()).collect();
            if given.len() != 1 {
                let detail = if given.is_empty() {
                    "The workload block needs one of `process`, `container` or `vm`.".to_owned()
                } else {
                    format!("The workload block has {}; give exactly one of them.", given.join(" and "))
                };
                diagnostics.push(Diagnostic::error_at(
                    AttributePath::attribute("workload"),
                    "Invalid value for workload",
                    detail,
                ));
            }
        }
        diagnostics
    }

    fn created(created: Application) -> (Application, Vec<(&'static str, Value)>) {
        (created, Vec::new())
    }

    async fn observed(client: &Client, application: &Application) -> Result<Vec<(&'static str, Value)>, ClientError> {
        let status = client.application_status(&application.id).await?;
        let mut values = certificate_values(&status);
        values.push(("short_code", short_code_value(client, application).await?));
        Ok(values)
    }
}

/// The application's current short code, or null without a `short_code` policy.
async fn short_code_value(client: &Client, application: &Application) -> Result<Value, ClientError> {
    if application.spec.access.short_code.is_none() {
        return Ok(Value::Null);
    }
    match client.short_code(&application.id).await {
        Ok(short_code) => Ok(Value::string(short_code.code)),
        // The policy was removed since the application was read.
        Err(error) if error.is_not_found() => Ok(Value::Null),
        Err(error) => Err(error),
    }
}

/// The certificate attributes of an application's status.
fn certificate_values(status: &ApplicationStatus) -> Vec<(&'static str, Value)> {
    let expires = status
        .certificate_expires_at
        .map_or(Value::Null, |at| Value::string(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    let state = status.certificate_status.clone().map_or(Value::Null, Value::string);
    vec![("certificate_expires_at", expires), ("certificate_status", state)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};

    fn config(json: serde_json::Value) -> Value {
        Value::from_json(&json, &SCHEMA.value_type()).unwrap()
    }

    fn paths(diagnostics: &Diagnostics) -> Vec<String> {
        diagnostics.0.iter().map(|d| d.path.as_ref().map(ToString::to_string).unwrap_or_default()).collect()
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "name": "web",
            "hostnames": ["web.example.test"],
            "port": 8080,
            "workload": {"process": {"command": "/bin/web"}},
            "storage": [],
        })
    }

    #[test]
    fn a_minimal_application_is_valid_and_becomes_a_spec() {
        let resource = Managed::<ApplicationModel>::new();
        let value = config(minimal());
        assert!(resource.validate(&value).is_empty(), "{}", resource.validate(&value));
        let spec = Managed::<ApplicationModel>::spec(&value).unwrap();
        assert_eq!(spec.port, 8080);
        assert!(spec.access.is_public());
    }

    #[test]
    fn model_rules_come_back_at_the_right_attribute() {
        let resource = Managed::<ApplicationModel>::new();
        let mut json = minimal();
        json["storage"] = serde_json::json!([
            {"name": "data", "size_mib": 10, "mount_path": "/data"},
            {"name": "data", "size_mib": 10, "mount_path": "/other"},
        ]);
        assert_eq!(paths(&resource.validate(&config(json))), ["storage[1].name"]);

        let mut json = minimal();
        json["workload"] = serde_json::json!({"vm": {"kernel": "/k"}});
        assert_eq!(paths(&resource.validate(&config(json))), ["workload.vm.rootfs"]);

        let mut json = minimal();
        json["health_check"] =
            serde_json::json!({"protocol": "http", "path": "/", "interval_seconds": 5, "timeout_seconds": 5});
        assert_eq!(paths(&resource.validate(&config(json))), ["health_check.timeout_seconds"]);

        let mut json = minimal();
        json["workload"] = serde_json::json!({"process": {"command": "x", "env": {"9X": "1"}}});
        assert_eq!(paths(&resource.validate(&config(json))), ["workload.process.env[\"9X\"]"]);
    }

    #[test]
    fn exactly_one_workload_kind() {
        let resource = Managed::<ApplicationModel>::new();
        let mut json = minimal();
        json["workload"] = serde_json::json!({"process": {"command": "x"}, "container": {"image": "y"}});
        let diagnostics = resource.validate(&config(json));
        assert_eq!(paths(&diagnostics), ["workload"]);
        assert!(diagnostics.0[0].detail.contains("process and container"));
        let mut json = minimal();
        json["workload"] = serde_json::json!({});
        assert_eq!(paths(&resource.validate(&config(json))), ["workload"]);
    }

    #[test]
    fn unknown_values_postpone_the_full_validation() {
        let resource = Managed::<ApplicationModel>::new();
        let mut value = config(minimal());
        value.set("port", Value::unknown());
        assert!(resource.validate(&value).is_empty());
    }

    #[test]
    fn a_server_object_reads_back_in_canonical_form() {
        let spec: ApplicationSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "hostnames": ["web.example.test"],
            "port": 8080,
            "workload": {"container": {"image": "nginx", "ports": [80]}},
            "access": {"short_code": {"code": "abc123"}},
            "health_check": {"protocol": "tcp"},
        }))
        .unwrap();
        let object = Application {
            id: edgible::model::ApplicationId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 4,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec,
        };
        let state = Managed::<ApplicationModel>::state(&object).unwrap();
        assert_eq!(state.get("revision"), &Value::int(4));
        assert_eq!(state.get("id"), &Value::string(object.id.to_string()));
        assert_eq!(state.get("env"), &Value::Null);
        assert_eq!(state.get("workload").get("container").get("ports"), &Value::List(vec![Value::int(80)]));
        assert_eq!(state.get("access").get("short_code").get("code"), &Value::string("abc123"));
        assert_eq!(state.get("health_check").get("interval_seconds"), &Value::int(10));
        assert_eq!(state.get("storage"), &Value::List(vec![]));
        assert_eq!(Managed::<ApplicationModel>::spec(&state).unwrap(), object.spec);
    }

    #[test]
    fn the_certificate_attributes_come_from_the_status() {
        let mut status = ApplicationStatus {
            application_id: edgible::model::ApplicationId::new(),
            application_revision: 3,
            device_id: None,
            phase: edgible::model::ApplicationPhase::Running,
            message: None,
            revision: Some(3),
            reported_at: None,
            certificate_expires_at: None,
            certificate_status: None,
        };
        assert_eq!(
            certificate_values(&status),
            vec![("certificate_expires_at", Value::Null), ("certificate_status", Value::Null)]
        );
        status.certificate_expires_at = Some("2030-01-02T03:04:05Z".parse().unwrap());
        status.certificate_status = Some("valid".into());
        assert_eq!(
            certificate_values(&status),
            vec![
                ("certificate_expires_at", Value::string("2030-01-02T03:04:05Z")),
                ("certificate_status", Value::string("valid"))
            ]
        );
        for (name, _) in certificate_values(&status) {
            assert!(
                SCHEMA.block.attributes.iter().any(|attribute| attribute.name == name && attribute.is_computed_only())
            );
        }
    }

    #[test]
    fn the_short_code_is_secret_and_read_again_after_a_change() {
        let attribute = SCHEMA.block.find_attribute("short_code").unwrap();
        assert!(attribute.is_computed_only() && attribute.sensitive);
        let object = Application {
            id: edgible::model::ApplicationId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: Managed::<ApplicationModel>::spec(&config(minimal())).unwrap(),
        };
        let mut prior = Managed::<ApplicationModel>::state(&object).unwrap();
        prior.set("short_code", Value::string("k3x9q2"));
        // Unchanged: the plan is the prior state, code included.
        let outcome = crate::planning::plan(&SCHEMA.block, &prior, &prior, &prior);
        assert_eq!(outcome.planned.get("short_code"), &Value::string("k3x9q2"));
        // Any change may add, remove or replace the policy: the code is read again.
        let mut proposed = prior.clone();
        proposed.set("port", Value::int(9090));
        let outcome = crate::planning::plan(&SCHEMA.block, &prior, &proposed, &proposed);
        assert!(outcome.planned.get("short_code").is_unknown());
        assert!(outcome.requires_replace.is_empty());
    }

    #[test]
    fn every_field_of_the_model_survives_the_round_trip() {
        let spec: ApplicationSpec = serde_json::from_value(serde_json::json!({
            "name": "full",
            "hostnames": ["full.example.test", "*.full.example.test"],
            "workload": {"process": {"command": "/bin/full", "args": ["-v"], "env": {"A": "1"}, "working_dir": "/srv"}},
            "port": 8443,
            "env": {"B": "2"},
            "health_check": {"protocol": "http", "path": "/h", "interval_seconds": 30, "timeout_seconds": 5, "unhealthy_threshold": 4},
            "access": {
                "organization": {"roles": ["admin", "member"]},
                "api_key": {},
                "short_code": {"code": "abcdef12", "expires_at": "2030-01-01T00:00:00Z"},
            },
            "storage": [{"name": "data", "size_mib": 64, "mount_path": "/data", "movable": true}],
            "sleep": {"idle_timeout_seconds": 60, "mode": "suspend", "wake_timeout_seconds": 30},
            "resources": {"vcpus": 2, "memory_mib": 1024},
            "protocol": "http",
        }))
        .unwrap();
        let object = Application {
            id: edgible::model::ApplicationId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec,
        };
        let state = Managed::<ApplicationModel>::state(&object).unwrap();
        assert_eq!(Managed::<ApplicationModel>::spec(&state).unwrap(), object.spec);
        // Every key the model writes has a place in the schema (a field added to the model
        // must be added to the schema, or updates would drop it).
        let (json, _) = SCHEMA.block.to_model_json(&state, &|attribute| !attribute.is_computed_only());
        assert_eq!(json, serde_json::to_value(&object.spec).unwrap());

        for workload in [
            serde_json::json!({"container": {"image": "nginx:1", "env": {"C": "3"}, "ports": [80, 443]}}),
            serde_json::json!({"vm": {"image": "/images/disk.img"}}),
            serde_json::json!({"vm": {"kernel": "/k", "rootfs": "/r"}}),
        ] {
            let mut spec = object.spec.clone();
            spec.workload = serde_json::from_value(workload).unwrap();
            let object = Application { spec, ..object.clone() };
            let state = Managed::<ApplicationModel>::state(&object).unwrap();
            assert_eq!(Managed::<ApplicationModel>::spec(&state).unwrap(), object.spec);
        }

        // A raw TCP application is public: access policies need HTTP requests to check.
        let mut spec = object.spec.clone();
        spec.protocol = edgible::model::ApplicationProtocol::Tcp;
        spec.access = edgible::model::AccessPolicy::default();
        let object = Application { spec, ..object };
        let state = Managed::<ApplicationModel>::state(&object).unwrap();
        assert_eq!(state.get("protocol"), &Value::string("tcp"));
        assert_eq!(Managed::<ApplicationModel>::spec(&state).unwrap(), object.spec);
    }
}
