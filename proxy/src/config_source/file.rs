//! Where a proxy's config comes from. Today: a YAML file (watched for changes) or YAML
//! text embedded by the caller (the demo). Either way it goes through the one translation
//! in `nip-xds`; this is the only place in the proxy that touches YAML.

use nip_xds::config::{Config, ConfigError};
use nip_xds::translate::{translate, Translation};
use std::path::PathBuf;
use std::time::SystemTime;

/// A config source.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file, re-read on SIGHUP and when it changes.
    File(PathBuf),
    /// YAML given by the program itself; never changes.
    Embedded(String),
}

/// Identifies a version of a file cheaply, to notice edits without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
}

impl Fingerprint {
    /// The fingerprint of any file (a plugin module, say); `None` if it cannot be read.
    pub fn of(path: &std::path::Path) -> Option<Fingerprint> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Fingerprint {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

impl ConfigSource {
    /// Reads, validates and translates the config.
    pub fn load(&self) -> Result<Translation, ConfigError> {
        let config = match self {
            ConfigSource::File(path) => Config::from_file(path)?,
            ConfigSource::Embedded(yaml) => Config::from_yaml(yaml)?,
        };
        Ok(translate(&config))
    }

    /// The current fingerprint of a file source; `None` for embedded config or an
    /// unreadable file (which the next load will report).
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        match self {
            ConfigSource::File(path) => Fingerprint::of(path),
            ConfigSource::Embedded(_) => None,
        }
    }

    /// For log lines.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Embedded(_) => "embedded config".to_string(),
        }
    }
}
