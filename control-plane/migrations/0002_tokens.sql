-- API tokens: who may call the REST API, with which role and for which tenants.
-- Only a SHA-256 of each token's secret is kept; the secret is shown once, at creation.
CREATE TABLE nip_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    tenants TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);
