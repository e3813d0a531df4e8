//! The configuration's serde `Deserializer`: a walk over a parsed [`serde_json::Value`] that
//! puts the JSON path of the offending field on every error (`canary.user_id[0].header`).
//!
//! It replaces `serde_path_to_error`, whose generic wrapper around every visitor doubled the
//! code of each config struct in the wasm (about 68 KB), and the second copy of serde_json's
//! parser that deserializing from text instantiated: the JSON text is parsed once into a
//! `Value` by the same parser the translation engine uses, and the derived `Deserialize`
//! impls run against this one concrete deserializer. Errors carry their path from the inside
//! out: each map key or array index prepends itself while the error travels up.

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::Value;

use super::ConfigError;

impl de::Error for ConfigError {
    fn custom<T: std::fmt::Display>(msg: T) -> ConfigError {
        ConfigError::new("", msg.to_string())
    }

    // serde_json's wording, which the messages had before: `null`, and floats printed the
    // way JSON prints them (which also keeps core's float formatting out of the wasm).
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> ConfigError {
        ConfigError::new("", format!("invalid type: {}, expected {exp}", Json(unexp)))
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> ConfigError {
        ConfigError::new(
            "",
            format!("invalid value: {}, expected {exp}", Json(unexp)),
        )
    }
}

struct Json<'a>(de::Unexpected<'a>);

impl std::fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            de::Unexpected::Unit => f.write_str("null"),
            de::Unexpected::Float(v) => match serde_json::Number::from_f64(v) {
                Some(n) => write!(f, "floating point `{n}`"),
                None => f.write_str("floating point"),
            },
            other => other.fmt(f),
        }
    }
}

/// Deserializes `T` from `value`; an error's path is relative to `value`.
pub fn from_value<'de, T: de::Deserialize<'de>>(value: &'de Value) -> Result<T, ConfigError> {
    T::deserialize(At(value))
}

/// What serde's messages call the value found ("invalid type: string \"x\", expected ...").
fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                de::Unexpected::Unsigned(u)
            } else if let Some(i) = n.as_i64() {
                de::Unexpected::Signed(i)
            } else {
                de::Unexpected::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

#[derive(Clone, Copy)]
struct At<'de>(&'de Value);

impl<'de> de::Deserializer<'de> for At<'de> {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => number(n, visitor),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visitor.visit_seq(Items {
                items: items.iter(),
                index: 0,
            }),
            Value::Object(map) => visitor.visit_map(Entries {
                entries: map.iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        visitor.visit_newtype_struct(self)
    }

    /// `"v1"` (a unit variant) or `{"header": "x"}` (a variant with content), as serde_json.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            // The first key names the variant (an unknown one is reported as such), and
            // there must be no other.
            Value::Object(map) => match map.iter().next() {
                Some((key, value)) if map.len() == 1 => visitor.visit_enum(Variant { key, value }),
                first => {
                    if let Some((key, value)) = first {
                        visitor.visit_enum(Variant { key, value })?;
                    }
                    Err(de::Error::invalid_value(
                        de::Unexpected::Map,
                        &"map with a single key",
                    ))
                }
            },
            other => Err(invalid(other, &"string or map")),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Bool(b) => visitor.visit_bool(*b),
            other => Err(invalid(other, &visitor)),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Number(n) => number(n, visitor),
            other => Err(invalid(other, &visitor)),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::String(s) => visitor.visit_borrowed_str(s),
            other => Err(invalid(other, &visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(Items {
                items: items.iter(),
                index: 0,
            }),
            other => Err(invalid(other, &visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0 {
            Value::Object(map) => visitor.visit_map(Entries {
                entries: map.iter(),
                value: None,
            }),
            other => Err(invalid(other, &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        self.deserialize_map(visitor)
    }

    // The typed entry points above keep each derived visitor's code to the one branch it
    // can take; a mismatch is one shared error path instead of a copy per visitor.
    forward_to! { deserialize_u64: deserialize_i8 deserialize_i16 deserialize_i32
    deserialize_i64 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_f32
    deserialize_f64 }
    forward_to! { deserialize_str: deserialize_string deserialize_identifier deserialize_char }

    forward_to_deserialize_any! {
        i128 u128 bytes byte_buf unit unit_struct tuple tuple_struct ignored_any
    }
}

/// `fn deserialize_x(self, visitor)` bodies that call another entry point.
macro_rules! forward_to {
    ($to:ident: $($from:ident)*) => {$(
        fn $from<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
            self.$to(visitor)
        }
    )*};
}
use forward_to;

fn number<'de, V: Visitor<'de>>(
    n: &serde_json::Number,
    visitor: V,
) -> Result<V::Value, ConfigError> {
    if let Some(u) = n.as_u64() {
        visitor.visit_u64(u)
    } else if let Some(i) = n.as_i64() {
        visitor.visit_i64(i)
    } else {
        visitor.visit_f64(n.as_f64().unwrap_or(0.0))
    }
}

/// "invalid type: string \"x\", expected u32", built once for every visitor.
#[inline(never)]
fn invalid(v: &Value, expected: &dyn de::Expected) -> ConfigError {
    de::Error::invalid_type(unexpected(v), expected)
}

struct Items<'de> {
    items: std::slice::Iter<'de, Value>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = ConfigError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ConfigError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(At(item))
            .map(Some)
            .map_err(|e| e.within(&format!("[{i}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'de> {
    entries: serde_json::map::Iter<'de>,
    value: Option<(&'de str, &'de Value)>,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = ConfigError;

    /// An unknown field is rejected while its key is read: the path names that key.
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConfigError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        seed.deserialize(Key(key))
            .map(Some)
            .map_err(|e| e.within(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ConfigError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| ConfigError::new("", "a map value without its key"))?;
        seed.deserialize(At(value)).map_err(|e| e.within(key))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An object key: a borrowed string to the field identifier visitor.
struct Key<'de>(&'de str);

impl<'de> de::Deserializer<'de> for Key<'de> {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_borrowed_str(self.0)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        struct enum identifier ignored_any
    }
}

/// `{"variant": content}`: the content's errors are under the variant's key.
struct Variant<'de> {
    key: &'de str,
    value: &'de Value,
}

impl<'de> de::EnumAccess<'de> for Variant<'de> {
    type Error = ConfigError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self), ConfigError> {
        let variant = seed.deserialize(Key(self.key))?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'de> {
    type Error = ConfigError;

    fn unit_variant(self) -> Result<(), ConfigError> {
        match self.value {
            Value::Null => Ok(()),
            other => Err(invalid(other, &"unit variant").within(self.key)),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, ConfigError> {
        seed.deserialize(At(self.value))
            .map_err(|e| e.within(self.key))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        de::Deserializer::deserialize_any(At(self.value), visitor).map_err(|e| e.within(self.key))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        de::Deserializer::deserialize_any(At(self.value), visitor).map_err(|e| e.within(self.key))
    }
}
