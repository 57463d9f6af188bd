//! Diagnostics: what the provider tells the user, anchored at an attribute when it can be.
//!
//! Terraform shows a diagnostic with an [`AttributePath`] next to the exact line of the
//! configuration that set the value, including inside nested blocks and at a list index, so
//! every error about a value carries the path. Messages are built from `Display` of errors and
//! their sources, never from `Debug`, so no backtrace can leak into them.

use std::fmt;

use edgible::ClientError;

use crate::proto::tfplugin6 as proto;

/// One step from a value into a part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An attribute or a nested block of an object.
    Attribute(String),
    /// An element of a map.
    Key(String),
    /// An element of a list.
    Index(i64),
}

/// The way from a resource's object to one value inside it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttributePath(pub Vec<Step>);

impl AttributePath {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn attribute(name: &str) -> Self {
        Self(vec![Step::Attribute(name.to_owned())])
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    #[must_use]
    pub fn then_attribute(&self, name: &str) -> Self {
        self.then(Step::Attribute(name.to_owned()))
    }

    #[must_use]
    pub fn then_index(&self, index: usize) -> Self {
        self.then(Step::Index(i64::try_from(index).unwrap_or(i64::MAX)))
    }

    #[must_use]
    pub fn then_key(&self, key: &str) -> Self {
        self.then(Step::Key(key.to_owned()))
    }

    fn then(&self, step: Step) -> Self {
        let mut steps = self.0.clone();
        steps.push(step);
        Self(steps)
    }

    pub fn to_proto(&self) -> proto::AttributePath {
        use proto::attribute_path::step::Selector;
        proto::AttributePath {
            steps: self
                .0
                .iter()
                .map(|step| proto::attribute_path::Step {
                    selector: Some(match step {
                        Step::Attribute(name) => Selector::AttributeName(name.clone()),
                        Step::Key(key) => Selector::ElementKeyString(key.clone()),
                        Step::Index(index) => Selector::ElementKeyInt(*index),
                    }),
                })
                .collect(),
        }
    }
}

/// Written the way Terraform's language would address the value: `storage[1].mount_path`,
/// `env["PORT"]`.
impl fmt::Display for AttributePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, step) in self.0.iter().enumerate() {
            match step {
                Step::Attribute(name) if index == 0 => write!(f, "{name}")?,
                Step::Attribute(name) => write!(f, ".{name}")?,
                Step::Key(key) => write!(f, "[{key:?}]")?,
                Step::Index(position) => write!(f, "[{position}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub summary: String,
    pub detail: String,
    pub path: Option<AttributePath>,
}

impl Diagnostic {
    pub fn error(summary: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { severity: Severity::Error, summary: summary.into(), detail: detail.into(), path: None }
    }

    /// An error about the value at `path`; a root path means the whole resource.
    pub fn error_at(path: AttributePath, summary: impl Into<String>, detail: impl Into<String>) -> Self {
        let path = if path.is_root() { None } else { Some(path) };
        Self { severity: Severity::Error, summary: summary.into(), detail: detail.into(), path }
    }

    pub fn warning(summary: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, summary: summary.into(), detail: detail.into(), path: None }
    }

    pub fn to_proto(&self) -> proto::Diagnostic {
        proto::Diagnostic {
            severity: match self.severity {
                Severity::Error => proto::diagnostic::Severity::Error,
                Severity::Warning => proto::diagnostic::Severity::Warning,
            } as i32,
            summary: self.summary.clone(),
            detail: self.detail.clone(),
            attribute: self.path.as_ref().map(AttributePath::to_proto),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        write!(f, "{}", self.summary)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// The diagnostics of one operation, errors and warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|diagnostic| diagnostic.severity == Severity::Error)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_proto(&self) -> Vec<proto::Diagnostic> {
        self.0.iter().map(Diagnostic::to_proto).collect()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(diagnostic: Diagnostic) -> Self {
        Self(vec![diagnostic])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, diagnostic) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// An error and its sources joined by ": ", the way a person reads them. Uses `Display` only.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Turns an error of the REST API into a diagnostic. `action` says what was attempted
/// ("create the application"); `path_of` maps the field the server blamed (`hostnames[1]`,
/// `workload.process.command`) to the attribute that holds it.
pub fn client_error(action: &str, error: &ClientError, path_of: impl Fn(&str) -> AttributePath) -> Diagnostic {
    let status = error.status().map(|status| status.as_u16());
    let (code, message, field) = match error {
        ClientError::Api { body: Some(body), .. } => {
            (Some(body.error.code.as_str()), body.error.message.clone(), body.error.field.clone())
        }
        other => (None, error_chain(other), None),
    };
    let path = field.as_deref().map(&path_of).unwrap_or_default();
    let blamed = if path.is_root() { field.clone() } else { Some(path.to_string()) };
    let summary = match (status, code, &blamed) {
        (_, Some("stale_revision"), _) => "Changed outside Terraform".to_owned(),
        (_, Some("conflict"), Some(field)) => format!("Conflict on {field}"),
        (_, Some("conflict"), None) => "Conflict".to_owned(),
        (_, _, Some(field)) => format!("Invalid value for {field}"),
        (Some(401), _, _) => "The Edgible server refused the API key".to_owned(),
        (Some(403), _, _) => "The API key may not do this".to_owned(),
        (Some(404), _, _) => "Not found".to_owned(),
        (None, _, _) => "Cannot reach the Edgible server".to_owned(),
        _ => format!("Cannot {action}"),
    };
    let mut detail = format!("Could not {action}: {message}");
    if let (Some(status), Some(code)) = (status, code) {
        detail.push_str(&format!(" (HTTP {status}, {code})"));
    }
    match (status, code) {
        (_, Some("stale_revision")) => detail.push_str(
            "\n\nThe object was changed through the API since Terraform last read it. \
             Run `terraform apply` again to plan against its current state.",
        ),
        (Some(403), _) => detail.push_str("\n\nUse an API key with the scope this operation needs (write or admin)."),
        _ => {}
    }
    Diagnostic::error_at(path, summary, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgible::model::{ErrorBody, ErrorDetail};

    #[test]
    fn paths_read_like_terraform_expressions() {
        let path = AttributePath::attribute("storage").then_index(1).then_attribute("mount_path");
        assert_eq!(path.to_string(), "storage[1].mount_path");
        let path = AttributePath::attribute("env").then_key("PORT");
        assert_eq!(path.to_string(), "env[\"PORT\"]");
        let proto = path.to_proto();
        assert_eq!(proto.steps.len(), 2);
    }

    #[test]
    fn api_errors_name_the_attribute_the_server_blamed() {
        let error = ClientError::Api {
            status: http::StatusCode::CONFLICT,
            body: Some(ErrorBody {
                error: ErrorDetail {
                    code: "conflict".into(),
                    message: "hostname a.example.test is already used".into(),
                    field: Some("hostnames[0]".into()),
                },
            }),
            raw: String::new(),
        };
        let diagnostic =
            client_error("create the application", &error, |_| AttributePath::attribute("hostnames").then_index(0));
        assert_eq!(diagnostic.summary, "Conflict on hostnames[0]");
        assert!(diagnostic.detail.contains("already used"), "{}", diagnostic.detail);
        assert_eq!(diagnostic.path, Some(AttributePath::attribute("hostnames").then_index(0)));
    }
}
