//! Plan semantics, decided by the schema alone and free of IO.
//!
//! - [`plan`] turns Terraform's proposed new state into the planned state: defaults filled in,
//!   computed values unknown only when they will change, replacements only for attributes the
//!   server cannot update in place.
//! - [`reconcile`] shapes a state built from the server's answer like the state Terraform
//!   expects (the plan after an apply, the prior state after a refresh) wherever both mean
//!   the same: `[]` versus null, an empty `access {}` block, `...Z` versus `...+00:00`.
//!   Without it an apply would fail Terraform's consistency check and every plan would show
//!   spurious changes.

use chrono::{DateTime, FixedOffset};

use crate::diagnostics::AttributePath;
use crate::schema::{Attribute, Block, NestedBlock, Nesting};
use crate::value::{Type, Value};

/// The outcome of planning one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub planned: Value,
    pub requires_replace: Vec<AttributePath>,
}

/// Plans a change. `prior` is null for a creation; `proposed` is Terraform's proposal
/// (configuration merged with prior computed values); `config` is the configuration.
pub fn plan(block: &Block, prior: &Value, proposed: &Value, config: &Value) -> Plan {
    if proposed.is_null() {
        return Plan { planned: Value::Null, requires_replace: Vec::new() };
    }
    let mut planned = proposed.clone();
    apply_defaults(block, &mut planned, config);
    if prior.is_null() {
        mark_computed_unknown(block, &mut planned, config, true);
        return Plan { planned, requires_replace: Vec::new() };
    }
    mark_computed_unknown(block, &mut planned, config, false);
    if block_equivalent(block, prior, &planned) {
        // Nothing the user controls changes: keep the prior state exactly so that Terraform
        // sees no difference at all.
        return Plan { planned: prior.clone(), requires_replace: Vec::new() };
    }
    if only_local_changes(block, prior, &planned) {
        // Only the provider's own settings change: the object stays as it is, and so does
        // everything the server computes.
        let mut kept = prior.clone();
        for attribute in block.attributes.iter().filter(|attribute| attribute.local) {
            kept.set(attribute.name, planned.get(attribute.name).clone());
        }
        return Plan { planned: kept, requires_replace: Vec::new() };
    }
    let requires_replace: Vec<AttributePath> = block
        .attributes
        .iter()
        .filter(|attribute| {
            attribute.requires_replace
                && !attribute_equivalent(attribute, prior.get(attribute.name), planned.get(attribute.name))
        })
        .map(|attribute| AttributePath::attribute(attribute.name))
        .collect();
    for attribute in block.attributes.iter().filter(|attribute| attribute.is_computed_only()) {
        // A replacement is a new object: every computed value is new too.
        if attribute.changes_on_write || !requires_replace.is_empty() {
            planned.set(attribute.name, Value::unknown());
        }
    }
    Plan { planned, requires_replace }
}

/// Fills optional attributes the configuration leaves out with their defaults, in nested
/// blocks too.
fn apply_defaults(block: &Block, planned: &mut Value, config: &Value) {
    if !matches!(planned, Value::Map(_)) {
        return;
    }
    for attribute in &block.attributes {
        if let Some(default) = &attribute.default
            && config.get(attribute.name).is_null()
        {
            planned.set(attribute.name, default.clone());
        }
    }
    for nested in &block.blocks {
        let config_inner = config.get(nested.name).clone();
        let Some(inner) = planned.get_mut(nested.name) else { continue };
        match (nested.nesting, inner, config_inner) {
            (Nesting::Single, inner @ Value::Map(_), config_inner) => {
                apply_defaults(&nested.block, inner, &config_inner)
            }
            (Nesting::List, Value::List(items), Value::List(config_items)) if items.len() == config_items.len() => {
                for (item, config_item) in items.iter_mut().zip(&config_items) {
                    apply_defaults(&nested.block, item, config_item);
                }
            }
            _ => {}
        }
    }
}

