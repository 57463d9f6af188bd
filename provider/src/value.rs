//! Terraform values on the wire and in between.
//!
//! Terraform sends and expects values as `DynamicValue`s: MessagePack (or JSON) shaped by the
//! type the provider's schema implies. [`Value`] is the decoded form the rest of the provider
//! works with; [`Type`] is the type constraint that drives encoding, because an object must
//! carry every attribute of its type (absent ones as nil) and numbers must stay numbers.
//!
//! Unknown values ("known after apply") are MessagePack extensions. Terraform may attach
//! refinements to them (extension code 12); they are kept verbatim so that a plan hands them
//! back unchanged.

use std::collections::BTreeMap;
use std::fmt;

use rmpv::Value as Pack;

/// A value of Terraform's type system, without its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// Not known until apply.
    Unknown(Unknown),
    Bool(bool),
    Number(Number),
    String(String),
    /// A list, a set or a tuple.
    List(Vec<Value>),
    /// A map or an object.
    Map(BTreeMap<String, Value>),
}

/// The MessagePack extension an unknown value arrived as, kept so it can be sent back as is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unknown {
    code: i8,
    payload: Vec<u8>,
}

/// Extension code 0: an unknown without refinements. Its payload is ignored by Terraform.
const UNKNOWN_PLAIN: i8 = 0;

/// A Terraform number. Integers stay integers so that `port = 8080` round-trips exactly.
#[derive(Debug, Clone, Copy)]
pub enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            // Values past 2^53 lose precision here; no attribute of this provider gets there.
            Number::Int(int) => int as f64,
            Number::Float(float) => float,
        }
    }

    /// The number as an integer, if it is one.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Number::Int(int) => Some(int),
            Number::Float(float) if float.fract() == 0.0 && float.abs() < 9.0e15 => Some(float as i64),
            Number::Float(_) => None,
        }
    }
}

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        match (self.as_i64(), other.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => self.as_f64() == other.as_f64(),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(int) => write!(f, "{int}"),
            Number::Float(float) => write!(f, "{float}"),
        }
    }
}

/// A Terraform type constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    String,
    Number,
    Bool,
    List(Box<Type>),
    Set(Box<Type>),
    Map(Box<Type>),
    Object(BTreeMap<String, Type>),
}

impl Type {
    pub fn list(element: Type) -> Type {
        Type::List(Box::new(element))
    }

    pub fn set(element: Type) -> Type {
        Type::Set(Box::new(element))
    }

    pub fn map(element: Type) -> Type {
        Type::Map(Box::new(element))
    }

    /// The JSON form the protocol uses in `Schema.Attribute.type`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Type::String => json!("string"),
            Type::Number => json!("number"),
            Type::Bool => json!("bool"),
            Type::List(element) => json!(["list", element.to_json()]),
            Type::Set(element) => json!(["set", element.to_json()]),
            Type::Map(element) => json!(["map", element.to_json()]),
            Type::Object(attributes) => {
                let attributes: serde_json::Map<String, serde_json::Value> =
                    attributes.iter().map(|(name, ty)| (name.clone(), ty.to_json())).collect();
                json!(["object", attributes])
            }
        }
    }

    /// Whether values of this type are collections, for which null and empty mean the same to
    /// the platform.
    pub fn is_collection(&self) -> bool {
        matches!(self, Type::List(_) | Type::Set(_) | Type::Map(_))
    }
}

/// A value that does not fit the type it was decoded or encoded with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ValueError {
    /// Where in the value, as `a.b[2]`.
    pub path: String,
    pub message: String,
}

impl ValueError {
    fn new(message: impl Into<String>) -> Self {
        Self { path: String::new(), message: message.into() }
    }

    fn within(mut self, step: &str) -> Self {
        self.path = match (self.path.is_empty(), step.starts_with('[')) {
            (true, _) => step.to_owned(),
            (false, true) => format!("{step}{}", self.path),
            (false, false) if self.path.starts_with('[') => format!("{step}{}", self.path),
            (false, false) => format!("{step}.{}", self.path),
        };
        self
    }
}

