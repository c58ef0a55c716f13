//! Audit storage: idempotent batch ingest with hash-chain and gap tracking,
//! queries with cursor pagination, day partitions, retention, and the
//! verification of stored chains.

use sqlx::AssertSqlSafe;
use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;
use futures::TryStreamExt;
use prost::Message;
use sentinel_shared::audit::{self, hash_ok, outcome_str, parse_outcome, validate_event};
use sentinel_shared::proto::{AuditEvent, Outcome};
use sqlx::{Postgres, QueryBuilder, Transaction};
use time::{Date, OffsetDateTime};

use super::{Store, from_us, to_us};
use crate::error::{Error, Result};

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestResult {
    pub inserted: u32,
    pub duplicates: u32,
    pub dead_lettered: u32,
}

/// An event as stored, with what ingest concluded about its chain link.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: AuditEvent,
    pub received_at_us: i64,
    pub chain_ok: bool,
    /// Open gaps of the event's own chain that it borders, as (from, to)
    /// sequence ranges: one starting right after it, one ending right
    /// before it, or both. Filled in by [`Store::query_audit`]; empty
    /// elsewhere (the live tail does not look).
    pub borders_gaps: Vec<(u64, u64)>,
}

/// Filters of an audit query. Empty strings mean "any".
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
    pub subject: Option<String>,
    pub api_key_id: Option<String>,
    pub role: Option<String>,
    pub tool: Option<String>,
    pub backend: Option<String>,
    pub outcome: Option<String>,
    pub proxy_id: Option<String>,
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    pub chain_broken_only: bool,
    /// Only events right next to an open gap of their chain: the last one
    /// before the missing sequence numbers and the first one after. This
    /// answers "where are records missing, and what surrounds the hole"
    /// without listing events that are not there; an event stops matching
    /// once the records next to it arrive and the gap closes.
    pub near_gap: bool,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// A range of sequence numbers missing from a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub proxy_id: String,
    pub epoch: u64,
    pub from_seq: u64,
    pub to_seq: u64,
    pub detected_at_us: i64,
}

/// The result of checking stored chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub chains: u64,
    pub events: u64,
    pub problems: Vec<String>,
}

const EVENT_COLUMNS: &str = "event_id, ts, received_at, request_id, proxy_id, epoch, sequence, subject, role, \
    api_key_id, auth_method, session_id, mcp_method, tool, backend, arguments, arguments_truncated, response, \
    outcome, http_status, jsonrpc_error_code, jsonrpc_error_message, latency_us, decision, protocol_version, \
    client_name, prev_hash, hash, chain_ok";

impl Store {
    /// Stores a batch from the proxy authenticated as `proxy_id`, in one
    /// transaction. Valid events are inserted idempotently (a replay adds
    /// nothing); invalid ones go to the dead-letter table with the reason.
    /// Returns only after commit: the caller acks then.
    pub async fn ingest_batch(
        &self,
        proxy_id: &str,
        events: Vec<AuditEvent>,
    ) -> Result<IngestResult> {
        self.ingest_prepared(PreparedBatch::new(proxy_id, events))
            .await
    }

    /// Stores a batch prepared by [`PreparedBatch::new`], in one
    /// transaction; returns only after commit. The ingest stream prepares
    /// the next batch while this one is in the database.
    pub async fn ingest_prepared(&self, batch: PreparedBatch) -> Result<IngestResult> {
        let PreparedBatch {
            proxy_id,
            mut cols,
            self_ok,
            dead,
            days,
        } = batch;
        let proxy_id = proxy_id.as_str();
        self.ensure_partitions(days).await?;

        let mut tx = self.pool.begin().await?;
        // Chain bookkeeping per epoch, events in sequence order.
        let mut by_epoch: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (i, epoch) in cols.epoch.iter().enumerate() {
            by_epoch.entry(*epoch).or_default().push(i);
        }
        let n = cols.event_id.len();
        let mut chain_dup = vec![false; n];
        cols.chain_ok = vec![true; n];
        let mut chains = Vec::new();
        for (epoch, mut idx) in by_epoch {
            idx.sort_by_key(|&i| cols.sequence[i]);
            let mut chain = ChainState::lock(&mut tx, proxy_id, epoch as u64).await?;
            for i in idx {
                let link = Link {
                    sequence: cols.sequence[i] as u64,
                    prev_hash: &cols.prev_hash[i],
                    hash: &cols.hash[i],
                    self_ok: self_ok[i],
                };
                let (ok, dup) = chain.advance(&mut tx, link).await?;
                cols.chain_ok[i] = ok;
                chain_dup[i] = dup;
            }
            chains.push(chain);
        }

        let inserted_ids = insert_events(&mut tx, &cols).await?;
        // An event the chain took for a replay but that was new is a second
        // event claiming a sequence number already used: a break.
        for (i, dup) in chain_dup.iter().enumerate() {
            if *dup
                && inserted_ids.contains(&cols.event_id[i])
                && let Some(c) = chains.iter_mut().find(|c| c.epoch == cols.epoch[i] as u64)
            {
                c.breaks += 1;
            }
        }
        for chain in &chains {
            chain.save(&mut tx).await?;
        }
        for (ev, reason) in &dead {
            sqlx::query("INSERT INTO audit_dead_letters (proxy_id, event_id, reason, payload) VALUES ($1, $2, $3, $4)")
                .bind(proxy_id)
                .bind(audit::scrub(&ev.event_id).as_ref())
                .bind(reason)
                .bind(ev.encode_to_vec())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        let inserted = inserted_ids.len() as u32;
        let result = IngestResult {
            inserted,
            duplicates: n as u32 - inserted,
            dead_lettered: dead.len() as u32,
        };
        metrics::counter!("sentinel_audit_events_ingested_total", "result" => "inserted")
            .increment(result.inserted.into());
        metrics::counter!("sentinel_audit_events_ingested_total", "result" => "duplicate")
            .increment(result.duplicates.into());
        if result.dead_lettered > 0 {
            metrics::counter!("sentinel_audit_events_ingested_total", "result" => "dead_letter")
                .increment(result.dead_lettered.into());
            for (ev, reason) in &dead {
                tracing::warn!(proxy_id, event_id = %audit::scrub(&ev.event_id), %reason, "audit event dead-lettered");
            }
        }
        if inserted > 0 {
            // Wakes live tails on every control plane; delivered at commit.
            let _ = sqlx::query("SELECT pg_notify('sentinel_audit', '')")
                .execute(&self.pool)
                .await;
        }
        Ok(result)
    }

    /// Creates the day partitions for `days` that do not exist yet.
    pub async fn ensure_partitions(&self, days: HashSet<Date>) -> Result<()> {
        let missing: Vec<Date> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            days.into_iter().filter(|d| !known.contains(d)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Two control planes creating the same partition would race on the
        // catalog; one advisory lock serialises partition DDL.
        sqlx::query("SELECT pg_advisory_xact_lock(7431000001)")
            .execute(&mut *tx)
            .await?;
        for day in &missing {
            let next = day.next_day().unwrap_or(*day);
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF audit_events FOR VALUES FROM ('{day}') TO ('{next}')",
                partition_name(*day)
            )))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let mut known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(missing);
        Ok(())
    }

