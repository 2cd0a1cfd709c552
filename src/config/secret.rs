//! Where a configured value comes from: `{env: NAME}`, `{file: PATH}` or, for values that
//! are not secret, a literal string. Secrets are resolved once per load/reload and kept in
//! `secrecy` wrappers so they never reach a `Debug` or log line.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::files::{read_text_limited, SECRET_LIMIT};

/// A value as written in the YAML file, before it is resolved.
#[derive(Clone, PartialEq, Eq)]
pub enum ValueSource {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl fmt::Debug for ValueSource {
    // A literal may be a secret someone pasted by mistake: never print it. Nor a name or
    // a path that may be one: the likeliest slip with a secret is writing the secret
    // itself where its variable's name or its file's path belongs, and a config error
    // goes to the terminal and, on a reload, to the log. The key path that every error
    // carries says which entry it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            ValueSource::Env(name) => write!(f, "Env({})", shown_env_name(name)),
            ValueSource::File(_) => f.write_str("File(<not shown>)"),
        }
    }
}

/// An environment variable's name as messages show it (see [`ValueSource`]'s `Debug`):
/// only when it looks like a conventional name: upper-case words joined by `_`
/// (`PLIVO_AUTH_TOKEN`), at most 64 characters. Plivo's mixed-case tokens, the gateway's
/// own `mpcgw_` tokens, numbers and upper-case base32 or hex secrets (no `_`) do not.
/// A file's path is never shown, since paths and secrets (base64, URLs) share too many
/// characters to tell apart.
pub(crate) fn shown_env_name(name: &str) -> &str {
    let conventional = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.contains('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if conventional {
        name
    } else {
        "(name not shown: only names of upper-case words joined by `_`, like PLIVO_AUTH_TOKEN, are shown; any other may be a secret written in the wrong place)"
    }
}

/// Why a value could not be resolved; the caller adds the key path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("a secret must come from {{env: NAME}} or {{file: PATH}}, not a literal string")]
    LiteralSecret,
    #[error("environment variable {0} is not set or not valid UTF-8")]
    MissingEnv(String),
    /// The path is not shown: see [`ValueSource`]'s `Debug`.
    #[error("cannot read the file it names: {reason}")]
    File { reason: String },
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
            ValueSource::Env(name) => std::env::var(name)
                .map_err(|_| ResolveError::MissingEnv(shown_env_name(name).to_owned())),
            // Files written by editors and secret managers often end in a newline.
            // The untrimmed text is wiped when dropped.
            ValueSource::File(path) => read_text_limited(path, SECRET_LIMIT)
                .map(Zeroizing::new)
                .map(|text| text.trim().to_owned())
                .map_err(|err| ResolveError::File {
                    reason: err.to_string(),
                }),
        }
    }

    /// The file a value is read from, if it is.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ValueSource::File(path) => Some(path),
            ValueSource::Literal(_) | ValueSource::Env(_) => None,
        }
    }
}

/// For a secret read from the file at `path`: a warning when every user of the host may
/// read it: its mode lets others read it and every directory above it lets them through.
/// Group-readable is fine (Kubernetes secret volumes are 0440 with `fsGroup`). The file
/// exists, so its path is a path and is shown.
pub fn world_readable_warning(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mode = mode_of(&path)?;
    let reachable = path
        .ancestors()
        .skip(1)
        .all(|dir| mode_of(dir).is_some_and(|dir_mode| dir_mode & 0o001 != 0));
    (mode & 0o004 != 0 && reachable).then(|| {
        format!(
            "{} is readable by every user of the host (mode {mode:o}); make it 0600 (or 0640/0440 for a group that needs it)",
            path.display()
        )
    })
}

fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::metadata(path).ok()?.permissions().mode() & 0o777)
}

/// Whitespace alone counts as empty: a file's value is trimmed, and a variable set to
/// blanks is the same mistake.
fn non_empty(value: String) -> Result<String, ResolveError> {
    if value.trim().is_empty() {
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

    /// A secret written where its variable's name or its file's path belongs is not
    /// echoed by the error (which a reload logs); conventional names and paths are.
    #[test]
    fn a_name_or_path_that_may_be_the_secret_is_not_shown() {
        for token in [
            "ZDQ3MzBkOGUxNzc4NjEwMjFiOTdhNjI1NmQ4Yj",
            "98765432109876",
            "mpcgw_RW67YF26afF-UI4DyGgvwbYS_7e1PxFOBNy54m96fCU",
            "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
            "redis://:hunter2@127.0.0.1:6379/0",
            "Ab3/x9Kq.Zt+Q0==",
            "/Ab3x9KqZtQ0",
        ] {
            for source in [
                ValueSource::Env(token.into()),
                ValueSource::File(token.into()),
            ] {
                let err = source
                    .resolve_secret()
                    .expect_err("unresolvable")
                    .to_string();
                assert!(!err.contains(token), "{token} echoed: {err}");
                if matches!(source, ValueSource::Env(_)) {
                    assert!(err.contains("name not shown"), "{err}");
                }
                assert!(!format!("{source:?}").contains(token));
            }
        }
        // One upper-case word is hidden too (it may be a base32 secret), and the message
        // says what is shown rather than calling it lower case.
        let err = ValueSource::Env("NOPE".into())
            .resolve_secret()
            .expect_err("unset")
            .to_string();
        assert!(
            !err.contains("NOPE") && err.contains("words joined by `_`"),
            "{err}"
        );
        let err = ValueSource::Env("PLIVO_AUTH_TOKEN_SURELY_UNSET_1".into())
            .resolve_secret()
            .expect_err("unset")
            .to_string();
        assert!(err.contains("PLIVO_AUTH_TOKEN_SURELY_UNSET_1"), "{err}");
        let err = ValueSource::File("/nonexistent/token".into())
            .resolve_secret()
            .expect_err("missing")
            .to_string();
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn a_world_readable_secret_file_is_warned_about_and_a_group_readable_one_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        // tempdir makes its directory 0700, which would keep every user out anyway.
        chmod(dir.path(), 0o755);
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        for (mode, warned) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
            chmod(&path, mode);
            let warning = world_readable_warning(&path);
            assert_eq!(warning.is_some(), warned, "{mode:o}: {warning:?}");
            if let Some(warning) = warning {
                assert!(warning.contains(&format!("{mode:o}")), "{warning}");
            }
        }
        // A directory above it that others cannot pass through keeps them out.
        chmod(&path, 0o644);
        chmod(dir.path(), 0o750);
        assert_eq!(world_readable_warning(&path), None);
        assert_eq!(ValueSource::Env("X".into()).file(), None);
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
