//! JSON text to a [`Value`] that refuses a key written twice in one object.
//!
//! serde_json's own `Value` keeps the last of two equal keys, so `{"salt": "a", "salt": "b"}`
//! would start with salt "b" and no word said. A configuration that says a thing twice is a
//! mistake (usually a merge or a copy-paste), and the plugin refuses it naming the key's path.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::ids::IdList;

/// Where the text is wrong: the JSON path (`.` for the text as a whole) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub path: String,
    pub message: String,
}

/// Parses `bytes`; a duplicate key is an error at that key's path.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    parse_lists(bytes, &[]).map(|(v, _)| v)
}

/// The id lists [`parse_lists`] took out of the tree, each with its path.
pub type Lists = Vec<(&'static str, IdList)>;

/// As [`parse`], and each array of strings at one of the `lists` paths (`canary.allow`) goes
/// into an [`IdList`] of its own instead of the tree, which holds an empty array there. An
/// array at such a path that holds anything but strings stays in the tree, for the shape
/// check to name its element. The ids are then held once, compactly, not as a `Value` each.
pub fn parse_lists(
    bytes: &[u8],
    lists: &'static [&'static str],
) -> Result<(Value, Lists), JsonError> {
    let shared = Shared {
        duplicate: RefCell::new(None),
        lists,
        taken: RefCell::new(Vec::new()),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        path: String::new(),
        shared: &shared,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (parsed, shared.duplicate.into_inner()) {
        (_, Some((path, key))) => Err(JsonError {
            path,
            message: format!("duplicate field `{key}` (a key may appear once per object)"),
        }),
        (Ok(v), None) => Ok((v, shared.taken.into_inner())),
        (Err(e), None) => Err(JsonError {
            path: ".".to_string(),
            message: e.to_string(),
        }),
    }
}

/// Any JSON text the filter reads as a [`Value`] (the drain admin body): one parser in the
/// wasm, not serde_json's `Value` deserializer beside this one.
pub fn value(bytes: &[u8]) -> Result<Value, String> {
    parse(bytes).map_err(|e| match e.path.as_str() {
        "." => e.message,
        path => format!("{path}: {}", e.message),
    })
}

/// What every value of one parse shares: the first duplicate key met, the paths whose string
/// arrays are taken out of the tree, and those taken.
struct Shared {
    duplicate: RefCell<Option<(String, String)>>,
    lists: &'static [&'static str],
    taken: RefCell<Lists>,
}

/// A value at `path`.
struct Strict<'a> {
    path: String,
    shared: &'a Shared,
}

impl Strict<'_> {
    fn child(&self, path: String) -> Strict<'_> {
        Strict {
            path,
            shared: self.shared,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let list = self.shared.lists.iter().find(|l| **l == self.path);
        let (mut ids, mut items) = (IdList::default(), Vec::new());
        while let Some(v) = seq.next_element_seed(self.child(format!(
            "{}[{}]",
            self.path,
            ids.len() + items.len()
        )))? {
            match v {
                Value::String(s) if list.is_some() && items.is_empty() => ids.push(&s),
                v => {
                    // Not a list of strings after all: the tree keeps it as written.
                    items.extend(ids.iter().map(|s| Value::String(s.to_owned())));
                    ids = IdList::default();
                    items.push(v);
                }
            }
        }
        if let (Some(list), true) = (list, items.is_empty()) {
            self.shared.taken.borrow_mut().push((list, ids));
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = match self.path.is_empty() {
                true => key.clone(),
                false => format!("{}.{key}", self.path),
            };
            if members.contains_key(&key) {
                *self.shared.duplicate.borrow_mut() = Some((path, key));
                return Err(A::Error::custom("duplicate field"));
            }
            let v = map.next_value_seed(self.child(path))?;
            members.insert(key, v);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_lists};
    use serde_json::json;

    #[test]
    fn string_arrays_at_the_list_paths_leave_the_tree() {
        let text = br#"{"c": {"a": ["x", "", "y"], "b": [1], "d": ["z"]}, "a": ["w"]}"#;
        let (v, taken) = parse_lists(text, &["c.a", "c.b", "a"]).unwrap();
        assert_eq!(v, json!({"c": {"a": [], "b": [1], "d": ["z"]}, "a": []}));
        let taken: Vec<(&str, Vec<&str>)> = taken
            .iter()
            .map(|(p, l)| (*p, l.iter().collect()))
            .collect();
        assert_eq!(taken, [("c.a", vec!["x", "", "y"]), ("a", vec!["w"])]);
    }

    #[test]
    fn a_list_path_holding_anything_but_strings_stays_as_written() {
        for text in [
            r#"{"a": ["x", 2, "y"]}"#,
            r#"{"a": [null, "x"]}"#,
            r#"{"a": ["x", ["y"]]}"#,
            r#"{"a": "x"}"#,
            r#"{"a": {"0": "x"}}"#,
        ] {
            let (v, taken) = parse_lists(text.as_bytes(), &["a"]).unwrap();
            assert!(taken.is_empty(), "{text}");
            assert_eq!(v, parse(text.as_bytes()).unwrap(), "{text}");
            assert_eq!(v, serde_json::from_str::<serde_json::Value>(text).unwrap());
        }
    }

    #[test]
    fn a_key_twice_is_refused_at_its_path() {
        let e = parse(br#"{"canary": {"user_id": [{"header": "a", "header": "b"}]}}"#).unwrap_err();
        assert_eq!(e.path, "canary.user_id[0].header");
        assert!(
            e.message.starts_with("duplicate field `header`"),
            "{}",
            e.message
        );
        let e = parse(br#"{"drain": {}, "drain": {}}"#).unwrap_err();
        assert_eq!(e.path, "drain");
    }

    #[test]
    fn the_same_key_in_different_objects_is_fine() {
        let v = parse(br#"{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}"#).unwrap();
        let direct: serde_json::Value =
            serde_json::from_str(r#"{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}"#)
                .unwrap();
        assert_eq!(v, direct);
    }

    #[test]
    fn syntax_errors_keep_their_line_and_column() {
        let e = parse(b"{\n  \"a\": nope\n}").unwrap_err();
        assert_eq!(e.path, ".");
        assert!(e.message.contains("line 2"), "{}", e.message);
        let e = parse(b"{} x").unwrap_err();
        assert!(e.message.contains("trailing characters"), "{}", e.message);
    }
}
