-- One multi-row insert from column arrays. ON CONFLICT DO NOTHING makes a
-- replayed event a no-op; RETURNING tells which events were new.
INSERT INTO audit_events (
    event_id, ts, request_id, proxy_id, epoch, sequence, subject, role,
    api_key_id, auth_method, session_id, mcp_method, tool, backend,
    arguments, arguments_truncated, response, outcome, http_status,
    jsonrpc_error_code, jsonrpc_error_message, latency_us, decision,
    protocol_version, client_name, prev_hash, hash, chain_ok
)
SELECT * FROM UNNEST(
    $1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::text[],
    $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
    $15::text[], $16::boolean[], $17::text[], $18::text[], $19::integer[],
    $20::integer[], $21::text[], $22::bigint[], $23::text[],
    $24::text[], $25::text[], $26::bytea[], $27::bytea[], $28::boolean[]
)
ON CONFLICT DO NOTHING
RETURNING event_id
