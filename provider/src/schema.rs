//! Schemas of the provider, its resources and data sources, and everything that is decided by
//! the schema alone: the protocol form, the implied value type, per-value checks, the mapping
//! between a Terraform value and the JSON of the sdk model, and the mapping of a model field
//! path (`storage[1].mount_path`) to an attribute path.
//!
//! Resource schemas mirror the JSON shape of the sdk specs (the `workload` block holds one of
//! `process`/`container`/`vm` exactly like `{"workload": {"process": {...}}}`), so a spec is
//! built from a value by dropping nulls and parsing with `edgible::model::parse_json`, which
//! validates it with the same rules as the server and names offending fields in the same shape.

use std::collections::BTreeMap;

use edgible::model::ValidationError;

use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics};
use crate::proto::tfplugin6 as proto;
use crate::value::{Type, Value, ValueError};

/// The schema of the provider configuration, a resource type or a data source.
#[derive(Debug)]
pub struct Schema {
    /// Bumped when stored state changes shape.
    pub version: i64,
    pub block: Block,
}

impl Schema {
    pub fn new(block: Block) -> Self {
        Self { version: 0, block }
    }

    pub fn to_proto(&self) -> proto::Schema {
        proto::Schema { version: self.version, block: Some(self.block.to_proto(self.version)) }
    }

    /// The type of the object this schema describes.
    pub fn value_type(&self) -> Type {
        self.block.value_type()
    }
}

/// Whether the user sets an attribute, the provider does, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Required,
    Optional,
    /// Set only by the provider.
    Computed,
    /// Set by the user, or by the provider when the user does not.
    OptionalComputed,
}

/// A rule for the values of an attribute (for collections: of each element).
#[derive(Clone, Copy)]
pub enum Check {
    None,
    /// The string must parse as a model type.
    Parse(StringCheck),
    /// The string must be one of these.
    OneOf(&'static [&'static str]),
    /// The number must be an integer in this inclusive range.
    Range(i64, i64),
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::None => f.write_str("None"),
            Check::Parse(_) => f.write_str("Parse"),
            Check::OneOf(options) => write!(f, "OneOf({options:?})"),
            Check::Range(min, max) => write!(f, "Range({min}, {max})"),
        }
    }
}

/// A rule for one string: `Ok` or what is wrong with it.
pub type StringCheck = fn(&str) -> Result<(), ValidationError>;

/// A check that `text` parses as `T`, as a [`Check::Parse`] function.
pub fn parses<T: std::str::FromStr<Err = ValidationError>>(text: &str) -> Result<(), ValidationError> {
    text.parse::<T>().map(drop)
}

#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: &'static str,
    pub ty: Type,
    pub description: &'static str,
    pub presence: Presence,
    pub sensitive: bool,
    /// What an optional-computed attribute becomes when the configuration leaves it out.
    pub default: Option<Value>,
    pub check: Check,
    /// For maps: the rule for keys.
    pub key_check: Option<StringCheck>,
    /// A change destroys the object and creates a new one.
    pub requires_replace: bool,
    /// An RFC 3339 timestamp: equal instants written differently are the same value.
    pub timestamp: bool,
    /// Computed once, at creation (secrets): the server never returns it again, so reads keep
    /// the value in state.
    pub write_once: bool,
    /// Computed and changed by every write of the object (its revision): unknown in a plan
    /// that updates the object.
    pub changes_on_write: bool,
    /// A setting of the provider's own for this resource (how long an apply waits), not a
    /// field of the object: never sent to the server, kept in state as configured.
    pub local: bool,
}

impl Attribute {
    fn new(name: &'static str, ty: Type, presence: Presence, description: &'static str) -> Self {
        Self {
            name,
            ty,
            description,
            presence,
            sensitive: false,
            default: None,
            check: Check::None,
            key_check: None,
            requires_replace: false,
            timestamp: false,
            write_once: false,
            changes_on_write: false,
            local: false,
        }
    }

