//! Typed plugin configuration from the job's `KEY=VALUE` pairs.
//!
//! The host hands `init` an ordered list of string pairs. [`from_pairs`] turns it into any
//! `serde::Deserialize` type: each key is a field, and each value is parsed as the field's
//! type (numbers, `true`/`false`, strings, unit enum variants by name, `Option`s, and
//! comma-separated lists for `Vec`s). Missing keys fall back to `#[serde(default)]`.
//!
//! Keys the type does not know are errors, never silently ignored: a misspelt key would
//! otherwise leave a default in force without anyone noticing. Add
//! `#[serde(deny_unknown_fields)]` to also list the expected keys in that error.

use crate::PluginError;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Deserializes a configuration type from `KEY=VALUE` pairs, naming the key in any error.
pub fn from_pairs<T: DeserializeOwned>(pairs: &[(String, String)]) -> Result<T, PluginError> {
    T::deserialize(Pairs { pairs }).map_err(|e| PluginError::InvalidConfig(e.0))
}

/// A configuration error message.
#[derive(Debug)]
struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// The whole configuration: a map from keys to values.
struct Pairs<'a> {
    pairs: &'a [(String, String)],
}

impl<'de> de::Deserializer<'de> for Pairs<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(PairsAccess { pairs: self.pairs.iter(), key: None, value: None })
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.pairs.first() {
            None => visitor.visit_unit(),
            Some((key, _)) => Err(Error(format!("unknown config key `{key}`: this plugin takes no configuration"))),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct PairsAccess<'a> {
    pairs: std::slice::Iter<'a, (String, String)>,
    key: Option<&'a str>,
    value: Option<&'a str>,
}

impl<'de> MapAccess<'de> for PairsAccess<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.pairs.next() {
            None => Ok(None),
            Some((key, value)) => {
                self.key = Some(key);
                self.value = Some(value);
                seed.deserialize(key.as_str().into_deserializer()).map(Some)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let key = self.key.unwrap_or_default();
        let value = self.value.take().ok_or_else(|| Error("value requested before key".into()))?;
        seed.deserialize(Value { key, text: value }).map_err(|e| {
            if e.0.starts_with("unknown config key") { e } else { Error(format!("config key `{key}`: {e}")) }
        })
    }
}

/// One configuration value, parsed as whatever type the field asks for.
struct Value<'a> {
    key: &'a str,
    text: &'a str,
}

impl<'a> Value<'a> {
    fn parse<T>(&self) -> Result<T, Error>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        self.text.trim().parse().map_err(|e| Error(format!("cannot parse {:?}: {e}", self.text)))
    }
}

macro_rules! parse_value {
    ($($method:ident => $visit:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.$visit(self.parse()?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Value<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.text)
    }

    parse_value! {
        deserialize_bool => visit_bool,
        deserialize_i8 => visit_i8, deserialize_i16 => visit_i16, deserialize_i32 => visit_i32,
        deserialize_i64 => visit_i64, deserialize_i128 => visit_i128,
        deserialize_u8 => visit_u8, deserialize_u16 => visit_u16, deserialize_u32 => visit_u32,
        deserialize_u64 => visit_u64, deserialize_u128 => visit_u128,
        deserialize_f32 => visit_f32, deserialize_f64 => visit_f64, deserialize_char => visit_char,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let items = self.text.split(',').map(str::trim).filter(|item| !item.is_empty());
        visitor.visit_seq(Items { key: self.key, items })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_enum(self.text.trim().into_deserializer())
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        // serde asks to skip the value of a field the type does not have.
        Err(Error(format!("unknown config key `{}`", self.key)))
    }

    serde::forward_to_deserialize_any! {
        str string bytes byte_buf unit unit_struct tuple tuple_struct map struct identifier
    }
}

struct Items<'a, I> {
    key: &'a str,
    items: I,
}

impl<'de, I: Iterator<Item = &'de str>> SeqAccess<'de> for Items<'de, I> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.items.next().map(|text| seed.deserialize(Value { key: self.key, text })).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
        Careful,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Config {
        name: String,
        #[serde(default)]
        limit: u32,
        ratio: Option<f64>,
        mode: Mode,
        #[serde(default)]
        tags: Vec<String>,
        enabled: bool,
    }

    #[test]
    fn parses_each_field_as_its_type() {
        let config: Config = from_pairs(&pairs(&[
            ("name", "etl"),
            ("ratio", "0.5"),
            ("mode", "careful"),
            ("tags", "a, b,c"),
            ("enabled", "true"),
        ]))
        .unwrap();
        assert_eq!(
            config,
            Config {
                name: "etl".into(),
                limit: 0,
                ratio: Some(0.5),
                mode: Mode::Careful,
                tags: vec!["a".into(), "b".into(), "c".into()],
                enabled: true
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err =
            from_pairs::<Config>(&pairs(&[("name", "x"), ("limit", "ten"), ("mode", "fast"), ("enabled", "true")]))
                .unwrap_err();
        assert_eq!(
            err,
            PluginError::InvalidConfig(
                "config key `limit`: cannot parse \"ten\": invalid digit found in string".into()
            )
        );

        let err = from_pairs::<Config>(&pairs(&[("name", "x"), ("mode", "fast")])).unwrap_err();
        assert_eq!(err, PluginError::InvalidConfig("missing field `enabled`".into()));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = from_pairs::<Config>(&pairs(&[("name", "x"), ("mode", "fast"), ("enabled", "true"), ("limt", "3")]))
            .unwrap_err();
        assert_eq!(err, PluginError::InvalidConfig("unknown config key `limt`".into()));

        assert_eq!(from_pairs::<()>(&[]), Ok(()));
        assert_eq!(
            from_pairs::<()>(&pairs(&[("x", "1")])),
            Err(PluginError::InvalidConfig("unknown config key `x`: this plugin takes no configuration".into()))
        );
    }
}
