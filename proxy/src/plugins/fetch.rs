//! Getting a plugin's module bytes: a local file, or a download pinned by SHA-256.
//!
//! Downloads are verified against the configured digest before anything else looks at them,
//! and kept in a content-addressed cache (`<cache>/<sha256>.wasm`), so a restart — or a
//! proxy that lost its network — does not download again. A download that does not match
//! is refused with both digests in the error.

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, RemoteDataSource,
};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest module the proxy downloads.
const MAX_MODULE_BYTES: u64 = 64 << 20;
/// Download timeout when the resource gives none.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A local file (watched for changes).
    File(PathBuf),
    /// The module's bytes, sent with the config (`vm_config.code.local.inline_bytes`: how
    /// a control plane serves a module it stores).
    Inline(std::sync::Arc<[u8]>),
    /// A module only a control plane has (`source: { sha256 }` alone), which it sends
    /// inline; a proxy that reads such a config itself cannot load it.
    Stored(String),
    /// A URL and the module's hex SHA-256.
    Remote {
        /// http:// or https:// URL.
        url: String,
        /// Expected digest, lower-case hex.
        sha256: String,
        /// Download timeout.
        timeout: Duration,
    },
}

impl ModuleSource {
    /// Reads `vm_config.code`.
    pub fn from_code(code: Option<&AsyncDataSource>) -> Result<Self, String> {
        match code.and_then(|c| c.specifier.as_ref()) {
            Some(async_data_source::Specifier::Local(local)) => match &local.specifier {
                Some(data_source::Specifier::Filename(file)) => {
                    Ok(ModuleSource::File(PathBuf::from(file)))
                }
                Some(data_source::Specifier::InlineBytes(bytes)) if !bytes.is_empty() => {
                    Ok(ModuleSource::Inline(bytes.as_slice().into()))
                }
                _ => Err("vm_config.code.local must be a filename or inline_bytes".into()),
            },
            Some(async_data_source::Specifier::Remote(remote)) => Self::remote(remote),
            None => Err("vm_config.code is missing".into()),
        }
    }

    fn remote(remote: &RemoteDataSource) -> Result<Self, String> {
        let uri = remote
            .http_uri
            .as_ref()
            .ok_or("vm_config.code.remote.http_uri is missing")?;
        if let Some(digest) = nip_xds::stored_modules::stored_module_digest(&uri.uri) {
            return Ok(ModuleSource::Stored(digest.to_string()));
        }
        if !(uri.uri.starts_with("http://") || uri.uri.starts_with("https://")) {
            return Err(format!(
                "vm_config.code.remote.http_uri.uri {:?} is not http(s)",
                uri.uri
            ));
        }
        let sha256 = remote.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "vm_config.code.remote.sha256 {:?} is not 64 hex digits",
                remote.sha256
            ));
        }
        let timeout = uri
            .timeout
            .as_ref()
            .and_then(|t| {
                let secs = u64::try_from(t.seconds).ok()?;
                Some(Duration::from_secs(secs) + Duration::from_nanos(t.nanos.max(0) as u64))
            })
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_FETCH_TIMEOUT);
        Ok(ModuleSource::Remote {
            url: uri.uri.clone(),
            sha256,
            timeout,
        })
    }

    /// The local file to watch for changes, if the module is one.
    pub fn watched_file(&self) -> Option<&Path> {
        match self {
            ModuleSource::File(path) => Some(path),
            ModuleSource::Remote { .. } | ModuleSource::Inline(_) | ModuleSource::Stored(_) => None,
        }
    }

    /// The module's bytes; remote modules come from `cache_dir` when already downloaded.
    pub fn read(&self, cache_dir: Option<&Path>) -> Result<Vec<u8>, String> {
        match self {
            ModuleSource::File(path) => std::fs::read(path)
                .map_err(|e| format!("cannot read plugin module {}: {e}", path.display())),
            ModuleSource::Inline(bytes) => Ok(bytes.to_vec()),
            ModuleSource::Stored(digest) => Err(format!(
                "plugin module {digest} is kept by a control plane (a `source` of sha256 alone): \
                 only a proxy that control plane serves gets it; give this proxy a file or url \
                 source instead"
            )),
            ModuleSource::Remote {
                url,
                sha256,
                timeout,
            } => {
                let cached = cache_dir.map(|dir| dir.join(format!("{sha256}.wasm")));
                if let Some(bytes) = cached
                    .as_ref()
                    .and_then(|path| std::fs::read(path).ok())
                    .filter(|bytes| hex_sha256(bytes) == *sha256)
                {
                    return Ok(bytes);
                }
                let bytes = download(url, *timeout)?;
                let actual = hex_sha256(&bytes);
                if actual != *sha256 {
                    return Err(format!(
                        "plugin module from {url} has sha256 {actual}, but the config pins {sha256}; refused"
                    ));
                }
                if let Some(path) = cached {
                    store(&path, &bytes);
                }
                Ok(bytes)
            }
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Downloads `url` (blocking: loading runs on the control thread, never a worker).
fn download(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot download plugin module {url}: {e}"))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot download plugin module {url}: {e}"))?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        return Err(format!(
            "plugin module {url} is larger than {MAX_MODULE_BYTES} bytes"
        ));
    }
    Ok(bytes)
}

/// Writes a verified download into the cache (atomically; failures only cost a re-download).
fn store(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else {
        return;
    };
    let staged = path.with_extension(format!("tmp{}", std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&staged, bytes))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(e) = result {
        tracing::debug!("cannot cache plugin module at {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lower_case_hex() {
        assert_eq!(
            hex_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_cached_module_is_used_only_when_its_digest_matches() {
        let dir = tempfile::tempdir().unwrap();
        let sha256 = hex_sha256(b"module");
        std::fs::write(dir.path().join(format!("{sha256}.wasm")), b"module").unwrap();
        let source = ModuleSource::Remote {
            // Nothing listens on port 9 of this machine: only the cache can answer.
            url: "http://127.0.0.1:9/m.wasm".into(),
            sha256: sha256.clone(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(source.read(Some(dir.path())).unwrap(), b"module");
        std::fs::write(dir.path().join(format!("{sha256}.wasm")), b"tampered").unwrap();
        let error = source.read(Some(dir.path())).unwrap_err();
        assert!(error.contains("cannot download"), "{error}");
    }
}
