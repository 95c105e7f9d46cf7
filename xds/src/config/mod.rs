//! The v4 YAML configuration a user writes: the types, the parser and the validator.
//!
//! Parsing is strict (unknown fields are errors, so a typo never silently does nothing) and
//! every error names the field path it is about, e.g.
//! `routes[2].match.path_regex: invalid regex …`. [`Config::from_yaml`] returns either a
//! config that the translator can turn into xDS resources without further checks, or all the
//! problems found at once.

mod auth;
mod bounds;
mod duration;
pub mod migrate;
mod model;
mod path_text;
mod tenants;
mod validate;

pub use auth::*;
pub use bounds::{
    check_bounds, check_document_bounds, BoundsError, MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH,
};
pub use duration::HumanDuration;
pub use model::*;
pub use path_text::{path_text_problem, redirect_path_problem, substitution_problem};
pub use tenants::{route_tenant, tenant_problems};
pub use validate::{
    check_host_pattern, decode_base64, is_sha256_hex, parse_endpoint_address, parse_listen_address,
    parse_rate, rate_parts, route_name, APPEND_ACTIONS, ED25519_KEY_BYTES, ED25519_SIGNATURE_BYTES,
    HEADER_VARIABLES, MAX_DIRECT_RESPONSE_BODY, MAX_RETRIES, RETRY_CONDITIONS,
};

use std::fmt;
use std::path::Path;

/// One problem in a config file, tied to the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where the problem is, as a path into the document (`routes[2].match.path_regex`).
    pub path: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not YAML of the expected shape (wrong type, unknown field, bad syntax).
    #[error("{0}")]
    Syntax(FieldError),
    /// The document parsed but breaks a rule (a route names a missing service, a bad regex…).
    #[error("{}", join_errors(.0))]
    Invalid(Vec<FieldError>),
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every field error this carries, for callers that report them one per line.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            ConfigError::Read { path, source } => vec![FieldError {
                path: String::new(),
                message: format!("cannot read {path}: {source}"),
            }],
            ConfigError::Syntax(e) => vec![e.clone()],
            ConfigError::Invalid(errors) => errors.clone(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        check_document_bounds(text).map_err(|e| {
            ConfigError::Syntax(FieldError {
                path: String::new(),
                message: e.to_string(),
            })
        })?;
        if let Some(mark) = migrate::v3_marks(text) {
            return Err(ConfigError::Syntax(FieldError {
                path: String::new(),
                message: format!(
                    "this is a v3 config ({mark}); convert it with `nip migrate config --from-v3 FILE`"
                ),
            }));
        }
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            let message = clean_yaml_message(&inner.to_string(), &path);
            ConfigError::Syntax(FieldError {
                path: if path == "." { String::new() } else { path },
                message: format!("{message}{location}"),
            })
        })?;
        let errors = validate::validate(&config);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// serde_yaml writes `path: message at line L column C`; we print our own path and location.
fn clean_yaml_message(message: &str, path: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(index) => &message[..index],
        None => message,
    };
    match message.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) || prefix == "." => rest.to_string(),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