    /// Creates partitions for today and the next `ahead` days.
    pub async fn ensure_upcoming_partitions(&self, ahead: u32) -> Result<()> {
        let today = OffsetDateTime::now_utc().date();
        let mut days = HashSet::new();
        let mut d = today;
        for _ in 0..=ahead {
            days.insert(d);
            d = d.next_day().unwrap_or(d);
        }
        self.ensure_partitions(days).await
    }

    /// Drops the day partitions entirely older than `retention_days`.
    /// This is the only way audit rows ever leave the database.
    pub async fn drop_expired_partitions(&self, retention_days: u32) -> Result<Vec<String>> {
        if retention_days == 0 {
            return Ok(Vec::new());
        }
        let cutoff = OffsetDateTime::now_utc().date() - time::Duration::days(retention_days as i64);
        let parts: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'audit_events'::regclass ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut dropped = Vec::new();
        for (name,) in parts {
            let Some(day) = partition_day(&name) else {
                continue;
            };
            // The partition holds [day, day+1): drop it when day+1 <= cutoff.
            if day.next_day().is_some_and(|n| n <= cutoff) {
                sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}")))
                    .execute(&self.pool)
                    .await?;
                self.partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&day);
                tracing::info!(partition = %name, retention_days, "audit partition dropped by retention");
                dropped.push(name);
            }
        }
        Ok(dropped)
    }

    /// Events matching `f`, newest first, and the cursor of the next page.
    pub async fn query_audit(&self, f: &AuditFilter) -> Result<(Vec<StoredEvent>, Option<String>)> {
        let limit = f.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(Error::invalid(
                "limit",
                format!("must be between 1 and {MAX_PAGE}"),
            ));
        }
        if let (Some(a), Some(b)) = (f.from_us, f.to_us)
            && a >= b
        {
            return Err(Error::invalid("from", "must be before 'to'"));
        }
        if let Some(o) = &f.outcome
            && parse_outcome(o).is_none()
        {
            return Err(Error::invalid(
                "outcome",
                format!("must be one of {}", audit::OUTCOMES.join(", ")),
            ));
        }
        let cursor = f.cursor.as_deref().map(decode_cursor).transpose()?;
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE true"
        ));
        if let Some(a) = f.from_us {
            q.push(" AND ts >= ").push_bind(from_us(a));
        }
        if let Some(b) = f.to_us {
            q.push(" AND ts < ").push_bind(from_us(b));
        }
        for (col, v) in [
            ("subject", &f.subject),
            ("api_key_id", &f.api_key_id),
            ("role", &f.role),
            ("tool", &f.tool),
            ("backend", &f.backend),
            ("outcome", &f.outcome),
            ("proxy_id", &f.proxy_id),
            ("request_id", &f.request_id),
            ("session_id", &f.session_id),
        ] {
            if let Some(v) = v {
                q.push(format!(" AND {col} = ")).push_bind(v.clone());
            }
        }
        if f.chain_broken_only {
            q.push(" AND NOT chain_ok");
        }
        if f.near_gap {
            // Driven from the (few) open gaps through the chain index
            // (proxy_id, epoch, sequence), so it stays cheap on a large
            // table. A gap from sequence 1 has no event before it.
            q.push(
                " AND (proxy_id, epoch, sequence) IN (\
                 SELECT proxy_id, epoch, from_seq - 1 FROM audit_gaps WHERE from_seq > 1 \
                 UNION ALL SELECT proxy_id, epoch, to_seq + 1 FROM audit_gaps)",
            );
        }
        if let Some((ts, id)) = cursor {
            q.push(" AND (ts, event_id) < (")
                .push_bind(from_us(ts))
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        q.push(" ORDER BY ts DESC, event_id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let rows: Vec<AuditRow> = q.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() > limit as usize;
        let mut events: Vec<StoredEvent> = rows
            .into_iter()
            .take(limit as usize)
            .map(AuditRow::into_stored)
            .collect();
        self.mark_gap_borders(&mut events).await?;
        let next = if more {
            events
                .last()
                .map(|e| encode_cursor(e.event.timestamp_us, &e.event.event_id))
        } else {
            None
        };
        Ok((events, next))
    }

    /// Sets each event's `borders_gaps` from the open gaps of the chains on
    /// the page: one query per page, whatever its size.
    async fn mark_gap_borders(&self, events: &mut [StoredEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let chains: HashSet<(&str, i64)> = events
            .iter()
            .map(|e| (e.event.proxy_id.as_str(), e.event.epoch as i64))
            .collect();
        let (proxies, epochs): (Vec<String>, Vec<i64>) =
            chains.into_iter().map(|(p, e)| (p.to_string(), e)).unzip();
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT g.proxy_id, g.epoch, g.from_seq, g.to_seq FROM audit_gaps g \
             JOIN UNNEST($1::text[], $2::bigint[]) AS c(proxy_id, epoch) \
               ON g.proxy_id = c.proxy_id AND g.epoch = c.epoch \
             ORDER BY g.from_seq",
        )
        .bind(proxies)
        .bind(epochs)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut by_chain: HashMap<(String, u64), Vec<(u64, u64)>> = HashMap::new();
        for (proxy, epoch, from, to) in rows {
            by_chain
                .entry((proxy, epoch as u64))
                .or_default()
                .push((from as u64, to as u64));
        }
        for e in events.iter_mut() {
            let Some(gaps) = by_chain.get(&(e.event.proxy_id.clone(), e.event.epoch)) else {
                continue;
            };
            let s = e.event.sequence;
            e.borders_gaps = gaps
                .iter()
                .copied()
                .filter(|&(from, to)| {
                    to.checked_add(1) == Some(s) || from.checked_sub(1) == Some(s)
                })
                .collect();
        }
        Ok(())
    }

    /// Events received after `after_us` (received time), oldest first: the
    /// live tail.
    pub async fn audit_received_after(
        &self,
        after_us: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        let rows: Vec<AuditRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE received_at > $1 ORDER BY received_at, event_id LIMIT $2"
        )))
        .bind(from_us(after_us))
        .bind(limit.clamp(1, MAX_PAGE) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(AuditRow::into_stored).collect())
    }

    /// Where a live tail starts: the database's clock now (`received_at`
    /// is stamped by it, so the proxy host's clock does not matter).
    pub async fn audit_tail_start(&self) -> Result<(i64, uuid::Uuid)> {
        let (now,): (OffsetDateTime,) =
            sqlx::query_as("SELECT now()").fetch_one(&self.pool).await?;
        Ok((to_us(now), uuid::Uuid::nil()))
    }

    /// Events after the position `after` = (received time in unix
    /// microseconds, event id), oldest first: the live tail's poll.
    ///
    /// `received_at` is the start time of the inserting transaction, so an
    /// ingest that began earlier can commit later than one already read.
    /// Only events older than every transaction still open on this
    /// database are returned: those can no longer be preceded by a late
    /// commit, so a tail that advances its position never skips one. (A
    /// long transaction delays the tail; it does not lose events.) Events
    /// sharing one received time, as a whole batch does, are not skipped
    /// at a page boundary either: the position includes the event id.
    pub async fn audit_tail(
        &self,
        after: (i64, uuid::Uuid),
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        let rows: Vec<AuditRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events \
             WHERE received_at >= $1 AND (received_at, event_id) > ($1, $2) \
               AND received_at < (SELECT min(xact_start) FROM pg_stat_activity \
                                  WHERE datname = current_database() AND xact_start IS NOT NULL) \
             ORDER BY received_at, event_id LIMIT $3"
        )))
        .bind(from_us(after.0))
        .bind(after.1)
        .bind(limit.clamp(1, MAX_PAGE) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(AuditRow::into_stored).collect())
    }

    /// Open gaps, optionally for one proxy.
    pub async fn audit_gaps(&self, proxy_id: Option<&str>) -> Result<Vec<Gap>> {
        let rows: Vec<(String, i64, i64, i64, OffsetDateTime)> = sqlx::query_as(
            "SELECT proxy_id, epoch, from_seq, to_seq, detected_at FROM audit_gaps \
             WHERE ($1::text IS NULL OR proxy_id = $1) ORDER BY proxy_id, epoch, from_seq",
        )
        .bind(proxy_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(proxy_id, epoch, from_seq, to_seq, at)| Gap {
                proxy_id,
                epoch: epoch as u64,
                from_seq: from_seq as u64,
                to_seq: to_seq as u64,
                detected_at_us: to_us(at),
            })
            .collect())
    }

    /// Recomputes every stored event's hash from its columns and checks the
    /// links and the sequence of each (proxy, epoch) chain. Reads in a
    /// stream, so memory stays flat whatever the table size.
    pub async fn verify_chains(&self, proxy_id: Option<&str>) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE ($1::text IS NULL OR proxy_id = $1) \
             ORDER BY proxy_id, epoch, sequence, ts"
        );
        let mut rows = sqlx::query_as::<_, AuditRow>(AssertSqlSafe(sql))
            .bind(proxy_id)
            .fetch(&self.pool);
        let mut prev: Option<(String, u64, u64, Vec<u8>)> = None;
        while let Some(row) = rows.try_next().await? {
            let ev = row.into_stored().event;
            report.events += 1;
            let here = format!(
                "proxy {} epoch {} sequence {}",
                ev.proxy_id, ev.epoch, ev.sequence
            );
            if !hash_ok(&ev) {
                report.problems.push(format!(
                    "{here} (event {}): stored content does not match its hash",
                    ev.event_id
                ));
            }
            match &prev {
                Some((p, e, s, h)) if *p == ev.proxy_id && *e == ev.epoch => {
                    if ev.sequence == *s {
                        report
                            .problems
                            .push(format!("{here}: sequence number used twice"));
                    } else if ev.sequence == s + 1 {
                        if ev.prev_hash != *h {
                            report
                                .problems
                                .push(format!("{here}: does not link to the hash of sequence {s}"));
                        }
                    } else {
                        report.problems.push(format!(
                            "{here}: sequences {}..={} are missing",
                            s + 1,
                            ev.sequence - 1
                        ));
                    }
                }
                _ => {
                    report.chains += 1;
                    if ev.sequence == 1 && !ev.prev_hash.is_empty() {
                        report
                            .problems
                            .push(format!("{here}: first event links to a predecessor"));
                    } else if ev.sequence > 1 {
                        report.problems.push(format!(
                            "{here}: sequences 1..={} are missing",
                            ev.sequence - 1
                        ));
                    }
                }
            }
            prev = Some((ev.proxy_id.clone(), ev.epoch, ev.sequence, ev.hash.clone()));
        }
        Ok(report)
    }

    /// Events kept in the dead-letter table: (proxy id, event id, reason).
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query_as(
            "SELECT proxy_id, event_id, reason FROM audit_dead_letters ORDER BY received_at DESC, id DESC LIMIT $1",
        )
        .bind(limit.clamp(1, MAX_PAGE) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// Validates one event for the stream of `proxy_id`; returns its timestamp
/// and id.
fn check_ingest(proxy_id: &str, ev: &AuditEvent) -> Result<(OffsetDateTime, uuid::Uuid), String> {
    validate_event(ev)?;
    if ev.proxy_id != proxy_id {
        return Err(format!(
            "proxy_id: '{}' does not match the stream's proxy '{proxy_id}'",
            ev.proxy_id
        ));
    }
    let id =
        uuid::Uuid::parse_str(&ev.event_id).map_err(|_| "event_id: must be a UUID".to_string())?;
    // The canonical text is what the hash covers once stored.
    if id.hyphenated().to_string() != ev.event_id {
        return Err("event_id: must be a lowercase hyphenated UUID".into());
    }
    // The id carries the event's time (UUIDv7); it must agree with
    // `timestamp_us`, which makes (event_id, ts) as unique as event_id.
    let (secs, nanos) = id
        .get_timestamp()
        .ok_or("event_id: must be a UUIDv7")?
        .to_unix();
    let id_ms = secs as i64 * 1000 + (nanos / 1_000_000) as i64;
    if id_ms != ev.timestamp_us.div_euclid(1000) {
        return Err("timestamp_us: does not match the time in event_id".into());
    }
    Ok((from_us(ev.timestamp_us), id))
}

/// A batch checked and laid out for the insert, before any database work:
/// validation, each event's own hash (SHA-256 over its encoding) and the
/// column arrays. This is the CPU part of ingest; the ingest stream does it
/// for the next batch while the previous one is in the database.
pub struct PreparedBatch {
    proxy_id: String,
    /// The valid events as column arrays; `chain_ok` is filled in by
    /// ingest, under the chain lock.
    cols: Columns,
    /// Whether each valid event's hash matches its content.
    self_ok: Vec<bool>,
    /// Invalid events with the reason, for the dead-letter table.
    dead: Vec<(AuditEvent, String)>,
    /// The days the valid events fall on: the partitions they need.
    days: HashSet<Date>,
}

impl PreparedBatch {
    /// Checks the events received on the stream of `proxy_id`.
    pub fn new(proxy_id: &str, events: Vec<AuditEvent>) -> PreparedBatch {
        let mut cols = Columns::with_capacity(events.len());
        let mut self_ok = Vec::with_capacity(events.len());
        let mut dead = Vec::new();
        let mut days = HashSet::new();
        for ev in events {
            match check_ingest(proxy_id, &ev) {
                Ok((ts, id)) => {
                    self_ok.push(hash_ok(&ev));
                    days.insert(ts.date());
                    cols.push(ev, id, ts);
                }
                Err(reason) => dead.push((ev, reason)),
            }
        }
        PreparedBatch {
            proxy_id: proxy_id.to_string(),
            cols,
            self_ok,
            dead,
            days,
        }
    }
}

/// What the chain check needs of one event.
struct Link<'a> {
    sequence: u64,
    prev_hash: &'a [u8],
    hash: &'a [u8],
    /// Whether the event's hash matches its content.
    self_ok: bool,
}