/// Makes the values the server will decide unknown: computed attributes that neither the
/// configuration nor the prior state sets. On an update (`top_level` false) the top-level
/// computed attributes keep their prior values; only nested ones (a newly added block) are
/// decided anew.
fn mark_computed_unknown(block: &Block, planned: &mut Value, config: &Value, top_level: bool) {
    if !matches!(planned, Value::Map(_)) {
        return;
    }
    if top_level {
        for attribute in block.attributes.iter().filter(|attribute| attribute.is_computed()) {
            if attribute.default.is_none()
                && config.get(attribute.name).is_null()
                && planned.get(attribute.name).is_null()
            {
                planned.set(attribute.name, Value::unknown());
            }
        }
    }
    for nested in &block.blocks {
        let config_inner = config.get(nested.name).clone();
        let Some(inner) = planned.get_mut(nested.name) else { continue };
        match (nested.nesting, inner, config_inner) {
            (Nesting::Single, inner @ Value::Map(_), config_inner) => {
                mark_computed_unknown(&nested.block, inner, &config_inner, true);
            }
            (Nesting::List, Value::List(items), Value::List(config_items)) if items.len() == config_items.len() => {
                for (item, config_item) in items.iter_mut().zip(&config_items) {
                    mark_computed_unknown(&nested.block, item, config_item, true);
                }
            }
            _ => {}
        }
    }
}

/// Whether two values of a block mean the same to the platform, looking only at what the
/// user controls (computed-only attributes are ignored).
pub fn block_equivalent(block: &Block, a: &Value, b: &Value) -> bool {
    equivalent_where(block, a, b, &|attribute| !attribute.is_computed_only())
}

/// Whether two values of a block differ, and only in the provider's own settings
/// ([`Attribute::local`]): an update that writes nothing to the server.
pub fn only_local_changes(block: &Block, a: &Value, b: &Value) -> bool {
    !block_equivalent(block, a, b)
        && equivalent_where(block, a, b, &|attribute| !attribute.is_computed_only() && !attribute.local)
}

fn equivalent_where(block: &Block, a: &Value, b: &Value, compared: &dyn Fn(&Attribute) -> bool) -> bool {
    match (a, b) {
        (Value::Unknown(_), _) | (_, Value::Unknown(_)) => false,
        (Value::Null, Value::Null) => true,
        (Value::Map(_), Value::Map(_)) => {
            block
                .attributes
                .iter()
                .filter(|attribute| compared(attribute))
                .all(|attribute| attribute_equivalent(attribute, a.get(attribute.name), b.get(attribute.name)))
                && block.blocks.iter().all(|nested| nested_equivalent(nested, a.get(nested.name), b.get(nested.name)))
        }
        _ => false,
    }
}

fn nested_equivalent(nested: &NestedBlock, a: &Value, b: &Value) -> bool {
    match nested.nesting {
        Nesting::Single => {
            if nested.empty_is_absent && nested.block.is_empty_value(a) && nested.block.is_empty_value(b) {
                return true;
            }
            block_equivalent(&nested.block, a, b)
        }
        Nesting::List => match (a, b) {
            (Value::List(a_items), Value::List(b_items)) => {
                a_items.len() == b_items.len()
                    && a_items.iter().zip(b_items).all(|(a, b)| block_equivalent(&nested.block, a, b))
            }
            _ => a.is_null_or_empty() && b.is_null_or_empty(),
        },
    }
}

/// Whether two values of an attribute mean the same: null equals an empty collection, sets
/// ignore order, timestamps compare as instants.
pub fn attribute_equivalent(attribute: &Attribute, a: &Value, b: &Value) -> bool {
    if attribute.timestamp
        && let (Some(a), Some(b)) = (a.as_str().and_then(parse_timestamp), b.as_str().and_then(parse_timestamp))
    {
        return a == b;
    }
    value_equivalent(&attribute.ty, a, b)
}

fn parse_timestamp(text: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(text).ok()
}

