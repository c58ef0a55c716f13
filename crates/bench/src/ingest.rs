//! Audit ingest: events/s the control plane commits from the ingest stream
//! (validation, chain check, idempotent insert, ack after commit), against
//! a raw `COPY` of the same rows into the same table on the same database
//! server, in text and in binary format; the faster of the two is the
//! baseline. Rounds alternate between the three. The stream is driven like
//! the proxy's shipper drives it: batches of 1000, at most as many unacked
//! as the shipper allows.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use sentinel_control_plane::store::Store;
use sentinel_control_plane::testing::TestDb;
use sentinel_shared::proto::audit_ingest_client::AuditIngestClient;
use sentinel_shared::proto::{self as pb, AuditEvent, ingest_request};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{Cp, JOIN, spread};

const BATCH: usize = 1000;

/// Batches sent and not yet acked at most: what the proxy's shipper allows.
fn max_in_flight() -> usize {
    sentinel_spool::shipper::ShipperConfig::new("").max_in_flight
}

fn events(n: usize, proxy: &str) -> Vec<AuditEvent> {
    let mut prev = Vec::new();
    (1..=n as u64)
        .map(|seq| {
            let ts = sentinel_shared::now_us();
            let mut ev = AuditEvent {
                event_id: sentinel_shared::audit::event_id_at(ts),
                request_id: format!("req-{seq}"),
                timestamp_us: ts,
                proxy_id: proxy.into(),
                epoch: 1,
                sequence: seq,
                subject: "alice@example.com".into(),
                role: "developer".into(),
                api_key_id: "AbCdEfGhIjKl".into(),
                auth_method: "api_key".into(),
                session_id: String::new(),
                mcp_method: "tools/call".into(),
                tool: "demo__echo".into(),
                backend: "demo".into(),
                arguments: format!("{{\"message\":\"{}\"}}", "x".repeat(200)),
                outcome: pb::Outcome::Ok as i32,
                http_status: 200,
                latency_us: 850,
                decision: r#"{"authn":"api_key","authz":"allow demo/*","rate_limit":"ok"}"#.into(),
                protocol_version: "2026-07-28".into(),
                client_name: "bench".into(),
                ..Default::default()
            };
            sentinel_shared::audit::seal(&mut ev, &prev);
            prev = ev.hash.clone();
            ev
        })
        .collect()
}

