-- Sentinel control plane schema.
--
-- The control plane is the only writer. Policy lives in small tables whose
-- every change bumps `policy_meta.version` in the same transaction and
-- notifies `sentinel_policy`, so every control-plane replica rebuilds its
-- snapshot and pushes the change to its proxies.

-- One global, monotonic policy version.
CREATE TABLE policy_meta (
    id         smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO policy_meta (version) VALUES (1);

-- Declarative policy: one row per named object, its body as the validated
-- JSON document (`sentinel_shared::spec`).
CREATE TABLE policy_roles (
    name            text PRIMARY KEY,
    spec            jsonb  NOT NULL,
    updated_version bigint NOT NULL
);

CREATE TABLE policy_backends (
    name            text PRIMARY KEY,
    spec            jsonb  NOT NULL,
    updated_version bigint NOT NULL
);

CREATE TABLE policy_jwt_issuers (
    name            text PRIMARY KEY,
    spec            jsonb  NOT NULL,
    updated_version bigint NOT NULL
);

-- Singleton settings: redaction rules, audit and federation settings.
CREATE TABLE policy_settings (
    id              smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    redaction_rules jsonb  NOT NULL DEFAULT '[]',
    audit           jsonb  NOT NULL DEFAULT '{}',
    federation      jsonb  NOT NULL DEFAULT '{}',
    updated_version bigint NOT NULL DEFAULT 1
);
INSERT INTO policy_settings DEFAULT VALUES;

-- API keys: only the SHA-256 of the key is stored, never the key.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    hash         bytea       NOT NULL CHECK (length(hash) = 32),
    role         text        NOT NULL,
    owner        text        NOT NULL DEFAULT '',
    description  text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    rotated_from text REFERENCES api_keys (id)
);
CREATE INDEX api_keys_role ON api_keys (role);
CREATE INDEX api_keys_owner ON api_keys (owner);

-- Keys sealing MCP session tokens; pushed to proxies, never to admins.
CREATE TABLE session_keys (
    id         integer PRIMARY KEY,
    key        bytea       NOT NULL CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Join tokens proxies present on their streams (hash only).
CREATE TABLE join_tokens (
    id          text PRIMARY KEY,
    hash        bytea       NOT NULL CHECK (length(hash) = 32),
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The fleet as the control planes last saw it.
CREATE TABLE proxies (
    proxy_id         text PRIMARY KEY,
    build_version    text        NOT NULL DEFAULT '',
    labels           jsonb       NOT NULL DEFAULT '{}',
    connected        boolean     NOT NULL DEFAULT false,
    control_plane_id text        NOT NULL DEFAULT '',
    -- Bumped on every new stream, so a stale stream's disconnect cannot
    -- mark a newer connection as gone.
    connection_id    uuid,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL DEFAULT now(),
    acked_version    bigint      NOT NULL DEFAULT 0,
    rejected_version bigint      NOT NULL DEFAULT 0,
    reject_reason    text        NOT NULL DEFAULT '',
    stats            jsonb       NOT NULL DEFAULT '{}'
);

-- Audit events, partitioned by day on `ts`. `ts` is the event's own
-- timestamp, which ingest checks against the UUIDv7 time in `event_id`, so
-- the primary key (event_id, ts) makes `event_id` unique: a replay of the
-- same event lands on the same key and is absorbed.
CREATE TABLE audit_events (
    event_id              uuid        NOT NULL,
    ts                    timestamptz NOT NULL,
    received_at           timestamptz NOT NULL DEFAULT now(),
    request_id            text        NOT NULL,
    proxy_id              text        NOT NULL,
    epoch                 bigint      NOT NULL,
    sequence              bigint      NOT NULL,
    subject               text        NOT NULL,
    role                  text        NOT NULL,
    api_key_id            text        NOT NULL,
    auth_method           text        NOT NULL,
    session_id            text        NOT NULL,
    mcp_method            text        NOT NULL,
    tool                  text        NOT NULL,
    backend               text        NOT NULL,
    arguments             text        NOT NULL,
    arguments_truncated   boolean     NOT NULL,
    response              text        NOT NULL,
    outcome               text        NOT NULL,
    http_status           integer     NOT NULL,
    jsonrpc_error_code    integer     NOT NULL,
    jsonrpc_error_message text        NOT NULL,
    latency_us            bigint      NOT NULL,
    decision              text        NOT NULL,
    protocol_version      text        NOT NULL,
    client_name           text        NOT NULL,
    prev_hash             bytea       NOT NULL,
    hash                  bytea       NOT NULL,
    -- False when the event's own hash or its link to the previous event of
    -- its chain failed when it was ingested.
    chain_ok              boolean     NOT NULL,
    PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);

CREATE INDEX audit_events_ts ON audit_events (ts DESC, event_id DESC);
CREATE INDEX audit_events_subject ON audit_events (subject, ts DESC);
CREATE INDEX audit_events_key ON audit_events (api_key_id, ts DESC);
CREATE INDEX audit_events_tool ON audit_events (tool, ts DESC);
CREATE INDEX audit_events_outcome ON audit_events (outcome, ts DESC);
CREATE INDEX audit_events_chain ON audit_events (proxy_id, epoch, sequence);
CREATE INDEX audit_events_request ON audit_events (request_id);
CREATE INDEX audit_events_session ON audit_events (session_id, ts DESC);
CREATE INDEX audit_events_received ON audit_events (received_at);

-- Audit rows are immutable. These triggers refuse UPDATE, DELETE and
-- TRUNCATE for every role, the application's included; retention removes
-- whole day partitions with DROP TABLE (see docs/OPERATING.md), which row
-- triggers do not see.
CREATE FUNCTION audit_events_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are immutable: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_immutable();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_immutable();

-- Per (proxy, epoch) chain state: how far the sequence is contiguous, the
-- highest sequence seen, and the hash at that highest sequence.
CREATE TABLE audit_chains (
    proxy_id       text        NOT NULL,
    epoch          bigint      NOT NULL,
    contiguous_seq bigint      NOT NULL DEFAULT 0,
    max_seq        bigint      NOT NULL DEFAULT 0,
    last_hash      bytea       NOT NULL DEFAULT '',
    breaks         bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (proxy_id, epoch)
);

-- Ranges of sequence numbers missing below a chain's max_seq. A gap shrinks
-- and disappears as the missing events arrive.
CREATE TABLE audit_gaps (
    proxy_id    text        NOT NULL,
    epoch       bigint      NOT NULL,
    from_seq    bigint      NOT NULL,
    to_seq      bigint      NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (proxy_id, epoch, from_seq),
    CHECK (from_seq <= to_seq)
);

-- Events that failed validation: kept with the reason, never dropped.
CREATE TABLE audit_dead_letters (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    proxy_id    text        NOT NULL,
    event_id    text        NOT NULL,
    reason      text        NOT NULL,
    -- The event as received, protobuf-encoded.
    payload     bytea       NOT NULL
);
CREATE INDEX audit_dead_letters_received ON audit_dead_letters (received_at DESC);