/// The chain of one (proxy, epoch), locked for the batch's transaction.
struct ChainState {
    proxy_id: String,
    epoch: u64,
    max_seq: u64,
    /// Hash of the event at `max_seq`.
    last_hash: Vec<u8>,
    breaks: u64,
    gaps: Option<Vec<(u64, u64)>>,
    gaps_changed: bool,
    /// Hashes of events seen in this batch, to link fill-ins.
    batch_hashes: HashMap<u64, Vec<u8>>,
}

impl ChainState {
    async fn lock(
        tx: &mut Transaction<'static, Postgres>,
        proxy_id: &str,
        epoch: u64,
    ) -> Result<ChainState> {
        sqlx::query(
            "INSERT INTO audit_chains (proxy_id, epoch) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(proxy_id)
        .bind(epoch as i64)
        .execute(&mut **tx)
        .await?;
        let (max_seq, last_hash, breaks): (i64, Vec<u8>, i64) = sqlx::query_as(
            "SELECT max_seq, last_hash, breaks FROM audit_chains WHERE proxy_id = $1 AND epoch = $2 FOR UPDATE",
        )
        .bind(proxy_id)
        .bind(epoch as i64)
        .fetch_one(&mut **tx)
        .await?;
        Ok(ChainState {
            proxy_id: proxy_id.to_string(),
            epoch,
            max_seq: max_seq as u64,
            last_hash,
            breaks: breaks as u64,
            gaps: None,
            gaps_changed: false,
            batch_hashes: HashMap::new(),
        })
    }

    async fn gaps(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<&mut Vec<(u64, u64)>> {
        if self.gaps.is_none() {
            let rows: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT from_seq, to_seq FROM audit_gaps WHERE proxy_id = $1 AND epoch = $2 ORDER BY from_seq",
            )
            .bind(&self.proxy_id)
            .bind(self.epoch as i64)
            .fetch_all(&mut **tx)
            .await?;
            self.gaps = Some(
                rows.into_iter()
                    .map(|(a, b)| (a as u64, b as u64))
                    .collect(),
            );
        }
        Ok(self.gaps.get_or_insert_with(Vec::new))
    }

    /// Takes `ev` into the chain. Returns (chain_ok, taken for a replay).
    async fn advance(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
        ev: Link<'_>,
    ) -> Result<(bool, bool)> {
        let s = ev.sequence;
        let self_ok = ev.self_ok;
        if s > self.max_seq {
            let link_ok = if s == self.max_seq + 1 {
                ev.prev_hash == self.last_hash
            } else {
                // The predecessor has not arrived: the link is checked by
                // `verify` once it has.
                let (from, to) = (self.max_seq + 1, s - 1);
                self.gaps(tx).await?.push((from, to));
                self.gaps_changed = true;
                metrics::counter!("sentinel_audit_gaps_detected_total").increment(1);
                true
            };
            self.max_seq = s;
            self.last_hash = ev.hash.to_vec();
            self.batch_hashes.insert(s, ev.hash.to_vec());
            let ok = self_ok && link_ok;
            if !ok {
                self.breaks += 1;
            }
            return Ok((ok, false));
        }
        // Below max: either it fills a gap or it was stored already.
        let gaps = self.gaps(tx).await?;
        let Some(pos) = gaps.iter().position(|&(a, b)| a <= s && s <= b) else {
            return Ok((false, true));
        };
        let (a, b) = gaps.remove(pos);
        if a < s {
            gaps.push((a, s - 1));
        }
        if s < b {
            gaps.push((s + 1, b));
        }
        gaps.sort_unstable();
        self.gaps_changed = true;
        let prev = if s == 1 {
            Some(Vec::new())
        } else if let Some(h) = self.batch_hashes.get(&(s - 1)) {
            Some(h.clone())
        } else {
            stored_hash(tx, &self.proxy_id, self.epoch, s - 1).await?
        };
        let mut ok = self_ok && prev.is_none_or(|p| p == ev.prev_hash);
        // The successor, if stored, must link to this event.
        if let Some(succ_prev) = stored_prev_hash(tx, &self.proxy_id, self.epoch, s + 1).await?
            && succ_prev != ev.hash
        {
            ok = false;
        }
        self.batch_hashes.insert(s, ev.hash.to_vec());
        if !ok {
            self.breaks += 1;
        }
        Ok((ok, false))
    }

    async fn save(&self, tx: &mut Transaction<'static, Postgres>) -> Result<()> {
        if self.gaps_changed
            && let Some(gaps) = &self.gaps
        {
            sqlx::query("DELETE FROM audit_gaps WHERE proxy_id = $1 AND epoch = $2")
                .bind(&self.proxy_id)
                .bind(self.epoch as i64)
                .execute(&mut **tx)
                .await?;
            for &(a, b) in gaps {
                sqlx::query("INSERT INTO audit_gaps (proxy_id, epoch, from_seq, to_seq) VALUES ($1, $2, $3, $4)")
                    .bind(&self.proxy_id)
                    .bind(self.epoch as i64)
                    .bind(a as i64)
                    .bind(b as i64)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        // Contiguous up to the first gap, or to the end when there is none.
        sqlx::query(
            "UPDATE audit_chains SET max_seq = $3, last_hash = $4, breaks = $5, updated_at = now(), \
             contiguous_seq = COALESCE((SELECT min(g.from_seq) - 1 FROM audit_gaps g \
                                        WHERE g.proxy_id = $1 AND g.epoch = $2), $3) \
             WHERE proxy_id = $1 AND epoch = $2",
        )
        .bind(&self.proxy_id)
        .bind(self.epoch as i64)
        .bind(self.max_seq as i64)
        .bind(&self.last_hash)
        .bind(self.breaks as i64)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn stored_hash(
    tx: &mut Transaction<'static, Postgres>,
    proxy: &str,
    epoch: u64,
    seq: u64,
) -> Result<Option<Vec<u8>>> {
    let row: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT hash FROM audit_events WHERE proxy_id = $1 AND epoch = $2 AND sequence = $3 LIMIT 1")
            .bind(proxy)
            .bind(epoch as i64)
            .bind(seq as i64)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|(h,)| h))
}

async fn stored_prev_hash(
    tx: &mut Transaction<'static, Postgres>,
    proxy: &str,
    epoch: u64,
    seq: u64,
) -> Result<Option<Vec<u8>>> {
    let row: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT prev_hash FROM audit_events WHERE proxy_id = $1 AND epoch = $2 AND sequence = $3 LIMIT 1")
            .bind(proxy)
            .bind(epoch as i64)
            .bind(seq as i64)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|(h,)| h))
}

/// One multi-row INSERT of column arrays; returns the ids actually inserted.
async fn insert_events(
    tx: &mut Transaction<'static, Postgres>,
    c: &Columns,
) -> Result<HashSet<uuid::Uuid>> {
    if c.event_id.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(include_str!("sql/insert_events.sql"))
        .bind(&c.event_id)
        .bind(&c.ts)
        .bind(&c.request_id)
        .bind(&c.proxy_id)
        .bind(&c.epoch)
        .bind(&c.sequence)
        .bind(&c.subject)
        .bind(&c.role)
        .bind(&c.api_key_id)
        .bind(&c.auth_method)
        .bind(&c.session_id)
        .bind(&c.mcp_method)
        .bind(&c.tool)
        .bind(&c.backend)
        .bind(&c.arguments)
        .bind(&c.arguments_truncated)
        .bind(&c.response)
        .bind(&c.outcome)
        .bind(&c.http_status)
        .bind(&c.jsonrpc_error_code)
        .bind(&c.jsonrpc_error_message)
        .bind(&c.latency_us)
        .bind(&c.decision)
        .bind(&c.protocol_version)
        .bind(&c.client_name)
        .bind(&c.prev_hash)
        .bind(&c.hash)
        .bind(&c.chain_ok)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Column arrays for the UNNEST insert.
#[derive(Default)]
struct Columns {
    event_id: Vec<uuid::Uuid>,
    ts: Vec<OffsetDateTime>,
    request_id: Vec<String>,
    proxy_id: Vec<String>,
    epoch: Vec<i64>,
    sequence: Vec<i64>,
    subject: Vec<String>,
    role: Vec<String>,
    api_key_id: Vec<String>,
    auth_method: Vec<String>,
    session_id: Vec<String>,
    mcp_method: Vec<String>,
    tool: Vec<String>,
    backend: Vec<String>,
    arguments: Vec<String>,
    arguments_truncated: Vec<bool>,
    response: Vec<String>,
    outcome: Vec<String>,
    http_status: Vec<i32>,
    jsonrpc_error_code: Vec<i32>,
    jsonrpc_error_message: Vec<String>,
    latency_us: Vec<i64>,
    decision: Vec<String>,
    protocol_version: Vec<String>,
    client_name: Vec<String>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
    chain_ok: Vec<bool>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        let mut c = Columns::default();
        c.event_id.reserve(n);
        c.ts.reserve(n);
        c
    }

    /// Takes `ev`, whose parsed id is `id` and time `ts`, by value: its
    /// strings move into the arrays without a copy. `chain_ok` is set later.
    fn push(&mut self, ev: AuditEvent, id: uuid::Uuid, ts: OffsetDateTime) {
        let AuditEvent {
            // Parsed already: `id`.
            event_id: _,
            request_id,
            timestamp_us: _,
            proxy_id,
            epoch,
            sequence,
            subject,
            role,
            api_key_id,
            auth_method,
            session_id,
            mcp_method,
            tool,
            backend,
            arguments,
            arguments_truncated,
            response,
            outcome,
            http_status,
            jsonrpc_error_code,
            jsonrpc_error_message,
            latency_us,
            decision,
            protocol_version,
            client_name,
            prev_hash,
            hash,
        } = ev;
        self.event_id.push(id);
        self.ts.push(ts);
        self.request_id.push(request_id);
        self.proxy_id.push(proxy_id);
        self.epoch.push(epoch as i64);
        self.sequence.push(sequence as i64);
        self.subject.push(subject);
        self.role.push(role);
        self.api_key_id.push(api_key_id);
        self.auth_method.push(auth_method);
        self.session_id.push(session_id);
        self.mcp_method.push(mcp_method);
        self.tool.push(tool);
        self.backend.push(backend);
        self.arguments.push(arguments);
        self.arguments_truncated.push(arguments_truncated);
        self.response.push(response);
        self.outcome.push(
            outcome_str(Outcome::try_from(outcome).unwrap_or(Outcome::Unspecified)).to_string(),
        );
        self.http_status.push(http_status as i32);
        self.jsonrpc_error_code.push(jsonrpc_error_code);
        self.jsonrpc_error_message.push(jsonrpc_error_message);
        self.latency_us.push(latency_us as i64);
        self.decision.push(decision);
        self.protocol_version.push(protocol_version);
        self.client_name.push(client_name);
        self.prev_hash.push(prev_hash);
        self.hash.push(hash);
    }
}

/// A stored row, in `EVENT_COLUMNS` order.
#[derive(sqlx::FromRow)]
struct AuditRow {
    event_id: uuid::Uuid,
    ts: OffsetDateTime,
    received_at: OffsetDateTime,
    request_id: String,
    proxy_id: String,
    epoch: i64,
    sequence: i64,
    subject: String,
    role: String,
    api_key_id: String,
    auth_method: String,
    session_id: String,
    mcp_method: String,
    tool: String,
    backend: String,
    arguments: String,
    arguments_truncated: bool,
    response: String,
    outcome: String,
    http_status: i32,
    jsonrpc_error_code: i32,
    jsonrpc_error_message: String,
    latency_us: i64,
    decision: String,
    protocol_version: String,
    client_name: String,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
    chain_ok: bool,
}

impl AuditRow {
    fn into_stored(self) -> StoredEvent {
        let AuditRow {
            event_id,
            ts,
            received_at,
            request_id,
            proxy_id,
            epoch,
            sequence,
            subject,
            role,
            api_key_id,
            auth_method,
            session_id,
            mcp_method,
            tool,
            backend,
            arguments,
            arguments_truncated,
            response,
            outcome,
            http_status,
            jsonrpc_error_code,
            jsonrpc_error_message,
            latency_us,
            decision,
            protocol_version,
            client_name,
            prev_hash,
            hash,
            chain_ok,
        } = self;
        StoredEvent {
            event: AuditEvent {
                event_id: event_id.hyphenated().to_string(),
                request_id,
                timestamp_us: to_us(ts),
                proxy_id,
                epoch: epoch as u64,
                sequence: sequence as u64,
                subject,
                role,
                api_key_id,
                auth_method,
                session_id,
                mcp_method,
                tool,
                backend,
                arguments,
                arguments_truncated,
                response,
                outcome: parse_outcome(&outcome).unwrap_or(Outcome::Unspecified) as i32,
                http_status: http_status as u32,
                jsonrpc_error_code,
                jsonrpc_error_message,
                latency_us: latency_us as u64,
                decision,
                protocol_version,
                client_name,
                prev_hash,
                hash,
            },
            received_at_us: to_us(received_at),
            chain_ok,
            borders_gaps: Vec::new(),
        }
    }
}

fn partition_name(day: Date) -> String {
    format!(
        "audit_events_p{:04}{:02}{:02}",
        day.year(),
        day.month() as u8,
        day.day()
    )
}

fn partition_day(name: &str) -> Option<Date> {
    let digits = name.strip_prefix("audit_events_p")?;
    if digits.len() != 8 {
        return None;
    }
    let y: i32 = digits[0..4].parse().ok()?;
    let m: u8 = digits[4..6].parse().ok()?;
    let d: u8 = digits[6..8].parse().ok()?;
    Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()
}

fn encode_cursor(ts_us: i64, event_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{ts_us}|{event_id}"))
}

fn decode_cursor(c: &str) -> Result<(i64, uuid::Uuid)> {
    let bad = || Error::invalid("cursor", "is not a cursor returned by this API");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (ts, id) = text.split_once('|').ok_or_else(bad)?;
    Ok((
        ts.parse().map_err(|_| bad())?,
        uuid::Uuid::parse_str(id).map_err(|_| bad())?,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::TestDb;
    use sentinel_shared::audit::seal;

    /// A chain of `n` sealed events from `proxy` in `epoch`.
    pub(crate) fn chain(proxy: &str, epoch: u64, n: u64) -> Vec<AuditEvent> {
        let mut prev = Vec::new();
        (1..=n)
            .map(|seq| {
                let id = uuid::Uuid::now_v7();
                let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
                let mut ev = AuditEvent {
                    event_id: id.to_string(),
                    request_id: format!("req-{seq}"),
                    timestamp_us: secs as i64 * 1_000_000 + (nanos / 1000) as i64,
                    proxy_id: proxy.into(),
                    epoch,
                    sequence: seq,
                    subject: "alice".into(),
                    role: "ops".into(),
                    api_key_id: "key1".into(),
                    auth_method: "api_key".into(),
                    mcp_method: "tools/call".into(),
                    tool: if seq % 2 == 0 {
                        "echo".into()
                    } else {
                        "get-sum".into()
                    },
                    backend: "everything".into(),
                    arguments: r#"{"message":"hi"}"#.into(),
                    outcome: if seq % 3 == 0 {
                        Outcome::Forbidden
                    } else {
                        Outcome::Ok
                    } as i32,
                    http_status: 200,
                    decision: "{}".into(),
                    ..Default::default()
                };
                seal(&mut ev, &prev);
                prev = ev.hash.clone();
                ev
            })
            .collect()
    }

    #[tokio::test]
    async fn replayed_batches_add_nothing() {
        let db = TestDb::new().await;
        let events = chain("p1", 1, 50);
        let r = db.store.ingest_batch("p1", events.clone()).await.unwrap();
        assert_eq!(
            r,
            IngestResult {
                inserted: 50,
                duplicates: 0,
                dead_lettered: 0
            }
        );
        let again = db.store.ingest_batch("p1", events).await.unwrap();
        assert_eq!(
            again,
            IngestResult {
                inserted: 0,
                duplicates: 50,
                dead_lettered: 0
            }
        );
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 50);
        let report = db.store.verify_chains(None).await.unwrap();
        assert_eq!(
            report,
            VerifyReport {
                chains: 1,
                events: 50,
                problems: vec![]
            }
        );
    }

    #[tokio::test]
    async fn a_malformed_event_is_dead_lettered_and_the_rest_commit() {
        let db = TestDb::new().await;
        let mut events = chain("p1", 1, 5);
        events[2].event_id = "not-a-uuid".into();
        let mut foreign = chain("p2", 1, 1);
        events.append(&mut foreign);
        let r = db.store.ingest_batch("p1", events).await.unwrap();
        assert_eq!(
            r,
            IngestResult {
                inserted: 4,
                duplicates: 0,
                dead_lettered: 2
            }
        );
        let dl = db.store.dead_letters(10).await.unwrap();
        let reasons: Vec<&str> = dl.iter().map(|d| d.2.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.starts_with("event_id")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.starts_with("proxy_id")),
            "{reasons:?}"
        );
        // The malformed event left a gap in p1's chain, shown as such.
        let gaps = db.store.audit_gaps(Some("p1")).await.unwrap();
        assert_eq!((gaps[0].from_seq, gaps[0].to_seq), (3, 3));
    }

    #[tokio::test]
    async fn gaps_are_detected_and_clear_when_filled() {
        let db = TestDb::new().await;
        let events = chain("p1", 7, 10);
        let (first, rest) = events.split_at(3);
        db.store.ingest_batch("p1", first.to_vec()).await.unwrap();
        // 4..=6 go missing for now.
        db.store
            .ingest_batch("p1", rest[3..].to_vec())
            .await
            .unwrap();
        let gaps = db.store.audit_gaps(None).await.unwrap();
        assert_eq!(gaps.len(), 1);
        assert_eq!((gaps[0].epoch, gaps[0].from_seq, gaps[0].to_seq), (7, 4, 6));
        let (contiguous,): (i64,) = sqlx::query_as("SELECT contiguous_seq FROM audit_chains")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(contiguous, 3);
        // 5 arrives: the gap splits.
        db.store
            .ingest_batch("p1", vec![rest[1].clone()])
            .await
            .unwrap();
        let gaps: Vec<(u64, u64)> = db
            .store
            .audit_gaps(None)
            .await
            .unwrap()
            .iter()
            .map(|g| (g.from_seq, g.to_seq))
            .collect();
        assert_eq!(gaps, vec![(4, 4), (6, 6)]);
        // The rest arrives: no gap, chain contiguous and intact.
        db.store
            .ingest_batch("p1", vec![rest[0].clone(), rest[2].clone()])
            .await
            .unwrap();
        assert!(db.store.audit_gaps(None).await.unwrap().is_empty());
        let (contiguous, breaks): (i64, i64) =
            sqlx::query_as("SELECT contiguous_seq, breaks FROM audit_chains")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((contiguous, breaks), (10, 0));
        let (bad,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events WHERE NOT chain_ok")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(bad, 0);
        assert!(
            db.store
                .verify_chains(None)
                .await
                .unwrap()
                .problems
                .is_empty()
        );
    }

    /// `events` re-timed with `ts_of(sequence)` and re-sealed into a chain.
    fn retimed(mut events: Vec<AuditEvent>, ts_of: impl Fn(u64) -> i64) -> Vec<AuditEvent> {
        let mut prev = Vec::new();
        for ev in &mut events {
            ev.timestamp_us = ts_of(ev.sequence);
            ev.event_id = audit::event_id_at(ev.timestamp_us);
            seal(ev, &prev);
            prev = ev.hash.clone();
        }
        events
    }

    async fn chain_row(db: &TestDb, epoch: i64) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT contiguous_seq, max_seq, breaks FROM audit_chains WHERE proxy_id = 'p1' AND epoch = $1",
        )
        .bind(epoch)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    }