/// Streams `evs` through the real ingest service; returns events/s.
async fn through_ingest(cp: &Cp, evs: Vec<AuditEvent>) -> f64 {
    let ch = Channel::from_shared(format!("http://{}", cp.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AuditIngestClient::new(ch).max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::IngestRequest {
        msg: Some(ingest_request::Msg::Hello(pb::IngestHello {
            proxy_id: evs[0].proxy_id.clone(),
            join_token: JOIN.into(),
        })),
    })
    .await
    .unwrap();
    let mut acks = client
        .ingest(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let n = evs.len();
    let batches: Vec<Vec<AuditEvent>> = evs.chunks(BATCH).map(|c| c.to_vec()).collect();
    let count = batches.len();
    let window = Arc::new(Semaphore::new(max_in_flight()));
    let started = Instant::now();
    let w = window.clone();
    tokio::spawn(async move {
        for (i, b) in batches.into_iter().enumerate() {
            // An ack gives the permit back.
            match w.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
            let m = pb::IngestRequest {
                msg: Some(ingest_request::Msg::Batch(pb::AuditBatch {
                    batch_id: i as u64 + 1,
                    events: b,
                })),
            };
            if tx.send(m).await.is_err() {
                return;
            }
        }
        // Keep the stream open until the acks are read.
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
    });
    let mut inserted = 0;
    for _ in 0..count {
        let ack = acks.next().await.unwrap().unwrap();
        window.add_permits(1);
        inserted += ack.inserted as usize;
    }
    assert_eq!(inserted, n, "every event inserted");
    n as f64 / started.elapsed().as_secs_f64()
}

fn esc(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn ts_text(us: i64) -> String {
    let t = sentinel_control_plane::store::from_us(us);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// The same rows as COPY text.
fn copy_text(evs: &[AuditEvent]) -> String {
    let mut out = String::with_capacity(evs.len() * 700);
    for e in evs {
        let outcome = sentinel_shared::audit::outcome_str(e.outcome());
        let _ = write!(out, "{}\t{}\t", e.event_id, ts_text(e.timestamp_us));
        for s in [&e.request_id, &e.proxy_id] {
            esc(&mut out, s);
            out.push('\t');
        }
        let _ = write!(out, "{}\t{}\t", e.epoch, e.sequence);
        for s in [
            &e.subject,
            &e.role,
            &e.api_key_id,
            &e.auth_method,
            &e.session_id,
            &e.mcp_method,
            &e.tool,
            &e.backend,
            &e.arguments,
        ] {
            esc(&mut out, s);
            out.push('\t');
        }
        let _ = write!(out, "{}\t", if e.arguments_truncated { "t" } else { "f" });
        esc(&mut out, &e.response);
        out.push('\t');
        let _ = write!(
            out,
            "{outcome}\t{}\t{}\t",
            e.http_status, e.jsonrpc_error_code
        );
        esc(&mut out, &e.jsonrpc_error_message);
        let _ = write!(out, "\t{}\t", e.latency_us);
        for s in [&e.decision, &e.protocol_version, &e.client_name] {
            esc(&mut out, s);
            out.push('\t');
        }
        let _ = writeln!(out, "\\\\x{}\t\\\\x{}\tt", hex(&e.prev_hash), hex(&e.hash));
    }
    out
}

/// The same rows in COPY's binary format: no text to parse on the server.
fn copy_binary(evs: &[AuditEvent]) -> Vec<u8> {
    // Microseconds from the Unix epoch to Postgres' (2000-01-01).
    const PG_EPOCH_US: i64 = 946_684_800_000_000;
    fn field(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(evs.len() * 700);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension
    for e in evs {
        let outcome = sentinel_shared::audit::outcome_str(e.outcome());
        out.extend_from_slice(&28i16.to_be_bytes());
        let id = uuid::Uuid::parse_str(&e.event_id).unwrap();
        field(&mut out, id.as_bytes());
        field(&mut out, &(e.timestamp_us - PG_EPOCH_US).to_be_bytes());
        for s in [&e.request_id, &e.proxy_id] {
            field(&mut out, s.as_bytes());
        }
        field(&mut out, &(e.epoch as i64).to_be_bytes());
        field(&mut out, &(e.sequence as i64).to_be_bytes());
        for s in [
            &e.subject,
            &e.role,
            &e.api_key_id,
            &e.auth_method,
            &e.session_id,
            &e.mcp_method,
            &e.tool,
            &e.backend,
            &e.arguments,
        ] {
            field(&mut out, s.as_bytes());
        }
        field(&mut out, &[u8::from(e.arguments_truncated)]);
        field(&mut out, e.response.as_bytes());
        field(&mut out, outcome.as_bytes());
        field(&mut out, &(e.http_status as i32).to_be_bytes());
        field(&mut out, &e.jsonrpc_error_code.to_be_bytes());
        field(&mut out, e.jsonrpc_error_message.as_bytes());
        field(&mut out, &(e.latency_us as i64).to_be_bytes());
        for s in [&e.decision, &e.protocol_version, &e.client_name] {
            field(&mut out, s.as_bytes());
        }
        field(&mut out, &e.prev_hash);
        field(&mut out, &e.hash);
        field(&mut out, &[1]);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// COPYs the same rows into the same table of a fresh database, as text
/// or binary; events/s.
async fn through_copy(evs: &[AuditEvent], binary: bool) -> f64 {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    store.ensure_upcoming_partitions(1).await.unwrap();
    let data = if binary {
        copy_binary(evs)
    } else {
        copy_text(evs).into_bytes()
    };
    let mut conn = db.pool.acquire().await.unwrap();
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY audit_events (event_id, ts, request_id, proxy_id, epoch, sequence, subject, role, \
             api_key_id, auth_method, session_id, mcp_method, tool, backend, arguments, arguments_truncated, \
             response, outcome, http_status, jsonrpc_error_code, jsonrpc_error_message, latency_us, decision, \
             protocol_version, client_name, prev_hash, hash, chain_ok) FROM STDIN{}",
            if binary { " (FORMAT binary)" } else { "" }
        ))
        .await
        .unwrap();
    copy.send(data.as_slice()).await.unwrap();
    let rows = copy.finish().await.unwrap();
    let rate = evs.len() as f64 / started.elapsed().as_secs_f64();
    assert_eq!(rows as usize, evs.len());
    drop(conn);
    rate
}

pub async fn run(quick: bool) -> Value {
    let total = if quick { 2_000 } else { 200_000 };
    let rounds = if quick { 1 } else { 5 };
    println!(
        "\n== audit ingest: {total} events (batches of {BATCH}, {} in flight) per round, {rounds} rounds, alternating",
        max_in_flight()
    );
    let (mut ing, mut txt, mut bin, mut ratio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let evs = events(total, &format!("bench-ingest-{r}"));
        // The order rotates so no path always runs first (or last) in a
        // round.
        let (mut a, mut t, mut b) = (0.0, 0.0, 0.0);
        for step in 0..3 {
            match (r + step) % 3 {
                0 => {
                    let cp = Cp::start().await;
                    a = through_ingest(&cp, evs.clone()).await;
                    drop(cp);
                }
                1 => t = through_copy(&evs, false).await,
                _ => b = through_copy(&evs, true).await,
            }
        }
        ing.push(a);
        txt.push(t);
        bin.push(b);
        ratio.push(a / f64::max(t, b));
    }
    let (a, amin, amax) = spread(ing);
    let (t, tmin, tmax) = spread(txt);
    let (b, bmin, bmax) = spread(bin);
    let (r, rmin, rmax) = spread(ratio);
    println!("{:<28} {:>34}", "path", "events/s median [min..max]");
    println!(
        "{:<28} {:>34}",
        "ingest stream (acked)",
        format!("{a:.0} [{amin:.0}..{amax:.0}]")
    );
    println!(
        "{:<28} {:>34}",
        "raw COPY text, same rows",
        format!("{t:.0} [{tmin:.0}..{tmax:.0}]")
    );
    println!(
        "{:<28} {:>34}",
        "raw COPY binary, same rows",
        format!("{b:.0} [{bmin:.0}..{bmax:.0}]")
    );
    println!(
        "{:<28} {:>34}",
        "ratio ingest/best COPY",
        format!("{r:.2} [{rmin:.2}..{rmax:.2}]")
    );
    json!({"events_per_round": total, "ingest_eps": a, "copy_text_eps": t, "copy_binary_eps": b,
           "ratio": r, "ratio_min": rmin, "ratio_max": rmax})
}