    pub fn required(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, ty, Presence::Required, description)
    }

    pub fn optional(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, ty, Presence::Optional, description)
    }

    pub fn computed(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, ty, Presence::Computed, description)
    }

    pub fn optional_computed(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, ty, Presence::OptionalComputed, description)
    }

    /// An optional attribute that takes `default` when left out; the plan shows the default.
    pub fn defaulted(name: &'static str, ty: Type, default: Value, description: &'static str) -> Self {
        Self { default: Some(default), ..Self::new(name, ty, Presence::OptionalComputed, description) }
    }

    pub fn sensitive(self) -> Self {
        Self { sensitive: true, ..self }
    }

    pub fn check(self, check: Check) -> Self {
        Self { check, ..self }
    }

    pub fn keys(self, key_check: StringCheck) -> Self {
        Self { key_check: Some(key_check), ..self }
    }

    pub fn requires_replace(self) -> Self {
        Self { requires_replace: true, ..self }
    }

    pub fn timestamp(self) -> Self {
        Self { timestamp: true, ..self }
    }

    pub fn write_once(self) -> Self {
        Self { write_once: true, ..self }
    }

    pub fn changes_on_write(self) -> Self {
        Self { changes_on_write: true, ..self }
    }

    pub fn local(self) -> Self {
        Self { local: true, ..self }
    }

    /// Set only by the provider.
    pub fn is_computed_only(&self) -> bool {
        self.presence == Presence::Computed
    }

    pub fn is_computed(&self) -> bool {
        matches!(self.presence, Presence::Computed | Presence::OptionalComputed)
    }

    fn to_proto(&self) -> proto::schema::Attribute {
        proto::schema::Attribute {
            name: self.name.to_owned(),
            r#type: self.ty.to_json().to_string().into_bytes(),
            description: self.description.to_owned(),
            required: self.presence == Presence::Required,
            optional: matches!(self.presence, Presence::Optional | Presence::OptionalComputed),
            computed: self.is_computed(),
            sensitive: self.sensitive,
            description_kind: proto::StringKind::Markdown as i32,
            deprecated: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nesting {
    /// At most one block; null when absent.
    Single,
    /// Any number of blocks, in order; an empty list when absent.
    List,
}

#[derive(Debug)]
pub struct NestedBlock {
    pub name: &'static str,
    pub nesting: Nesting,
    pub block: Block,
    pub min_items: i64,
    pub max_items: i64,
    /// A block whose attributes are all null or empty means the same as no block (`access {}`
    /// is a public application). Blocks whose presence carries meaning (`api_key {}`) must
    /// not set this.
    pub empty_is_absent: bool,
}

impl NestedBlock {
    /// An optional block that appears at most once.
    pub fn single(name: &'static str, block: Block) -> Self {
        Self { name, nesting: Nesting::Single, block, min_items: 0, max_items: 0, empty_is_absent: false }
    }

    /// A block that must appear exactly once.
    pub fn required(name: &'static str, block: Block) -> Self {
        Self { min_items: 1, max_items: 1, ..Self::single(name, block) }
    }

    /// A block that may repeat.
    pub fn list(name: &'static str, block: Block) -> Self {
        Self { name, nesting: Nesting::List, block, min_items: 0, max_items: 0, empty_is_absent: false }
    }

    pub fn empty_is_absent(self) -> Self {
        Self { empty_is_absent: true, ..self }
    }

    pub fn value_type(&self) -> Type {
        match self.nesting {
            Nesting::Single => self.block.value_type(),
            Nesting::List => Type::list(self.block.value_type()),
        }
    }

    fn to_proto(&self) -> proto::schema::NestedBlock {
        use proto::schema::nested_block::NestingMode;
        proto::schema::NestedBlock {
            type_name: self.name.to_owned(),
            block: Some(self.block.to_proto(0)),
            nesting: match self.nesting {
                Nesting::Single => NestingMode::Single,
                Nesting::List => NestingMode::List,
            } as i32,
            min_items: self.min_items,
            max_items: self.max_items,
        }
    }
}

#[derive(Debug, Default)]
pub struct Block {
    pub description: &'static str,
    pub attributes: Vec<Attribute>,
    pub blocks: Vec<NestedBlock>,
}

impl Block {
    pub fn new(description: &'static str) -> Self {
        Self { description, attributes: Vec::new(), blocks: Vec::new() }
    }

    pub fn attribute(mut self, attribute: Attribute) -> Self {
        self.attributes.push(attribute);
        self
    }

    pub fn block(mut self, block: NestedBlock) -> Self {
        self.blocks.push(block);
        self
    }

    pub fn find_attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|attribute| attribute.name == name)
    }

    pub fn find_block(&self, name: &str) -> Option<&NestedBlock> {
        self.blocks.iter().find(|block| block.name == name)
    }

    pub fn value_type(&self) -> Type {
        let mut attributes: BTreeMap<String, Type> =
            self.attributes.iter().map(|attribute| (attribute.name.to_owned(), attribute.ty.clone())).collect();
        for block in &self.blocks {
            attributes.insert(block.name.to_owned(), block.value_type());
        }
        Type::Object(attributes)
    }

    fn to_proto(&self, version: i64) -> proto::schema::Block {
        proto::schema::Block {
            version,
            attributes: self.attributes.iter().map(Attribute::to_proto).collect(),
            block_types: self.blocks.iter().map(NestedBlock::to_proto).collect(),
            description: self.description.to_owned(),
            description_kind: proto::StringKind::Markdown as i32,
            deprecated: false,
        }
    }

    /// The attribute path of a field the sdk model or the server named (`hostnames[1]`,
    /// `workload.process.env.PORT`, `storage[0].name`). Follows the path as far as the schema
    /// knows it; an unknown first step gives the root path (the whole resource).
    pub fn path_of(&self, field: &str) -> AttributePath {
        let mut path = AttributePath::root();
        let mut block = self;
        let mut rest = field;
        loop {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let (name, after) = rest.split_at(end);
            if let Some(attribute) = block.find_attribute(name) {
                path = path.then_attribute(name);
                match &attribute.ty {
                    // Map keys may contain dots (`labels.edgible.io/role`): the rest is the key.
                    Type::Map(_) => {
                        if let Some(key) = after.strip_prefix('.').filter(|key| !key.is_empty()) {
                            path = path.then_key(key);
                        }
                    }
                    Type::List(_) => {
                        if let Some((index, _)) = split_index(after) {
                            path = path.then_index(index);
                        }
                    }
                    _ => {}
                }
                return path;
            }
            let Some(nested) = block.find_block(name) else {
                return path;
            };
            path = path.then_attribute(name);
            let mut after = after;
            if nested.nesting == Nesting::List {
                let Some((index, remaining)) = split_index(after) else {
                    return path;
                };
                path = path.then_index(index);
                after = remaining;
            }
            block = &nested.block;
            match after.strip_prefix('.') {
                Some(remaining) if !remaining.is_empty() => rest = remaining,
                _ => return path,
            }
        }
    }

    /// Checks every known value of a configuration against its attribute's rule. Unknown
    /// values are checked later, once they are known.
    pub fn check_values(&self, value: &Value, path: &AttributePath) -> Diagnostics {
        let mut diagnostics = Diagnostics::new();
        for attribute in &self.attributes {
            if attribute.is_computed_only() {
                continue;
            }
            let attribute_path = path.then_attribute(attribute.name);
            check_attribute(attribute, value.get(attribute.name), &attribute_path, &mut diagnostics);
        }
        for nested in &self.blocks {
            let nested_path = path.then_attribute(nested.name);
            match (nested.nesting, value.get(nested.name)) {
                (Nesting::Single, inner @ Value::Map(_)) => {
                    diagnostics.extend(nested.block.check_values(inner, &nested_path));
                }
                (Nesting::List, Value::List(items)) => {
                    for (index, item) in items.iter().enumerate() {
                        diagnostics.extend(nested.block.check_values(item, &nested_path.then_index(index)));
                    }
                }
                _ => {}
            }
        }
        diagnostics
    }

    /// The JSON of the model object a value describes: null and unknown attributes are left
    /// out, and so are attributes `keep` refuses (computed ones, usually). Also says whether
    /// the kept part of the value was wholly known.
    pub fn to_model_json(&self, value: &Value, keep: &dyn Fn(&Attribute) -> bool) -> (serde_json::Value, bool) {
        let mut known = true;
        let json = self.model_json(value, keep, &mut known);
        (json, known)
    }

    fn model_json(&self, value: &Value, keep: &dyn Fn(&Attribute) -> bool, known: &mut bool) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        for attribute in self.attributes.iter().filter(|attribute| keep(attribute)) {
            match value.get(attribute.name) {
                Value::Null => {}
                item if !item.is_wholly_known() => *known = false,
                item => {
                    object.insert(attribute.name.to_owned(), item.to_json());
                }
            }
        }
        for nested in &self.blocks {
            match value.get(nested.name) {
                Value::Null => {}
                Value::Unknown(_) => *known = false,
                Value::List(items) => {
                    let items = items.iter().map(|item| nested.block.model_json(item, keep, known)).collect();
                    object.insert(nested.name.to_owned(), serde_json::Value::Array(items));
                }
                inner => {
                    object.insert(nested.name.to_owned(), nested.block.model_json(inner, keep, known));
                }
            }
        }
        serde_json::Value::Object(object)
    }

    /// The value of a model object's JSON, in its canonical form: what the configuration most
    /// likely says when it agrees with the object. Empty collections become null (left out)
    /// and blocks that are `empty_is_absent` and empty disappear.
    pub fn from_model_json(&self, json: &serde_json::Value) -> Result<Value, ValueError> {
        let mut object = BTreeMap::new();
        for attribute in &self.attributes {
            let value = match json.get(attribute.name) {
                Some(item) => Value::from_json(item, &attribute.ty)?,
                None => Value::Null,
            };
            let value = if attribute.ty.is_collection() && value.is_null_or_empty() { Value::Null } else { value };
            object.insert(attribute.name.to_owned(), value);
        }
        for nested in &self.blocks {
            let value = match (nested.nesting, json.get(nested.name)) {
                (Nesting::Single, None | Some(serde_json::Value::Null)) => Value::Null,
                (Nesting::Single, Some(item)) => {
                    let inner = nested.block.from_model_json(item)?;
                    if nested.empty_is_absent && nested.block.is_empty_value(&inner) { Value::Null } else { inner }
                }
                (Nesting::List, None | Some(serde_json::Value::Null)) => Value::List(Vec::new()),
                (Nesting::List, Some(serde_json::Value::Array(items))) => {
                    Value::List(items.iter().map(|item| nested.block.from_model_json(item)).collect::<Result<_, _>>()?)
                }
                (Nesting::List, Some(other)) => {
                    return Err(ValueError {
                        path: nested.name.to_owned(),
                        message: format!("expected a list, got {other}"),
                    });
                }
            };
            object.insert(nested.name.to_owned(), value);
        }
        Ok(Value::Map(object))
    }

    /// Whether an object of this block holds nothing: all attributes null or empty, all nested
    /// blocks absent or empty.
    pub fn is_empty_value(&self, value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Map(_) => {
                self.attributes.iter().all(|attribute| value.get(attribute.name).is_null_or_empty())
                    && self.blocks.iter().all(|nested| match value.get(nested.name) {
                        Value::Null => true,
                        Value::List(items) => items.is_empty(),
                        inner => nested.empty_is_absent && nested.block.is_empty_value(inner),
                    })
            }
            _ => false,
        }
    }
}