    #[test]
    fn a_prepared_batch_checks_events_without_the_database() {
        let mut events = chain("p1", 1, 4);
        events[1].tool = "tampered".into();
        events[2].proxy_id = "p2".into();
        let b = PreparedBatch::new("p1", events);
        assert_eq!(b.cols.sequence, vec![1, 2, 4]);
        assert_eq!(b.self_ok, vec![true, false, true]);
        assert_eq!(b.dead.len(), 1);
        assert!(b.dead[0].1.starts_with("proxy_id:"), "{}", b.dead[0].1);
        assert_eq!(b.days.len(), 1);
    }

    #[tokio::test]
    async fn a_batch_spanning_two_days_lands_in_both_partitions() {
        let db = TestDb::new().await;
        // Three events just before midnight two days ago, three after it.
        let midnight = OffsetDateTime::now_utc()
            .date()
            .previous_day()
            .unwrap()
            .midnight()
            .assume_utc();
        let midnight_us = to_us(midnight);
        let events = retimed(chain("p1", 1, 6), |seq| {
            midnight_us + (seq as i64 - 4) * 1_000_000
        });
        let r = db.store.ingest_batch("p1", events).await.unwrap();
        assert_eq!((r.inserted, r.duplicates, r.dead_lettered), (6, 0, 0));
        let day_before = midnight.date().previous_day().unwrap();
        let per_part: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tableoid::regclass::text, count(*) FROM audit_events GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            per_part,
            vec![
                (partition_name(day_before), 3),
                (partition_name(midnight.date()), 3)
            ]
        );
        assert_eq!(chain_row(&db, 1).await, (6, 6, 0));
        assert!(
            db.store
                .verify_chains(None)
                .await
                .unwrap()
                .problems
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_replay_mixed_with_new_events_inserts_only_the_new_ones() {
        let db = TestDb::new().await;
        let events = chain("p1", 1, 8);
        db.store
            .ingest_batch("p1", events[..5].to_vec())
            .await
            .unwrap();
        // 3..=5 again, with 6..=8 new, out of order.
        let mut mixed = events[2..].to_vec();
        mixed.reverse();
        let r = db.store.ingest_batch("p1", mixed).await.unwrap();
        assert_eq!((r.inserted, r.duplicates, r.dead_lettered), (3, 3, 0));
        assert_eq!(chain_row(&db, 1).await, (8, 8, 0));
        let (rows, bad): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE NOT chain_ok) FROM audit_events",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!((rows, bad), (8, 0));
    }