impl Value {
    pub fn unknown() -> Value {
        Value::Unknown(Unknown { code: UNKNOWN_PLAIN, payload: vec![0] })
    }

    pub fn string(value: impl Into<String>) -> Value {
        Value::String(value.into())
    }

    pub fn int(value: i64) -> Value {
        Value::Number(Number::Int(value))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Value::Unknown(_))
    }

    /// Whether this value and everything inside it is known.
    pub fn is_wholly_known(&self) -> bool {
        match self {
            Value::Unknown(_) => false,
            Value::List(items) => items.iter().all(Value::is_wholly_known),
            Value::Map(entries) => entries.values().all(Value::is_wholly_known),
            _ => true,
        }
    }

    /// Null, or a collection without elements.
    pub fn is_null_or_empty(&self) -> bool {
        match self {
            Value::Null => true,
            Value::List(items) => items.is_empty(),
            Value::Map(entries) => entries.is_empty(),
            _ => false,
        }
    }

    /// The attribute `name` of an object value; null for a null object or a missing attribute.
    pub fn get(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        match self {
            Value::Map(entries) => entries.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// A mutable attribute of an object value, if this is an object.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        match self {
            Value::Map(entries) => entries.get_mut(name),
            _ => None,
        }
    }

    /// Sets an attribute of an object value; does nothing on other values.
    pub fn set(&mut self, name: &str, value: Value) {
        if let Value::Map(entries) = self {
            entries.insert(name.to_owned(), value);
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(string) => Some(string),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(number) => number.as_i64(),
            _ => None,
        }
    }

    /// Replaces every unknown inside this value with null. A state must never hold unknowns.
    pub fn unknowns_to_null(self) -> Value {
        match self {
            Value::Unknown(_) => Value::Null,
            Value::List(items) => Value::List(items.into_iter().map(Value::unknowns_to_null).collect()),
            Value::Map(entries) => {
                Value::Map(entries.into_iter().map(|(key, value)| (key, value.unknowns_to_null())).collect())
            }
            other => other,
        }
    }

    // -----------------------------------------------------------------------------------------
    // MessagePack

    /// Decodes MessagePack shaped by `ty`.
    pub fn from_msgpack(bytes: &[u8], ty: &Type) -> Result<Value, ValueError> {
        let mut reader = bytes;
        let pack = rmpv::decode::read_value(&mut reader)
            .map_err(|error| ValueError::new(format!("malformed MessagePack: {error}")))?;
        if !reader.is_empty() {
            return Err(ValueError::new("trailing bytes after the MessagePack value"));
        }
        from_pack(pack, ty)
    }

    /// Encodes as MessagePack shaped by `ty`: objects carry every attribute of the type.
    pub fn to_msgpack(&self, ty: &Type) -> Result<Vec<u8>, ValueError> {
        let pack = to_pack(self, ty)?;
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &pack)
            .map_err(|error| ValueError::new(format!("cannot encode MessagePack: {error}")))?;
        Ok(bytes)
    }

    // -----------------------------------------------------------------------------------------
    // JSON

    /// Decodes the JSON form Terraform uses for stored state and as a fallback encoding.
    /// Attributes the type does not have are dropped (state written by an older schema).
    pub fn from_json(json: &serde_json::Value, ty: &Type) -> Result<Value, ValueError> {
        use serde_json::Value as Json;
        Ok(match (json, ty) {
            (Json::Null, _) => Value::Null,
            (Json::String(string), Type::String) => Value::String(string.clone()),
            (Json::Bool(bool), Type::String) => Value::String(bool.to_string()),
            (Json::Number(number), Type::String) => Value::String(number.to_string()),
            (Json::Number(number), Type::Number) => Value::Number(json_number(number)?),
            (Json::String(string), Type::Number) => Value::Number(parse_number(string)?),
            (Json::Bool(bool), Type::Bool) => Value::Bool(*bool),
            (Json::String(string), Type::Bool) => match string.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(ValueError::new(format!("{string:?} is not a bool"))),
            },
            (Json::Array(items), Type::List(element) | Type::Set(element)) => Value::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| Value::from_json(item, element).map_err(|e| e.within(&format!("[{index}]"))))
                    .collect::<Result<_, _>>()?,
            ),
            (Json::Object(entries), Type::Map(element)) => Value::Map(
                entries
                    .iter()
                    .map(|(key, item)| Ok((key.clone(), Value::from_json(item, element).map_err(|e| e.within(key))?)))
                    .collect::<Result<_, ValueError>>()?,
            ),
            (Json::Object(entries), Type::Object(attributes)) => Value::Map(
                attributes
                    .iter()
                    .map(|(name, ty)| {
                        let value = match entries.get(name) {
                            Some(item) => Value::from_json(item, ty).map_err(|e| e.within(name))?,
                            None => Value::Null,
                        };
                        Ok((name.clone(), value))
                    })
                    .collect::<Result<_, ValueError>>()?,
            ),
            (json, ty) => return Err(ValueError::new(format!("expected {}, got {json}", ty.to_json()))),
        })
    }

    /// The JSON form of a value; unknowns become null, null attributes stay.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as Json;
        match self {
            Value::Null | Value::Unknown(_) => Json::Null,
            Value::Bool(bool) => Json::Bool(*bool),
            Value::Number(number) => match number.as_i64() {
                Some(int) => Json::from(int),
                None => serde_json::Number::from_f64(number.as_f64()).map(Json::Number).unwrap_or(Json::Null),
            },
            Value::String(string) => Json::String(string.clone()),
            Value::List(items) => Json::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(entries) => {
                Json::Object(entries.iter().map(|(key, value)| (key.clone(), value.to_json())).collect())
            }
        }
    }
}

