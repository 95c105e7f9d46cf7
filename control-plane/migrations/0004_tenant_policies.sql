-- What an admin requires of a tenant's configs: the ed25519 keys its plugin modules must be
-- signed by (base64, comma-separated). A tenant without a row has no requirement.
CREATE TABLE nip_tenant_policies (
    tenant TEXT PRIMARY KEY,
    plugin_keys TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
