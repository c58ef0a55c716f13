//! How `sentinelctl` shows things: aligned tables, JSON, times, durations.
//!
//! Text shown in a terminal may come from agents and upstreams (audit
//! subjects, tool names, arguments): [`clean`] escapes control characters
//! so a planted escape sequence cannot rewrite the operator's screen.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Result;

/// Writes `text` to stdout at once and flushes it.
pub fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())?;
    o.flush()?;
    Ok(())
}

/// Writes one line to stderr. Errors writing stderr are ignored: there is
/// nowhere left to report them.
pub fn note(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{text}");
}

/// Prints a value as indented JSON.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)
        .map_err(|e| super::Error::Message(format!("cannot render JSON: {e}")))?;
    s.push('\n');
    out(&s)
}

/// Prints a value as one line of JSON (for streams).
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut s = serde_json::to_string(value)
        .map_err(|e| super::Error::Message(format!("cannot render JSON: {e}")))?;
    s.push('\n');
    out(&s)
}

/// Replaces control characters (escape sequences, newlines, tabs) with
/// their escaped form, so a value stays on its line and in its column.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(o, "{}", c.escape_default());
        } else {
            o.push(c);
        }
    }
    o
}

/// Aligned columns: a header row and one row per item. No borders, two
/// spaces between columns, like `kubectl get`.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut s = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i + 1 < n {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    line.push_str(c);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                } else {
                    line.push_str(c);
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    pub fn print(&self) -> Result<()> {
        out(&self.render())
    }
}

/// `key: value` lines, aligned, for one object.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in pairs {
        let line = format!("{k:<w$}  {}", clean(v), w = w + 1);
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// An RFC 3339 time (seconds precision) from unix microseconds.
pub fn time_us(us: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// [`time_us`] with full precision, for JSON.
pub fn time_us_precise(us: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A time that may be absent (0), for tables.
pub fn opt_time_us(us: i64, none: &str) -> String {
    if us == 0 {
        none.to_string()
    } else {
        time_us(us)
    }
}

/// A time that may be absent (0), for JSON.
pub fn json_time_us(us: i64) -> serde_json::Value {
    if us == 0 {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(time_us_precise(us))
    }
}

/// How long ago `us` was, roughly: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(us: i64, now_us: i64) -> String {
    if us == 0 {
        return "never".into();
    }
    let secs = (now_us.saturating_sub(us) / 1_000_000).max(0);
    let (n, unit) = match secs {
        s if s < 120 => (s, "s"),
        s if s < 2 * 3600 => (s / 60, "m"),
        s if s < 2 * 86400 => (s / 3600, "h"),
        s => (s / 86400, "d"),
    };
    format!("{n}{unit} ago")
}

/// Parses an RFC 3339 time into unix microseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339)
        .map_err(|_| format!("'{s}' is not an RFC 3339 time such as 2026-11-23T12:00:00Z"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).map_err(|_| format!("'{s}' is out of range"))
}

/// Parses a duration such as `90s`, `15m`, `12h`, `30d`, `2w` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration such as 90s, 15m, 12h, 30d or 1h30m");
    let text = s.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return Err(bad()),
        };
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("'{s}' is too long"))?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("1h30m", 5400),
            ("30d", 30 * 86400),
            ("2w", 14 * 86400),
            ("0", 0),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_secs(secs), "{s}");
        }
        for s in ["", "10", "m", "1x", "-5s", "99999999999999999999d", "5s3"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn times_round_trip() {
        let us = parse_time("2026-11-23T12:00:00Z").unwrap();
        assert_eq!(time_us(us), "2026-11-23T12:00:00Z");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn tables_align_and_escape() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["a".into(), "x\u{1b}[2J".into()]);
        t.row(vec!["long-id".into(), "y".into()]);
        assert_eq!(
            t.render(),
            "ID       NAME\na        x\\u{1b}[2J\nlong-id  y\n"
        );
    }
}