fn split_index(text: &str) -> Option<(usize, &str)> {
    let inner = text.strip_prefix('[')?;
    let close = inner.find(']')?;
    let index = inner[..close].parse().ok()?;
    Some((index, &inner[close + 1..]))
}

fn check_attribute(attribute: &Attribute, value: &Value, path: &AttributePath, diagnostics: &mut Diagnostics) {
    match (value, &attribute.ty) {
        (Value::Null | Value::Unknown(_), _) => {}
        (Value::List(items), Type::List(_)) => {
            for (index, item) in items.iter().enumerate() {
                check_one(attribute, item, &path.then_index(index), diagnostics);
            }
        }
        // Set elements have no index to point at: blame the attribute.
        (Value::List(items), Type::Set(_)) => {
            for item in items {
                check_one(attribute, item, path, diagnostics);
            }
        }
        (Value::Map(entries), Type::Map(_)) => {
            for (key, item) in entries {
                let item_path = path.then_key(key);
                if let Some(key_check) = attribute.key_check
                    && let Err(error) = key_check(key)
                {
                    diagnostics.push(invalid(&item_path, &error.message));
                }
                check_one(attribute, item, &item_path, diagnostics);
            }
        }
        _ => check_one(attribute, value, path, diagnostics),
    }
}

fn check_one(attribute: &Attribute, value: &Value, path: &AttributePath, diagnostics: &mut Diagnostics) {
    let problem = match (attribute.check, value) {
        (Check::Parse(parse), Value::String(text)) => parse(text).err().map(|error| error.message),
        (Check::OneOf(options), Value::String(text)) if !options.contains(&text.as_str()) => {
            Some(format!("{text:?} is not one of {}", quoted_list(options)))
        }
        (Check::Range(min, max), Value::Number(number)) => match number.as_i64() {
            Some(int) if (min..=max).contains(&int) => None,
            Some(_) | None => Some(format!("must be a whole number from {min} to {max}, got {number}")),
        },
        _ => None,
    };
    if let Some(message) = problem {
        diagnostics.push(invalid(path, &message));
    }
}