fn value_equivalent(ty: &Type, a: &Value, b: &Value) -> bool {
    match (ty, a, b) {
        (_, Value::Unknown(_), _) | (_, _, Value::Unknown(_)) => false,
        (ty, a, b) if ty.is_collection() && a.is_null_or_empty() && b.is_null_or_empty() => true,
        (Type::List(element), Value::List(a_items), Value::List(b_items)) => {
            a_items.len() == b_items.len() && a_items.iter().zip(b_items).all(|(a, b)| value_equivalent(element, a, b))
        }
        (Type::Set(element), Value::List(a_items), Value::List(b_items)) => {
            a_items.len() == b_items.len()
                && a_items.iter().all(|a| b_items.iter().any(|b| value_equivalent(element, a, b)))
                && b_items.iter().all(|b| a_items.iter().any(|a| value_equivalent(element, a, b)))
        }
        (Type::Map(element), Value::Map(a_entries), Value::Map(b_entries)) => {
            a_entries.len() == b_entries.len()
                && a_entries.iter().all(|(key, a)| b_entries.get(key).is_some_and(|b| value_equivalent(element, a, b)))
        }
        _ => a == b,
    }
}

/// Which state a freshly built state is shaped after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// The planned state, after an apply: computed values the plan knew stay as planned.
    Planned,
    /// The prior state, after a refresh: computed values come from the server, except
    /// write-once ones (secrets) the server no longer returns.
    Prior,
}

