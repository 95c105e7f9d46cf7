-- Every version of the desired config, and the audit trail of who changed what.
-- Portable SQL: the same statements run on SQLite and PostgreSQL.
CREATE TABLE nip_revisions (
    version BIGINT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    author TEXT NOT NULL,
    message TEXT NOT NULL,
    action TEXT NOT NULL,
    restored_from BIGINT,
    state TEXT NOT NULL,
    canary_region TEXT,
    canary_deadline_ms BIGINT,
    yaml TEXT NOT NULL,
    diff TEXT NOT NULL
);

CREATE INDEX nip_revisions_state ON nip_revisions (state, version);

CREATE TABLE nip_events (
    id BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    version BIGINT,
    detail TEXT NOT NULL
);