fn json_number(number: &serde_json::Number) -> Result<Number, ValueError> {
    if let Some(int) = number.as_i64() {
        return Ok(Number::Int(int));
    }
    number.as_f64().map(Number::Float).ok_or_else(|| ValueError::new(format!("{number} is out of range")))
}

fn parse_number(text: &str) -> Result<Number, ValueError> {
    if let Ok(int) = text.parse::<i64>() {
        return Ok(Number::Int(int));
    }
    text.parse::<f64>().map(Number::Float).map_err(|_| ValueError::new(format!("{text:?} is not a number")))
}

fn from_pack(pack: Pack, ty: &Type) -> Result<Value, ValueError> {
    Ok(match (pack, ty) {
        (Pack::Nil, _) => Value::Null,
        // Any extension is an unknown value, whatever the type (protocol rule).
        (Pack::Ext(code, payload), _) => Value::Unknown(Unknown { code, payload }),
        (Pack::String(string), Type::String) => match string.into_str() {
            Some(string) => Value::String(string),
            None => return Err(ValueError::new("string is not valid UTF-8")),
        },
        (Pack::Integer(int), Type::Number) => match int.as_i64() {
            Some(int) => Value::Number(Number::Int(int)),
            None => Value::Number(Number::Float(int.as_f64().unwrap_or(f64::MAX))),
        },
        (Pack::F32(float), Type::Number) => Value::Number(Number::Float(f64::from(float))),
        (Pack::F64(float), Type::Number) => Value::Number(Number::Float(float)),
        // Numbers too precise for a float arrive as decimal strings.
        (Pack::String(string), Type::Number) => match string.as_str() {
            Some(text) => Value::Number(parse_number(text)?),
            None => return Err(ValueError::new("number is not valid UTF-8")),
        },
        (Pack::Boolean(bool), Type::Bool) => Value::Bool(bool),
        (Pack::Array(items), Type::List(element) | Type::Set(element)) => Value::List(
            items
                .into_iter()
                .enumerate()
                .map(|(index, item)| from_pack(item, element).map_err(|e| e.within(&format!("[{index}]"))))
                .collect::<Result<_, _>>()?,
        ),
        (Pack::Map(entries), Type::Map(element)) => Value::Map(
            entries
                .into_iter()
                .map(|(key, item)| {
                    let key = pack_key(key)?;
                    let value = from_pack(item, element).map_err(|e| e.within(&key))?;
                    Ok((key, value))
                })
                .collect::<Result<_, ValueError>>()?,
        ),
        (Pack::Map(entries), Type::Object(attributes)) => {
            let mut object = BTreeMap::new();
            for (key, item) in entries {
                let key = pack_key(key)?;
                let Some(ty) = attributes.get(&key) else {
                    return Err(ValueError::new(format!("unsupported attribute {key:?}")));
                };
                let value = from_pack(item, ty).map_err(|e| e.within(&key))?;
                object.insert(key, value);
            }
            for name in attributes.keys() {
                object.entry(name.clone()).or_insert(Value::Null);
            }
            Value::Map(object)
        }
        (pack, ty) => return Err(ValueError::new(format!("expected {}, got {pack}", ty.to_json()))),
    })
}

