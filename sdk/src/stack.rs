//! The stack file: one YAML document that declares applications and where they run.
//!
//! ```yaml
//! applications:
//!   - name: hello
//!     hostnames: [hello.example.test]
//!     port: 8080
//!     workload:
//!       process:
//!         command: /usr/bin/python3
//!         args: ["-m", "http.server", "8080"]
//!     placement:
//!       strategy: serving-device
//!       device: dev1
//! ```
//!
//! Each application is an [`ApplicationSpec`] plus an optional `placement` that refers to
//! devices and pools by name (ids are not known when the file is written). Parsing names the
//! offending field and gives its line and column.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{ApplicationSpec, Name, Region, Validate, ValidationError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stack {
    pub applications: Vec<StackApplication>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackApplication {
    #[serde(flatten)]
    pub spec: ApplicationSpec,
    /// Where the application runs; left unplaced (declared, not running) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<StackPlacement>,
}

/// A placement that names its target instead of giving its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StackPlacement {
    ServingDevice {
        /// The name of a device of the organization.
        device: Name,
    },
    Cloud {
        /// The name of a cloud pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<Name>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
    },
}

/// A stack file that could not be read, with where in the file the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct StackError {
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The path of the offending field (`applications[0].hostnames[1]`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "line {line} column {column}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl StackError {
    /// An error about the field at `field` (`applications[0].placement.device`) of the stack
    /// file `text`, found after parsing (a device that does not exist), placed at that field's
    /// line so that the user sees where to look.
    pub fn at_field(text: &str, field: impl Into<String>, message: impl Into<String>) -> StackError {
        let field = field.into();
        let (line, column) = locate(text, &field);
        StackError { line, column, field: Some(field), message: message.into() }
    }
}

impl Stack {
    /// Parses and validates a stack file.
    ///
    /// The document is read as YAML first (syntax errors carry serde_yaml's position), then
    /// each application is deserialized on its own, without its `placement`, straight into
    /// [`ApplicationSpec`]: that keeps `deny_unknown_fields` and exact field paths, which a
    /// `#[serde(flatten)]` would lose. Positions of those errors come from [`locate`].
    pub fn parse(text: &str) -> Result<Stack, StackError> {
        let document: serde_yaml::Value = serde_yaml::from_str(text).map_err(|error| {
            let location = error.location();
            StackError {
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                field: None,
                message: strip_location(error.to_string()),
            }
        })?;
        let fail = |field: String, message: String| {
            let (line, column) = locate(text, &field);
            StackError { line, column, field: (!field.is_empty()).then_some(field), message }
        };
        let mut root = match document {
            serde_yaml::Value::Mapping(root) => root,
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            _ => return Err(fail(String::new(), "a stack file must be a mapping with `applications`".into())),
        };
        let entries = match root.remove("applications") {
            None | Some(serde_yaml::Value::Null) => Vec::new(),
            Some(serde_yaml::Value::Sequence(entries)) => entries,
            Some(_) => return Err(fail("applications".into(), "must be a list of applications".into())),
        };
        if let Some((key, _)) = root.into_iter().next() {
            let key = key.as_str().unwrap_or("?").to_owned();
            return Err(fail(key.clone(), format!("unknown field `{key}`, expected `applications`")));
        }
        let mut applications = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let parent = format!("applications[{index}]");
            let serde_yaml::Value::Mapping(mut fields) = entry else {
                return Err(fail(parent, "each application must be a mapping".into()));
            };
            let placement = match fields.remove("placement") {
                None | Some(serde_yaml::Value::Null) => None,
                Some(value) => Some(
                    deserialize_at::<StackPlacement>(value)
                        .map_err(|(f, m)| fail(join(&format!("{parent}.placement"), &f), m))?,
                ),
            };
            let spec = deserialize_at::<ApplicationSpec>(serde_yaml::Value::Mapping(fields))
                .map_err(|(f, m)| fail(join(&parent, &f), m))?;
            applications.push(StackApplication { spec, placement });
        }
        let stack = Stack { applications };
        stack.check().map_err(|error| fail(error.field.unwrap_or_default(), error.message))?;
        Ok(stack)
    }

    fn check(&self) -> Result<(), ValidationError> {
        let mut names = BTreeSet::new();
        for (index, application) in self.applications.iter().enumerate() {
            let parent = format!("applications[{index}]");
            if !names.insert(&application.spec.name) {
                return Err(ValidationError::at(
                    format!("{parent}.name"),
                    format!("application {} is declared twice", application.spec.name),
                ));
            }
            application.spec.validate().map_err(|e| e.within(&parent))?;
            if let Some(StackPlacement::Cloud { pool: None, region: None }) = application.placement {
                return Err(ValidationError::at(
                    format!("{parent}.placement"),
                    "a cloud placement needs `pool` or `region`",
                ));
            }
        }
        Ok(())
    }
}

