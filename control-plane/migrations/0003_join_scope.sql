-- Join tokens (role 'join') let a proxy get its first certificate; the scope limits which
-- node may use one: 'node:ID', 'region:NAME', or '' for any node.
ALTER TABLE nip_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT '';
