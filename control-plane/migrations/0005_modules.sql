-- Plugin modules uploaded to the control plane (`nip deploy`, PUT /v1/modules), by their
-- SHA-256; a config names one by digest and the control plane sends its bytes with the
-- config. Kept as base64 text, which every store backend holds the same way.
CREATE TABLE nip_modules (
    sha256 TEXT PRIMARY KEY,
    module_base64 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL,
    uploaded_at_ms BIGINT NOT NULL
);