/// Deserializes a YAML value, returning the path of the offending field and the message.
///
/// The value goes through `serde_json::Value` because serde_yaml's own `Value` only reads
/// enums written as YAML tags (`!process`), while stack files (like the API) write them as
/// single-key mappings (`process: {...}`).
fn deserialize_at<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, (String, String)> {
    let value = serde_json::to_value(value).map_err(|error| (String::new(), error.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let mut field = error.path().to_string();
        if field == "." {
            field.clear();
        }
        let message = strip_location(error.inner().to_string());
        field = crate::model::name_reported_field(field, &message);
        (field, message)
    })
}

fn join(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (_, true) => parent.to_owned(),
        (true, false) => child.to_owned(),
        (false, false) if child.starts_with('[') => format!("{parent}{child}"),
        (false, false) => format!("{parent}.{child}"),
    }
}

/// serde_yaml appends " at line L column C"; positions are reported separately.
fn strip_location(mut message: String) -> String {
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    message
}

/// Finds the line and column of a field path (`applications[1].hostnames[0]`) in YAML text, as
/// far as the text's indentation shows it. serde_yaml loses positions for some errors (those
/// found after a value was buffered, and the cross-field rules run after parsing); this gives
/// the user the line anyway. It reads block-style YAML, which is what stack files are; for
/// anything it cannot follow it returns the deepest position it reached.
fn locate(text: &str, path: &str) -> (Option<usize>, Option<usize>) {
    let mut best = (None, None);
    // Lines with their 0-based index and indentation, skipping blanks and comments.
    let lines: Vec<(usize, usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(number, line)| (number, line.len() - line.trim_start().len(), line.trim_start()))
        .filter(|(_, _, content)| !content.is_empty() && !content.starts_with('#'))
        .collect();
    let mut start = 0;
    let mut end = lines.len();
    let mut min_indent = 0;
    for segment in path_segments(path) {
        let found = match segment {
            Segment::Key(key) => lines[start..end].iter().enumerate().find_map(|(offset, (_, indent, content))| {
                let content = content.strip_prefix("- ").map(str::trim_start).unwrap_or(content);
                let indent = indent + (content.len() < lines[start + offset].2.len()) as usize * 2;
                (indent >= min_indent && (content.starts_with(&format!("{key}:")))).then_some((start + offset, indent))
            }),
            Segment::Index(wanted) => lines[start..end]
                .iter()
                .enumerate()
                .filter(|(_, (_, indent, content))| *indent >= min_indent && content.starts_with('-'))
                .scan(None, |first_indent, (offset, (_, indent, _))| {
                    let first = *first_indent.get_or_insert(*indent);
                    Some((offset, *indent == first))
                })
                .filter(|(_, same_level)| *same_level)
                .nth(wanted)
                .map(|(offset, _)| (start + offset, lines[start + offset].1)),
        };
        let Some((index, indent)) = found else { break };
        let (number, _, _) = lines[index];
        let column = text.lines().nth(number).map(|line| {
            let trimmed = line.trim_start();
            line.len() - trimmed.len() + 1
        });
        best = (Some(number + 1), column);
        // The value of this entry spans the following lines that are indented deeper.
        start = index;
        end = lines[index + 1..]
            .iter()
            .position(|(_, next_indent, _)| *next_indent <= indent)
            .map(|offset| index + 1 + offset)
            .unwrap_or(lines.len());
        min_indent = indent;
        if let Segment::Key(_) = segment {
            start = index + 1;
            min_indent = indent + 1;
        }
    }
    best
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').map(|(k, r)| (k, Some(r))).unwrap_or((part, None));
        if !key.is_empty() {
            segments.push(Segment::Key(key));
        }
        if let Some(rest) = rest {
            for index in rest.split('[') {
                if let Ok(index) = index.trim_end_matches(']').parse() {
                    segments.push(Segment::Index(index));
                }
            }
        }
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
applications:
  - name: hello
    hostnames: [hello.example.test]
    port: 8080
    workload:
      process:
        command: /usr/bin/python3
        args: [-m, http.server, '8080']
    placement:
      strategy: serving-device
      device: dev1
  - name: api
    hostnames:
      - api.example.test
      - '*.api.example.test'
    port: 9000
    workload:
      container:
        image: localhost/api:1
    access:
      api_key: {}
    placement:
      strategy: cloud
      region: eu-west
";

    #[test]
    fn a_good_stack_parses() {
        let stack = Stack::parse(GOOD).unwrap();
        assert_eq!(stack.applications.len(), 2);
        assert_eq!(stack.applications[0].spec.name.as_str(), "hello");
        assert_eq!(
            stack.applications[0].placement,
            Some(StackPlacement::ServingDevice { device: "dev1".parse().unwrap() })
        );
        assert!(stack.applications[1].spec.access.api_key.is_some());
        assert_eq!(stack.applications[1].spec.hostnames[1].as_str(), "*.api.example.test");
    }

    #[test]
    fn a_bad_hostname_is_reported_at_its_line() {
        let text = GOOD.replace("      - api.example.test", "      - API.example.test");
        let error = Stack::parse(&text).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[1].hostnames[0]"));
        assert_eq!(error.line, Some(14), "{error}");
        assert!(error.message.contains("lowercase"), "{error}");
    }

    #[test]
    fn an_unknown_field_is_reported_at_its_line() {
        let text = GOOD.replace("    port: 9000\n", "    port: 9000\n    prot: 1\n");
        let error = Stack::parse(&text).unwrap_err();
        assert!(error.message.contains("unknown field `prot`"), "{error}");
        assert_eq!(error.field.as_deref(), Some("applications[1].prot"));
        assert_eq!(error.line, Some(17), "{error}");
    }

    #[test]
    fn cross_field_errors_carry_lines_too() {
        let text = GOOD.replace("name: api", "name: hello");
        let error = Stack::parse(&text).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[1].name"));
        assert_eq!(error.line, Some(12), "{error}");

        let text = GOOD.replace("port: 8080", "port: 0");
        let error = Stack::parse(&text).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[0].port"));
        assert_eq!(error.line, Some(4), "{error}");
    }

    #[test]
    fn syntax_errors_carry_lines() {
        let error = Stack::parse("applications:\n  - name: [unclosed\n").unwrap_err();
        assert!(error.line.is_some(), "{error}");
        let error = Stack::parse("applications: 5\n").unwrap_err();
        assert_eq!(error.line, Some(1), "{error}");
    }

    #[test]
    fn placement_needs_a_target() {
        let text = GOOD.replace("      device: dev1\n", "");
        let error = Stack::parse(&text).unwrap_err();
        assert!(error.message.contains("device"), "{error}");
        let text = GOOD.replace("      region: eu-west\n", "");
        let error = Stack::parse(&text).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[1].placement"));
        assert_eq!(error.line, Some(22), "{error}");
    }

    #[test]
    fn an_empty_stack_is_empty() {
        assert_eq!(Stack::parse("applications: []\n").unwrap().applications.len(), 0);
    }
}