fn pack_key(key: Pack) -> Result<String, ValueError> {
    match key {
        Pack::String(string) => string.into_str().ok_or_else(|| ValueError::new("map key is not valid UTF-8")),
        other => Err(ValueError::new(format!("map key {other} is not a string"))),
    }
}

fn to_pack(value: &Value, ty: &Type) -> Result<Pack, ValueError> {
    Ok(match (value, ty) {
        (Value::Null, _) => Pack::Nil,
        (Value::Unknown(unknown), _) => Pack::Ext(unknown.code, unknown.payload.clone()),
        (Value::String(string), Type::String) => Pack::from(string.as_str()),
        (Value::Number(Number::Int(int)), Type::Number) => Pack::from(*int),
        (Value::Number(Number::Float(float)), Type::Number) => Pack::F64(*float),
        (Value::Bool(bool), Type::Bool) => Pack::Boolean(*bool),
        (Value::List(items), Type::List(element) | Type::Set(element)) => Pack::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| to_pack(item, element).map_err(|e| e.within(&format!("[{index}]"))))
                .collect::<Result<_, _>>()?,
        ),
        (Value::Map(entries), Type::Map(element)) => Pack::Map(
            entries
                .iter()
                .map(|(key, item)| Ok((Pack::from(key.as_str()), to_pack(item, element).map_err(|e| e.within(key))?)))
                .collect::<Result<_, ValueError>>()?,
        ),
        (Value::Map(entries), Type::Object(attributes)) => Pack::Map(
            attributes
                .iter()
                .map(|(name, ty)| {
                    let item = entries.get(name).unwrap_or(&Value::Null);
                    Ok((Pack::from(name.as_str()), to_pack(item, ty).map_err(|e| e.within(name))?))
                })
                .collect::<Result<_, ValueError>>()?,
        ),
        (value, ty) => return Err(ValueError::new(format!("cannot encode {value:?} as {}", ty.to_json()))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object_type() -> Type {
        Type::Object(BTreeMap::from([
            ("name".to_owned(), Type::String),
            ("port".to_owned(), Type::Number),
            ("enabled".to_owned(), Type::Bool),
            ("hostnames".to_owned(), Type::list(Type::String)),
            ("env".to_owned(), Type::map(Type::String)),
            ("id".to_owned(), Type::String),
        ]))
    }

    fn sample() -> Value {
        Value::Map(BTreeMap::from([
            ("name".to_owned(), Value::string("web")),
            ("port".to_owned(), Value::int(8080)),
            ("enabled".to_owned(), Value::Bool(true)),
            ("hostnames".to_owned(), Value::List(vec![Value::string("a.example.test")])),
            ("env".to_owned(), Value::Map(BTreeMap::from([("A".to_owned(), Value::string("1"))]))),
            ("id".to_owned(), Value::unknown()),
        ]))
    }

    #[test]
    fn msgpack_round_trips_and_keeps_integers() {
        let ty = object_type();
        let bytes = sample().to_msgpack(&ty).unwrap();
        let decoded = Value::from_msgpack(&bytes, &ty).unwrap();
        assert_eq!(decoded, sample());
        assert!(matches!(decoded.get("port"), Value::Number(Number::Int(8080))));
    }

    #[test]
    fn unknowns_are_extension_zero_and_refinements_survive() {
        let bytes = Value::unknown().to_msgpack(&Type::String).unwrap();
        assert_eq!(bytes, [0xd4, 0x00, 0x00]);
        // An unknown refined as "not null": extension 12 with the payload {1: false}.
        let refined = [0xc7, 0x03, 0x0c, 0x81, 0x01, 0xc2];
        let value = Value::from_msgpack(&refined, &Type::String).unwrap();
        assert!(value.is_unknown());
        assert_eq!(value.to_msgpack(&Type::String).unwrap(), refined);
    }

    #[test]
    fn objects_always_carry_every_attribute() {
        let ty = object_type();
        let partial = Value::Map(BTreeMap::from([("name".to_owned(), Value::string("web"))]));
        let decoded = Value::from_msgpack(&partial.to_msgpack(&ty).unwrap(), &ty).unwrap();
        assert_eq!(decoded.get("port"), &Value::Null);
        let Value::Map(entries) = decoded else { panic!("not an object") };
        assert_eq!(entries.len(), 6);
    }

    #[test]
    fn decoding_refuses_values_of_the_wrong_type() {
        let bytes = Value::string("x").to_msgpack(&Type::String).unwrap();
        assert!(Value::from_msgpack(&bytes, &Type::Bool).is_err());
        let ty = object_type();
        let mut wrong = sample();
        wrong.set("surprise", Value::Bool(true));
        let mut extended = object_type();
        if let Type::Object(attributes) = &mut extended {
            attributes.insert("surprise".to_owned(), Type::Bool);
        }
        let error = Value::from_msgpack(&wrong.to_msgpack(&extended).unwrap(), &ty).unwrap_err();
        assert!(error.message.contains("surprise"), "{error}");
        let mut mixed = Vec::new();
        rmpv::encode::write_value(&mut mixed, &rmpv::Value::Array(vec!["a".into(), true.into()])).unwrap();
        let error = Value::from_msgpack(&mixed, &Type::list(Type::String)).unwrap_err();
        assert_eq!(error.path, "[1]");
    }

    #[test]
    fn numbers_may_arrive_as_floats_or_strings() {
        let float = rmpv::Value::F64(8080.0);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &float).unwrap();
        assert_eq!(Value::from_msgpack(&bytes, &Type::Number).unwrap().as_i64(), Some(8080));
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &rmpv::Value::from("12")).unwrap();
        assert_eq!(Value::from_msgpack(&bytes, &Type::Number).unwrap(), Value::int(12));
    }

    #[test]
    fn json_state_decodes_by_type_and_drops_unknown_attributes() {
        let json = serde_json::json!({"name": "web", "port": 8080, "hostnames": ["a.example.test"], "old": 1});
        let value = Value::from_json(&json, &object_type()).unwrap();
        assert_eq!(value.get("port"), &Value::int(8080));
        assert_eq!(value.get("env"), &Value::Null);
        assert_eq!(value.get("old"), &Value::Null);
        let error = Value::from_json(&serde_json::json!({"hostnames": [1, {}]}), &object_type()).unwrap_err();
        assert_eq!(error.path, "hostnames[1]");
    }

    #[test]
    fn json_numbers_come_back_as_integers() {
        let value = Value::Map(BTreeMap::from([("port".to_owned(), Value::Number(Number::Float(443.0)))]));
        assert_eq!(value.to_json(), serde_json::json!({"port": 443}));
    }
}