/// Shapes `fresh` (built from the server's answer) like `reference` wherever both mean the
/// same, so that Terraform sees no change where there is none.
pub fn reconcile(block: &Block, fresh: Value, reference: &Value, against: Against) -> Value {
    let (Value::Map(_), Value::Map(_)) = (&fresh, reference) else {
        return fresh;
    };
    let mut result = fresh;
    for attribute in &block.attributes {
        let current = result.get(attribute.name).clone();
        let expected = reference.get(attribute.name);
        let chosen = if attribute.local {
            // The server knows nothing of the provider's own settings: they are what the
            // plan (or the prior state) says.
            expected.clone()
        } else if attribute.is_computed_only() {
            match against {
                Against::Planned if !expected.is_unknown() => expected.clone(),
                Against::Prior if attribute.write_once && current.is_null() => expected.clone(),
                _ => current,
            }
        } else if !expected.is_unknown() && attribute_equivalent(attribute, &current, expected) {
            expected.clone()
        } else {
            current
        };
        result.set(attribute.name, chosen);
    }
    for nested in &block.blocks {
        let current = result.get(nested.name).clone();
        let expected = reference.get(nested.name);
        let chosen = match (nested.nesting, &current, expected) {
            (_, _, Value::Unknown(_)) => current,
            (Nesting::Single, Value::Map(_), Value::Map(_)) => reconcile(&nested.block, current, expected, against),
            (Nesting::List, Value::List(items), Value::List(expected_items)) if items.len() == expected_items.len() => {
                Value::List(
                    items
                        .iter()
                        .zip(expected_items)
                        .map(|(item, expected_item)| reconcile(&nested.block, item.clone(), expected_item, against))
                        .collect(),
                )
            }
            _ if nested_equivalent(nested, &current, expected) => expected.clone(),
            _ => current,
        };
        result.set(nested.name, chosen);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Attribute, NestedBlock};

    fn block() -> Block {
        Block::new("test")
            .attribute(Attribute::computed("id", Type::String, ""))
            .attribute(Attribute::computed("revision", Type::Number, "").changes_on_write())
            .attribute(Attribute::computed("secret", Type::String, "").sensitive().write_once())
            .attribute(Attribute::required("name", Type::String, ""))
            .attribute(Attribute::required("cidr", Type::String, "").requires_replace())
            .attribute(Attribute::optional("args", Type::list(Type::String), ""))
            .attribute(Attribute::optional("scopes", Type::set(Type::String), ""))
            .attribute(Attribute::optional("expires_at", Type::String, "").timestamp())
            .block(NestedBlock::single(
                "health",
                Block::new("")
                    .attribute(Attribute::required("protocol", Type::String, ""))
                    .attribute(Attribute::defaulted("interval", Type::Number, Value::int(10), "")),
            ))
            .block(
                NestedBlock::single("access", Block::new("").block(NestedBlock::single("api_key", Block::new(""))))
                    .empty_is_absent(),
            )
            .block(NestedBlock::list(
                "storage",
                Block::new("").attribute(Attribute::optional_computed("code", Type::String, "")),
            ))
    }

    fn value(json: serde_json::Value) -> Value {
        Value::from_json(&json, &block().value_type()).unwrap()
    }

    #[test]
    fn creation_leaves_computed_values_unknown_and_fills_defaults() {
        let config =
            value(serde_json::json!({"name": "a", "cidr": "x", "health": {"protocol": "http"}, "storage": [{}]}));
        let outcome = plan(&block(), &Value::Null, &config, &config);
        assert!(outcome.planned.get("id").is_unknown());
        assert!(outcome.planned.get("revision").is_unknown());
        assert!(outcome.planned.get("secret").is_unknown());
        assert_eq!(outcome.planned.get("health").get("interval"), &Value::int(10));
        let Value::List(storage) = outcome.planned.get("storage") else { panic!("storage is a list") };
        assert!(storage[0].get("code").is_unknown(), "the server picks the code");
        assert!(outcome.requires_replace.is_empty());
    }

    #[test]
    fn an_unchanged_configuration_plans_exactly_the_prior_state() {
        let prior = value(serde_json::json!({
            "id": "1", "revision": 7, "secret": "s", "name": "a", "cidr": "x", "args": null,
            "scopes": ["write", "read"], "expires_at": "2030-01-01T00:00:00Z",
            "health": {"protocol": "http", "interval": 10}, "access": null, "storage": [],
        }));
        let config = value(serde_json::json!({
            "name": "a", "cidr": "x", "args": [], "scopes": ["read", "write"],
            "expires_at": "2030-01-01T01:00:00+01:00", "health": {"protocol": "http"}, "access": {},
        }));
        let mut proposed = config.clone();
        for computed in ["id", "revision", "secret"] {
            proposed.set(computed, prior.get(computed).clone());
        }
        let outcome = plan(&block(), &prior, &proposed, &config);
        assert_eq!(outcome.planned, prior);
    }

    #[test]
    fn a_change_makes_the_revision_unknown_and_keeps_the_rest() {
        let prior = value(serde_json::json!({"id": "1", "revision": 7, "secret": "s", "name": "a", "cidr": "x"}));
        let config = value(serde_json::json!({"name": "b", "cidr": "x"}));
        let mut proposed = config.clone();
        for computed in ["id", "revision", "secret"] {
            proposed.set(computed, prior.get(computed).clone());
        }
        let outcome = plan(&block(), &prior, &proposed, &config);
        assert!(outcome.requires_replace.is_empty());
        assert!(outcome.planned.get("revision").is_unknown());
        assert_eq!(outcome.planned.get("id"), &Value::string("1"));
        assert_eq!(outcome.planned.get("secret"), &Value::string("s"));

        let config = value(serde_json::json!({"name": "a", "cidr": "y"}));
        let mut proposed = config.clone();
        proposed.set("id", Value::string("1"));
        let outcome = plan(&block(), &prior, &proposed, &config);
        assert_eq!(outcome.requires_replace, vec![AttributePath::attribute("cidr")]);
        assert!(outcome.planned.get("id").is_unknown());
    }

    #[test]
    fn reconcile_keeps_the_expected_shape_of_equal_values() {
        let fresh = value(serde_json::json!({
            "id": "1", "revision": 8, "secret": null, "name": "a", "cidr": "x", "args": null,
            "expires_at": "2030-01-01T00:00:00Z", "access": null, "storage": [{"code": "abc123"}],
        }));
        let planned = value(serde_json::json!({
            "id": "1", "secret": "s", "name": "a", "cidr": "x", "args": [],
            "expires_at": "2030-01-01T01:00:00+01:00", "access": {}, "storage": [{}],
        }));
        let mut planned = planned;
        planned.set("revision", Value::unknown());
        if let Some(Value::List(items)) = planned.get_mut("storage") {
            items[0].set("code", Value::unknown());
        }
        let state = reconcile(&block(), fresh, &planned, Against::Planned);
        assert_eq!(state.get("revision"), &Value::int(8));
        assert_eq!(state.get("secret"), &Value::string("s"));
        assert_eq!(state.get("args"), &Value::List(vec![]));
        assert_eq!(state.get("expires_at"), &Value::string("2030-01-01T01:00:00+01:00"));
        assert!(matches!(state.get("access"), Value::Map(_)));
        let Value::List(storage) = state.get("storage") else { panic!("storage is a list") };
        assert_eq!(storage[0].get("code"), &Value::string("abc123"));
    }

    fn block_with_local() -> Block {
        block().attribute(Attribute::optional("wait_seconds", Type::Number, "").local())
    }

    #[test]
    fn a_change_of_local_settings_alone_keeps_the_object_and_its_computed_values() {
        let block = block_with_local();
        let value = |json| Value::from_json(&json, &block.value_type()).unwrap();
        let prior =
            value(serde_json::json!({"id": "1", "revision": 7, "name": "a", "cidr": "x", "wait_seconds": null}));
        let config = value(serde_json::json!({"name": "a", "cidr": "x", "wait_seconds": 60}));
        let mut proposed = config.clone();
        for computed in ["id", "revision", "secret"] {
            proposed.set(computed, prior.get(computed).clone());
        }
        let outcome = plan(&block, &prior, &proposed, &config);
        assert_eq!(outcome.planned.get("revision"), &Value::int(7), "nothing is written, nothing changes");
        assert_eq!(outcome.planned.get("wait_seconds"), &Value::int(60));
        assert!(only_local_changes(&block, &prior, &outcome.planned));
        assert!(!only_local_changes(&block, &prior, &prior), "no change at all");

        // With a change of the object as well, it is an ordinary update.
        let config = value(serde_json::json!({"name": "b", "cidr": "x", "wait_seconds": 60}));
        let mut proposed = config.clone();
        proposed.set("id", Value::string("1"));
        proposed.set("revision", Value::int(7));
        let outcome = plan(&block, &prior, &proposed, &config);
        assert!(outcome.planned.get("revision").is_unknown());
        assert!(!only_local_changes(&block, &prior, &outcome.planned));
    }

    #[test]
    fn local_settings_come_from_the_plan_or_the_prior_state_never_the_server() {
        let block = block_with_local();
        let value = |json| Value::from_json(&json, &block.value_type()).unwrap();
        let fresh = value(serde_json::json!({"id": "1", "revision": 8, "name": "a", "cidr": "x"}));
        let planned =
            value(serde_json::json!({"id": "1", "revision": 8, "name": "a", "cidr": "x", "wait_seconds": 60}));
        let state = reconcile(&block, fresh.clone(), &planned, Against::Planned);
        assert_eq!(state.get("wait_seconds"), &Value::int(60));
        let state = reconcile(&block, fresh, &planned, Against::Prior);
        assert_eq!(state.get("wait_seconds"), &Value::int(60));
    }

    #[test]
    fn a_refresh_shows_real_changes_and_keeps_secrets() {
        let prior = value(serde_json::json!({"id": "1", "revision": 7, "secret": "s", "name": "a", "cidr": "x"}));
        let fresh = value(serde_json::json!({"id": "1", "revision": 9, "secret": null, "name": "b", "cidr": "x"}));
        let state = reconcile(&block(), fresh, &prior, Against::Prior);
        assert_eq!(state.get("name"), &Value::string("b"));
        assert_eq!(state.get("revision"), &Value::int(9));
        assert_eq!(state.get("secret"), &Value::string("s"));
    }
}