/// The diagnostic for a value that breaks a rule.
pub fn invalid(path: &AttributePath, message: &str) -> Diagnostic {
    Diagnostic::error_at(path.clone(), format!("Invalid value for {path}"), format!("{path}: {message}"))
}

/// The diagnostic for a model validation error, placed on the attribute the field maps to.
pub fn validation_error(block: &Block, error: &ValidationError) -> Diagnostic {
    let path = error.field.as_deref().map(|field| block.path_of(field)).unwrap_or_default();
    if path.is_root() {
        let message = match &error.field {
            Some(field) => format!("{field}: {}", error.message),
            None => error.message.clone(),
        };
        Diagnostic::error("Invalid configuration", message)
    } else {
        invalid(&path, &error.message)
    }
}

fn quoted_list(options: &[&str]) -> String {
    options.iter().map(|option| format!("{option:?}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgible::model::{EnvName, Hostname, Name};

    fn application_like() -> Block {
        Block::new("test")
            .attribute(Attribute::required("name", Type::String, "").check(Check::Parse(parses::<Name>)))
            .attribute(
                Attribute::required("hostnames", Type::list(Type::String), "").check(Check::Parse(parses::<Hostname>)),
            )
            .attribute(Attribute::optional("env", Type::map(Type::String), "").keys(parses::<EnvName>))
            .attribute(Attribute::required("port", Type::Number, "").check(Check::Range(1, 65535)))
            .attribute(Attribute::computed("id", Type::String, ""))
            .block(NestedBlock::required(
                "workload",
                Block::new("").block(NestedBlock::single(
                    "process",
                    Block::new("")
                        .attribute(Attribute::required("command", Type::String, ""))
                        .attribute(Attribute::optional("env", Type::map(Type::String), "").keys(parses::<EnvName>)),
                )),
            ))
            .block(NestedBlock::list(
                "storage",
                Block::new("").attribute(Attribute::required("name", Type::String, "")).attribute(Attribute::required(
                    "mount_path",
                    Type::String,
                    "",
                )),
            ))
            .block(
                NestedBlock::single("access", Block::new("").block(NestedBlock::single("api_key", Block::new(""))))
                    .empty_is_absent(),
            )
    }

    #[test]
    fn model_fields_map_to_attribute_paths() {
        let block = application_like();
        assert_eq!(block.path_of("hostnames[1]").to_string(), "hostnames[1]");
        assert_eq!(block.path_of("workload.process.command").to_string(), "workload.process.command");
        assert_eq!(block.path_of("workload.process.env.MY_VAR").to_string(), "workload.process.env[\"MY_VAR\"]");
        assert_eq!(block.path_of("storage[2].mount_path").to_string(), "storage[2].mount_path");
        assert_eq!(block.path_of("storage").to_string(), "storage");
        assert_eq!(block.path_of("env.A.B").to_string(), "env[\"A.B\"]");
        assert!(block.path_of("surprise").is_root());
        assert_eq!(block.path_of("workload.moon").to_string(), "workload");
    }

    #[test]
    fn known_values_are_checked_with_their_paths() {
        let block = application_like();
        let value = Value::from_json(
            &serde_json::json!({
                "name": "Web",
                "hostnames": ["ok.example.test", "Bad.example.test"],
                "env": {"9X": "y"},
                "port": 70000,
                "storage": [],
                "workload": {"process": {"command": "x", "env": {"OK": "1"}}},
            }),
            &block.value_type(),
        )
        .unwrap();
        let diagnostics = block.check_values(&value, &AttributePath::root());
        let paths: Vec<String> =
            diagnostics.0.iter().map(|d| d.path.as_ref().map(ToString::to_string).unwrap_or_default()).collect();
        assert_eq!(paths, ["name", "hostnames[1]", "env[\"9X\"]", "port"]);
        assert!(diagnostics.0[1].detail.contains("lowercase"), "{}", diagnostics.0[1].detail);
    }

    #[test]
    fn unknown_values_are_not_checked() {
        let block = application_like();
        let mut value = Value::Map(BTreeMap::new());
        value.set("name", Value::unknown());
        value.set("hostnames", Value::List(vec![Value::unknown()]));
        assert!(block.check_values(&value, &AttributePath::root()).is_empty());
    }

    #[test]
    fn model_json_round_trips_in_canonical_form() {
        let block = application_like();
        let json = serde_json::json!({
            "name": "web",
            "hostnames": ["a.example.test"],
            "env": {},
            "port": 80,
            "workload": {"process": {"command": "/bin/web", "env": {}}},
            "storage": [],
            "access": {},
        });
        let value = block.from_model_json(&json).unwrap();
        assert_eq!(value.get("env"), &Value::Null);
        assert_eq!(value.get("access"), &Value::Null, "an empty access block means public");
        assert_eq!(value.get("storage"), &Value::List(vec![]));
        let (back, known) = block.to_model_json(&value, &|attribute| !attribute.is_computed_only());
        assert!(known);
        assert_eq!(
            back,
            serde_json::json!({
                "name": "web", "hostnames": ["a.example.test"], "port": 80,
                "workload": {"process": {"command": "/bin/web"}}, "storage": [],
            })
        );

        let with_key = block.from_model_json(&serde_json::json!({"access": {"api_key": {}}})).unwrap();
        assert!(matches!(with_key.get("access").get("api_key"), Value::Map(_)), "api_key {{}} carries meaning");
    }

    #[test]
    fn schemas_encode_for_the_protocol() {
        let schema = Schema::new(application_like());
        let proto = schema.to_proto();
        let block = proto.block.unwrap();
        let hostnames = block.attributes.iter().find(|a| a.name == "hostnames").unwrap();
        assert_eq!(hostnames.r#type, br#"["list","string"]"#);
        assert!(hostnames.required);
        let id = block.attributes.iter().find(|a| a.name == "id").unwrap();
        assert!(id.computed && !id.optional);
        let workload = block.block_types.iter().find(|b| b.type_name == "workload").unwrap();
        assert_eq!((workload.min_items, workload.max_items), (1, 1));
    }
}
