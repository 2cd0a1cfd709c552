//! Where a configured value comes from: `{env: NAME}`, `{file: PATH}` or, for values that
//! are not secret, a literal string. Secrets are resolved once per load/reload and kept in
//! `secrecy` wrappers so they never reach a `Debug` or log line.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use zeroize::Zeroizing;

/// A value as written in the YAML file, before it is resolved.
#[derive(Clone, PartialEq, Eq)]
pub enum ValueSource {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl fmt::Debug for ValueSource {
    // A literal may be a secret someone pasted by mistake: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            ValueSource::Env(name) => write!(f, "Env({name})"),
            ValueSource::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

/// Why a value could not be resolved; the caller adds the key path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("a secret must come from {{env: NAME}} or {{file: PATH}}, not a literal string")]
    LiteralSecret,
    #[error("environment variable {0} is not set or not valid UTF-8")]
    MissingEnv(String),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("is empty")]
    Empty,
}

impl ValueSource {
    /// Resolves a value that may be given literally (for example an auth id).
    pub fn resolve_plain(&self) -> Result<String, ResolveError> {
        let value = match self {
            ValueSource::Literal(value) => value.clone(),
            other => other.read_reference()?,
        };
        non_empty(value)
    }

    /// Resolves a secret; a literal string is refused so secrets never live in the file.
    pub fn resolve_secret(&self) -> Result<SecretString, ResolveError> {
        match self {
            ValueSource::Literal(_) => Err(ResolveError::LiteralSecret),
            other => non_empty(other.read_reference()?).map(SecretString::from),
        }
    }

    fn read_reference(&self) -> Result<String, ResolveError> {
        match self {
            ValueSource::Literal(value) => Ok(value.clone()),
            ValueSource::Env(name) => {
                std::env::var(name).map_err(|_| ResolveError::MissingEnv(name.clone()))
            }
            // Files written by editors and secret managers often end in a newline.
            // The untrimmed text is wiped when dropped.
            ValueSource::File(path) => std::fs::read_to_string(path)
                .map(Zeroizing::new)
                .map(|text| text.trim().to_owned())
                .map_err(|err| ResolveError::File {
                    path: path.display().to_string(),
                    reason: err.to_string(),
                }),
        }
    }
}

fn non_empty(value: String) -> Result<String, ResolveError> {
    if value.is_empty() {
        Err(ResolveError::Empty)
    } else {
        Ok(value)
    }
}

impl<'de> Deserialize<'de> for ValueSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueSourceVisitor)
    }
}

struct ValueSourceVisitor;

impl<'de> Visitor<'de> for ValueSourceVisitor {
    type Value = ValueSource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{env: NAME}, {file: PATH} or a string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ValueSource, E> {
        Ok(ValueSource::Literal(value.to_owned()))
    }

    // serde's own message for these would quote the value, and the value may be a
    // secret written in the wrong place: say what it is, never what it says.
    fn visit_i64<E: de::Error>(self, _value: i64) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a number"))
    }

    fn visit_u64<E: de::Error>(self, _value: u64) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a number"))
    }

    // serde_yaml hands integers beyond 64 bits to these.
    fn visit_i128<E: de::Error>(self, _value: i128) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a number"))
    }

    fn visit_u128<E: de::Error>(self, _value: u128) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a number"))
    }

    fn visit_f64<E: de::Error>(self, _value: f64) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a number"))
    }

    fn visit_bool<E: de::Error>(self, _value: bool) -> Result<ValueSource, E> {
        Err(unquoted_scalar("a boolean"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueSource, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom("expected {env: NAME} or {file: PATH}"));
        };
        let source = match key.as_str() {
            "env" => ValueSource::Env(map.next_value()?),
            "file" => ValueSource::File(map.next_value()?),
            other => return Err(de::Error::unknown_field(other, &["env", "file"])),
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom(
                "expected exactly one of {env: NAME} or {file: PATH}",
            ));
        }
        Ok(source)
    }
}

fn unquoted_scalar<E: de::Error>(found: &str) -> E {
    value_not_shown(found, "{env: NAME}, {file: PATH} or a quoted string")
}

/// A type error that says what kind of value was found and never the value, which may
/// be a secret (or a token) written in the wrong place.
pub(super) fn value_not_shown<E: de::Error>(found: &str, expected: &str) -> E {
    E::custom(format_args!(
        "found {found} (value not shown); expected {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn parse(yaml: &str) -> ValueSource {
        serde_yaml::from_str(yaml).expect("valid value source")
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse("{env: FOO}"), ValueSource::Env("FOO".into()));
        assert_eq!(parse("{file: /x}"), ValueSource::File("/x".into()));
        assert_eq!(parse("MA123"), ValueSource::Literal("MA123".into()));
    }

    #[test]
    fn an_unquoted_number_or_boolean_is_refused_without_echoing_it() {
        for yaml in [
            "8472910384756610",
            "-123456789",
            "84729103847566101234",
            "-84729103847566101234",
            "1234.5678",
            "true",
        ] {
            let err = serde_yaml::from_str::<ValueSource>(yaml)
                .expect_err(yaml)
                .to_string();
            assert!(err.contains("value not shown"), "{yaml}: {err}");
            assert!(!err.contains(yaml), "{yaml} echoed: {err}");
        }
    }

    #[test]
    fn rejects_unknown_and_double_keys() {
        assert!(serde_yaml::from_str::<ValueSource>("{vault: x}").is_err());
        assert!(serde_yaml::from_str::<ValueSource>("{env: A, file: B}").is_err());
    }

    #[test]
    fn literal_secret_is_refused_but_literal_plain_value_is_fine() {
        let literal = ValueSource::Literal("hunter2".into());
        assert_eq!(
            literal.resolve_secret().err(),
            Some(ResolveError::LiteralSecret)
        );
        assert_eq!(literal.resolve_plain().as_deref(), Ok("hunter2"));
        assert!(!format!("{literal:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        let secret = ValueSource::File(path).resolve_secret().expect("resolves");
        assert_eq!(secret.expose_secret(), "s3cret");
    }

    #[test]
    fn missing_env_and_file_are_clear_errors() {
        let env = ValueSource::Env("MPC_GATEWAY_TEST_SURELY_UNSET".into());
        assert_eq!(
            env.resolve_secret().err(),
            Some(ResolveError::MissingEnv(
                "MPC_GATEWAY_TEST_SURELY_UNSET".into()
            ))
        );
        let file = ValueSource::File("/nonexistent/token".into());
        assert!(matches!(
            file.resolve_secret(),
            Err(ResolveError::File { .. })
        ));
    }
}