    #[tokio::test]
    async fn a_gap_filled_by_a_later_batch_with_replays_clears() {
        let db = TestDb::new().await;
        let events = chain("p1", 2, 10);
        db.store
            .ingest_batch("p1", events[..3].to_vec())
            .await
            .unwrap();
        db.store
            .ingest_batch("p1", events[6..].to_vec())
            .await
            .unwrap();
        assert_eq!(chain_row(&db, 2).await, (3, 10, 0));
        // 2..=3 replayed with the missing 4..=6: the gap clears, the
        // replays add nothing, nothing is taken for a break.
        let r = db
            .store
            .ingest_batch("p1", events[1..6].to_vec())
            .await
            .unwrap();
        assert_eq!((r.inserted, r.duplicates), (3, 2));
        assert!(db.store.audit_gaps(None).await.unwrap().is_empty());
        assert_eq!(chain_row(&db, 2).await, (10, 10, 0));
        let (bad,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events WHERE NOT chain_ok")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(bad, 0);
        assert!(
            db.store
                .verify_chains(None)
                .await
                .unwrap()
                .problems
                .is_empty()
        );
    }

    #[tokio::test]
    async fn near_gap_finds_the_events_around_a_hole_until_it_is_filled() {
        let db = TestDb::new().await;
        let events = chain("p1", 3, 6);
        let near = AuditFilter {
            near_gap: true,
            ..Default::default()
        };
        let seqs = |page: &[StoredEvent]| -> Vec<(u64, Vec<(u64, u64)>)> {
            page.iter()
                .map(|e| (e.event.sequence, e.borders_gaps.clone()))
                .collect()
        };
        // 1, 2 and 5 arrive: 3..=4 are missing, between 2 and 5.
        db.store
            .ingest_batch("p1", vec![events[0].clone(), events[1].clone()])
            .await
            .unwrap();
        db.store
            .ingest_batch("p1", vec![events[4].clone()])
            .await
            .unwrap();
        // Another chain without a gap contributes nothing.
        db.store
            .ingest_batch("p2", chain("p2", 1, 3))
            .await
            .unwrap();
        let (page, next) = db.store.query_audit(&near).await.unwrap();
        assert_eq!(seqs(&page), vec![(5, vec![(3, 4)]), (2, vec![(3, 4)])]);
        assert_eq!(next, None);
        // Every query marks the events that border a gap, filter or not.
        let (all, _) = db
            .store
            .query_audit(&AuditFilter {
                proxy_id: Some("p1".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            seqs(&all),
            vec![(5, vec![(3, 4)]), (2, vec![(3, 4)]), (1, vec![])]
        );
        // It combines with the other filters and with cursor paging.
        let (one, next) = db
            .store
            .query_audit(&AuditFilter {
                limit: Some(1),
                ..near.clone()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&one), vec![(5, vec![(3, 4)])]);
        let (two, last) = db
            .store
            .query_audit(&AuditFilter {
                limit: Some(1),
                cursor: next,
                ..near.clone()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&two), vec![(2, vec![(3, 4)])]);
        assert_eq!(last, None);
        let (echo, _) = db
            .store
            .query_audit(&AuditFilter {
                tool: Some("echo".into()),
                ..near.clone()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&echo), vec![(2, vec![(3, 4)])]);
        let (other, _) = db
            .store
            .query_audit(&AuditFilter {
                proxy_id: Some("p2".into()),
                ..near.clone()
            })
            .await
            .unwrap();
        assert!(other.is_empty());
        // 3 arrives: the hole shrinks to 4, now between 3 and 5; 6 arrives
        // after 5 and borders nothing.
        db.store
            .ingest_batch("p1", vec![events[2].clone(), events[5].clone()])
            .await
            .unwrap();
        let (page, _) = db.store.query_audit(&near).await.unwrap();
        assert_eq!(seqs(&page), vec![(5, vec![(4, 4)]), (3, vec![(4, 4)])]);
        // 4 arrives: no gap left, nothing near one.
        db.store
            .ingest_batch("p1", vec![events[3].clone()])
            .await
            .unwrap();
        assert!(db.store.audit_gaps(None).await.unwrap().is_empty());
        let (page, next) = db.store.query_audit(&near).await.unwrap();
        assert!(page.is_empty(), "{:?}", seqs(&page));
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn a_gap_from_the_first_sequence_has_only_an_event_after_it() {
        let db = TestDb::new().await;
        let events = chain("p1", 1, 4);
        // 1 and 2 never arrive; 3 and 4 do. An event can also border two
        // gaps: with 5 and 7 missing, 6 sits between them.
        let mut more = chain("p9", 1, 8);
        more.remove(6);
        more.remove(4);
        db.store
            .ingest_batch("p1", events[2..].to_vec())
            .await
            .unwrap();
        db.store.ingest_batch("p9", more).await.unwrap();
        let (page, _) = db
            .store
            .query_audit(&AuditFilter {
                near_gap: true,
                ..Default::default()
            })
            .await
            .unwrap();
        type Row = (String, u64, Vec<(u64, u64)>);
        let mut got: Vec<Row> = page
            .into_iter()
            .map(|e| (e.event.proxy_id, e.event.sequence, e.borders_gaps))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("p1".into(), 3, vec![(1, 2)]),
                ("p9".into(), 4, vec![(5, 5)]),
                ("p9".into(), 6, vec![(5, 5), (7, 7)]),
                ("p9".into(), 8, vec![(7, 7)]),
            ]
        );
    }

    #[tokio::test]
    async fn broken_links_are_flagged_on_ingest() {
        let db = TestDb::new().await;
        let mut events = chain("p1", 1, 4);
        // Event 3 claims a wrong predecessor (and is re-sealed so its own
        // hash is right): only the link is broken.
        events[2].prev_hash = vec![7; 32];
        events[2].hash.clear();
        events[2].hash = sentinel_shared::audit::event_hash(&events[2]).to_vec();
        db.store.ingest_batch("p1", events).await.unwrap();
        let f = AuditFilter {
            chain_broken_only: true,
            ..Default::default()
        };
        let (broken, _) = db.store.query_audit(&f).await.unwrap();
        // 3 does not link to 2, and 4 does not link to the re-sealed 3.
        let seqs: HashSet<u64> = broken.iter().map(|e| e.event.sequence).collect();
        assert_eq!(seqs, HashSet::from([3, 4]));
        let (breaks,): (i64,) = sqlx::query_as("SELECT breaks FROM audit_chains")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(breaks, 2);
    }

    #[tokio::test]
    async fn audit_rows_are_immutable_and_verify_reports_tampering() {
        let db = TestDb::new().await;
        db.store
            .ingest_batch("p1", chain("p1", 1, 5))
            .await
            .unwrap();
        for sql in [
            "UPDATE audit_events SET tool = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ] {
            let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
            assert!(err.to_string().contains("immutable"), "{sql}: {err}");
        }
        // Someone with superuser rights bypasses the trigger and edits a row.
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE audit_events SET arguments = '{\"message\":\"bye\"}' WHERE sequence = 3",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let report = db.store.verify_chains(None).await.unwrap();
        assert_eq!(report.problems.len(), 1, "{report:?}");
        assert!(report.problems[0].contains("sequence 3"), "{report:?}");
    }

    #[tokio::test]
    async fn query_filters_and_paginates_newest_first() {
        let db = TestDb::new().await;
        db.store
            .ingest_batch("p1", chain("p1", 1, 25))
            .await
            .unwrap();
        db.store
            .ingest_batch("p2", chain("p2", 1, 5))
            .await
            .unwrap();
        let all = AuditFilter {
            limit: Some(10),
            ..Default::default()
        };
        let (page1, c1) = db.store.query_audit(&all).await.unwrap();
        assert_eq!(page1.len(), 10);
        assert!(
            page1
                .windows(2)
                .all(|w| w[0].event.timestamp_us >= w[1].event.timestamp_us)
        );
        let mut seen: HashSet<String> = page1.iter().map(|e| e.event.event_id.clone()).collect();
        let mut cursor = c1;
        while let Some(c) = cursor {
            let (page, next) = db
                .store
                .query_audit(&AuditFilter {
                    cursor: Some(c),
                    ..all.clone()
                })
                .await
                .unwrap();
            for e in page {
                assert!(seen.insert(e.event.event_id));
            }
            cursor = next;
        }
        assert_eq!(seen.len(), 30);
        let by_proxy = AuditFilter {
            proxy_id: Some("p2".into()),
            ..Default::default()
        };
        assert_eq!(db.store.query_audit(&by_proxy).await.unwrap().0.len(), 5);
        let by_tool = AuditFilter {
            tool: Some("echo".into()),
            proxy_id: Some("p1".into()),
            ..Default::default()
        };
        assert_eq!(db.store.query_audit(&by_tool).await.unwrap().0.len(), 12);
        let forbidden = AuditFilter {
            outcome: Some("forbidden".into()),
            ..Default::default()
        };
        assert_eq!(
            db.store.query_audit(&forbidden).await.unwrap().0.len(),
            8 + 1
        );
        let by_req = AuditFilter {
            request_id: Some("req-3".into()),
            ..Default::default()
        };
        assert_eq!(db.store.query_audit(&by_req).await.unwrap().0.len(), 2);
        for f in [
            AuditFilter {
                subject: Some("alice".into()),
                ..Default::default()
            },
            AuditFilter {
                api_key_id: Some("key1".into()),
                ..Default::default()
            },
            AuditFilter {
                role: Some("ops".into()),
                ..Default::default()
            },
            AuditFilter {
                backend: Some("everything".into()),
                ..Default::default()
            },
            AuditFilter {
                session_id: Some(String::new()),
                ..Default::default()
            },
        ] {
            assert_eq!(
                db.store
                    .query_audit(&AuditFilter {
                        limit: Some(1000),
                        ..f
                    })
                    .await
                    .unwrap()
                    .0
                    .len(),
                30
            );
        }
        let newest = page1[0].event.timestamp_us;
        let window = AuditFilter {
            from_us: Some(newest),
            to_us: Some(newest + 1),
            ..Default::default()
        };
        assert!(!db.store.query_audit(&window).await.unwrap().0.is_empty());
        // Stored events read back exactly as sent: their hashes verify.
        assert!(page1.iter().all(|e| hash_ok(&e.event) && e.chain_ok));
    }

    #[tokio::test]
    async fn the_tail_pages_through_one_batch_without_skipping() {
        let db = TestDb::new().await;
        db.store
            .ingest_batch("p1", chain("p1", 1, 25))
            .await
            .unwrap();
        let mut pos = (0, uuid::Uuid::nil());
        let mut seen = HashSet::new();
        loop {
            let page = db.store.audit_tail(pos, 10).await.unwrap();
            let Some(last) = page.last() else { break };
            pos = (
                last.received_at_us,
                uuid::Uuid::parse_str(&last.event.event_id).unwrap(),
            );
            for e in page {
                assert!(seen.insert(e.event.event_id));
            }
        }
        assert_eq!(seen.len(), 25);
    }

    #[tokio::test]
    async fn the_tail_waits_for_transactions_that_started_earlier() {
        let db = TestDb::new().await;
        let start = db.store.audit_tail_start().await.unwrap();
        // A transaction open from before the ingest could still commit
        // events stamped earlier than the ingest's: the tail holds back.
        let mut open = db.pool.begin().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *open).await.unwrap();
        db.store
            .ingest_batch("p1", chain("p1", 1, 3))
            .await
            .unwrap();
        assert!(db.store.audit_tail(start, 10).await.unwrap().is_empty());
        open.rollback().await.unwrap();
        assert_eq!(db.store.audit_tail(start, 10).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn bad_queries_name_the_field() {
        let db = TestDb::new().await;
        for (f, field) in [
            (
                AuditFilter {
                    limit: Some(0),
                    ..Default::default()
                },
                "limit",
            ),
            (
                AuditFilter {
                    limit: Some(5000),
                    ..Default::default()
                },
                "limit",
            ),
            (
                AuditFilter {
                    outcome: Some("meh".into()),
                    ..Default::default()
                },
                "outcome",
            ),
            (
                AuditFilter {
                    cursor: Some("!!".into()),
                    ..Default::default()
                },
                "cursor",
            ),
            (
                AuditFilter {
                    from_us: Some(5),
                    to_us: Some(5),
                    ..Default::default()
                },
                "from",
            ),
        ] {
            let err = db.store.query_audit(&f).await.unwrap_err();
            assert_eq!(err.fields()[0].field, field);
        }
    }

    #[tokio::test]
    async fn retention_drops_whole_old_partitions_only() {
        let db = TestDb::new().await;
        let old_day = OffsetDateTime::now_utc().date() - time::Duration::days(40);
        db.store
            .ensure_partitions(HashSet::from([old_day]))
            .await
            .unwrap();
        db.store.ensure_upcoming_partitions(1).await.unwrap();
        db.store
            .ingest_batch("p1", chain("p1", 1, 3))
            .await
            .unwrap();
        assert!(
            db.store
                .drop_expired_partitions(0)
                .await
                .unwrap()
                .is_empty()
        );
        let dropped = db.store.drop_expired_partitions(30).await.unwrap();
        assert_eq!(dropped, vec![partition_name(old_day)]);
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn partition_names_round_trip() {
        let d = Date::from_calendar_date(2026, time::Month::November, 2).unwrap();
        assert_eq!(partition_name(d), "audit_events_p20261102");
        assert_eq!(partition_day(&partition_name(d)), Some(d));
        assert_eq!(partition_day("audit_events_pxx"), None);
    }
}
