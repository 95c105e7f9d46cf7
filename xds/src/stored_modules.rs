//! Plugin modules kept by a control plane (`nip deploy` uploads them; `PUT /v1/modules`):
//! a config names one by digest alone (`source: { sha256 }`), and the control plane puts
//! the module's bytes into the Wasm filter it serves (Envoy's
//! `vm_config.code.local.inline_bytes`), so proxies get it over the xDS stream they
//! already trust — no download, no second place to reach.
//!
//! ```text
//! v4 source { sha256 } ──translate──▶ code.remote { uri: nip-store:HEX, sha256: HEX }
//!                      ──control plane: inline_stored_modules──▶ code.local.inline_bytes
//! ```

use crate::config::Config;
use crate::resources::ResourceSet;
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, DataSource,
};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;
use prost::Message;
use std::collections::BTreeMap;

/// The URI scheme a translated config uses for a module only a control plane has.
pub const STORED_MODULE_SCHEME: &str = "nip-store:";

/// The placeholder URI of a stored module.
pub fn stored_module_uri(sha256: &str) -> String {
    format!("{STORED_MODULE_SCHEME}{sha256}")
}

/// The digest a placeholder URI names.
pub fn stored_module_digest(uri: &str) -> Option<&str> {
    uri.strip_prefix(STORED_MODULE_SCHEME)
}

/// The stored modules a config names: each plugin whose `source` is a digest alone, as
/// (field path, lower-case digest).
pub fn stored_module_refs(config: &Config) -> Vec<(String, String)> {
    config
        .plugins
        .iter()
        .filter_map(|(name, plugin)| {
            let source = plugin.source.as_ref()?;
            if source.file.is_some() || source.url.is_some() {
                return None;
            }
            let digest = source.sha256.as_ref()?.to_ascii_lowercase();
            Some((format!("plugins.{name}.source.sha256"), digest))
        })
        .collect()
}

/// Puts each stored module's bytes in place of its placeholder. A digest missing from
/// `modules` is the error (the caller checked the store when the config was applied).
pub fn inline_stored_modules(
    resources: &mut ResourceSet,
    modules: &BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let mut missing = None;
    each_module_code(resources, |code| {
        let Some(digest) = placeholder_digest(code).map(str::to_string) else {
            return;
        };
        match modules.get(&digest) {
            Some(bytes) => {
                code.specifier = Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(bytes.clone())),
                    ..Default::default()
                }));
            }
            None => missing = Some(digest),
        }
    });
    if let Some(digest) = missing {
        return Err(format!("no plugin module {digest} in the module store"));
    }
    resources.version = resources.content_version();
    Ok(())
}

fn placeholder_digest(code: &AsyncDataSource) -> Option<&str> {
    match &code.specifier {
        Some(async_data_source::Specifier::Remote(remote)) => remote
            .http_uri
            .as_ref()
            .and_then(|uri| stored_module_digest(&uri.uri)),
        _ => None,
    }
}

/// Calls `visit` on the module source of every Wasm filter of every listener, writing back
/// what it changed.
fn each_module_code(resources: &mut ResourceSet, mut visit: impl FnMut(&mut AsyncDataSource)) {
    for listener in &mut resources.listeners {
        for chain in &mut listener.filter_chains {
            for network_filter in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut network_filter.config_type
                else {
                    continue;
                };
                let Ok(mut manager) = HttpConnectionManager::decode(any.value.as_slice()) else {
                    continue;
                };
                let mut changed = false;
                for http in &mut manager.http_filters {
                    let Some(http_filter::ConfigType::TypedConfig(typed)) = &mut http.config_type
                    else {
                        continue;
                    };
                    if !typed
                        .type_url
                        .ends_with("envoy.extensions.filters.http.wasm.v3.Wasm")
                    {
                        continue;
                    }
                    let Ok(mut wasm) = Wasm::decode(typed.value.as_slice()) else {
                        continue;
                    };
                    let Some(plugin_config::Vm::VmConfig(vm)) =
                        wasm.config.as_mut().and_then(|c| c.vm.as_mut())
                    else {
                        continue;
                    };
                    let Some(code) = vm.code.as_mut() else {
                        continue;
                    };
                    let before = code.clone();
                    visit(code);
                    if *code != before {
                        typed.value = wasm.encode_to_vec();
                        changed = true;
                    }
                }
                if changed {
                    any.value = manager.encode_to_vec();
                }
            }
        }
    }
}
