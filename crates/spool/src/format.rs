//! The on-disk format of spool segments.
//!
//! A segment file `<index:020>.seg` starts with a 16-byte header (magic
//! `SNTLSPL1`, then the boot epoch as u64 LE) and holds records:
//!
//! ```text
//! len: u32 LE | crc32(payload): u32 LE | payload (len bytes)
//! payload = kind: u8 | sequence: u64 LE | prev: [u8; 32] | AuditEvent (protobuf)
//! ```
//!
//! `prev` is the SHA-256 of the previous record's payload in the same boot
//! epoch (zeros for the first): the records of an epoch form a hash chain,
//! so a record altered, inserted or removed on disk is found at start.
//!
//! A record is valid only if it is whole and its checksum matches; reading
//! stops at the first record that is not, which is how a torn tail (a crash
//! in the middle of a write) is found.

use prost::Message;
use sentinel_shared::proto::AuditEvent;

pub const MAGIC: &[u8; 8] = b"SNTLSPL1";
pub const HEADER_LEN: u64 = 16;
const RECORD_HEAD: usize = 8;
/// Largest record accepted when reading: anything bigger is corruption.
pub const MAX_RECORD: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A call about to be forwarded; its outcome is not known yet.
    Attempt = 1,
    /// The complete event of an earlier attempt (same sequence).
    Outcome = 2,
    /// A complete event of a call that was never forwarded.
    Whole = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Attempt),
            2 => Some(Kind::Outcome),
            3 => Some(Kind::Whole),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub sequence: u64,
    /// Hash of the previous record's payload in this epoch.
    pub prev: [u8; 32],
    /// Hash of this record's payload: the next record's `prev`.
    pub hash: [u8; 32],
    pub event: AuditEvent,
}

/// Bytes of payload before the event.
const PAYLOAD_HEAD: usize = 1 + 8 + 32;

pub fn segment_name(index: u64) -> String {
    format!("{index:020}.seg")
}

pub fn segment_index(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

pub fn header(epoch: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// The epoch in a segment header, if the header is valid.
pub fn parse_header(h: &[u8]) -> Option<u64> {
    if h.len() < HEADER_LEN as usize || &h[..8] != MAGIC {
        return None;
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&h[8..16]);
    Some(u64::from_le_bytes(e))
}

/// Appends the encoding of one record to `buf`; returns the hash of its
/// payload (the next record's `prev`).
pub fn encode(
    kind: Kind,
    sequence: u64,
    prev: &[u8; 32],
    event: &AuditEvent,
    buf: &mut Vec<u8>,
) -> [u8; 32] {
    use sha2::Digest;
    let payload_len = PAYLOAD_HEAD + event.encoded_len();
    buf.reserve(RECORD_HEAD + payload_len);
    let start = buf.len();
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.push(kind as u8);
    buf.extend_from_slice(&sequence.to_le_bytes());
    buf.extend_from_slice(prev);
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = event.encode(buf);
    let payload = &buf[start + RECORD_HEAD..];
    let crc = crc32fast::hash(payload);
    let hash: [u8; 32] = sha2::Sha256::digest(payload).into();
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    hash
}

/// What reading a run of records found.
#[derive(Debug)]
pub enum Next {
    Record(Box<Record>, u64),
    /// Clean end of data.
    End,
    /// Bytes that are not a valid record start here.
    Corrupt(String),
}

/// A record whose checksum holds, its event still undecoded: the shipper
/// decodes only the events it ships (an attempt whose outcome follows is
/// never needed).
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    pub kind: Kind,
    pub sequence: u64,
    /// The `AuditEvent`'s protobuf bytes.
    pub event: &'a [u8],
}

/// What reading one record's frame found.
#[derive(Debug)]
pub enum NextRaw<'a> {
    Record(Raw<'a>, u64),
    End,
    Corrupt(String),
}

/// Reads the frame of the record at the start of `data` (length, checksum,
/// kind, sequence); `Record(r, n)` consumed `n` bytes. The event is not
/// decoded and the record not hashed.
pub fn decode_raw(data: &[u8]) -> NextRaw<'_> {
    match frame(data) {
        Ok(Some((payload, n))) => NextRaw::Record(
            Raw {
                kind: payload.kind,
                sequence: payload.sequence,
                event: &payload.bytes[PAYLOAD_HEAD..],
            },
            n,
        ),
        Ok(None) => NextRaw::End,
        Err(why) => NextRaw::Corrupt(why),
    }
}

struct Payload<'a> {
    kind: Kind,
    sequence: u64,
    /// The whole payload, head included.
    bytes: &'a [u8],
}

fn frame(data: &[u8]) -> Result<Option<(Payload<'_>, u64)>, String> {
    if data.is_empty() {
        return Ok(None);
    }
    if data.len() < RECORD_HEAD {
        return Err(format!("{} bytes of a record header", data.len()));
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    if !(PAYLOAD_HEAD..=MAX_RECORD).contains(&len) {
        return Err(format!("record length {len} out of range"));
    }
    let Some(payload) = data.get(RECORD_HEAD..RECORD_HEAD + len) else {
        return Err(format!(
            "record of {len} bytes cut after {}",
            data.len() - RECORD_HEAD
        ));
    };
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let Some(kind) = Kind::from_u8(payload[0]) else {
        return Err(format!("unknown record kind {}", payload[0]));
    };
    let mut s = [0u8; 8];
    s.copy_from_slice(&payload[1..9]);
    Ok(Some((
        Payload {
            kind,
            sequence: u64::from_le_bytes(s),
            bytes: payload,
        },
        (RECORD_HEAD + len) as u64,
    )))
}

/// Reads the record at the start of `data`, its event decoded and its
/// payload hashed; `Record(r, n)` consumed `n` bytes.
pub fn decode(data: &[u8]) -> Next {
    let (payload, n) = match frame(data) {
        Ok(Some(f)) => f,
        Ok(None) => return Next::End,
        Err(why) => return Next::Corrupt(why),
    };
    let mut prev = [0u8; 32];
    prev.copy_from_slice(&payload.bytes[9..PAYLOAD_HEAD]);
    match AuditEvent::decode(&payload.bytes[PAYLOAD_HEAD..]) {
        Ok(event) => Next::Record(
            Box::new(Record {
                kind: payload.kind,
                sequence: payload.sequence,
                prev,
                hash: {
                    use sha2::Digest;
                    sha2::Sha256::digest(payload.bytes).into()
                },
                event,
            }),
            n,
        ),
        Err(e) => Next::Corrupt(format!("event does not decode: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_tails_are_found() {
        let ev = AuditEvent {
            event_id: "e1".into(),
            tool: "echo".into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        let h1 = encode(Kind::Attempt, 7, &[0; 32], &ev, &mut buf);
        let one = buf.len();
        encode(Kind::Outcome, 7, &h1, &ev, &mut buf);
        let Next::Record(r, n) = decode(&buf) else {
            panic!("first record")
        };
        assert_eq!((r.kind, r.sequence, n as usize), (Kind::Attempt, 7, one));
        assert_eq!(r.hash, h1);
        let Next::Record(r2, _) = decode(&buf[one..]) else {
            panic!("second record")
        };
        assert_eq!(r2.prev, h1, "records chain");
        assert_eq!(r.event, ev);
        // Every cut of the second record is seen as such.
        for cut in one + 1..buf.len() {
            assert!(
                matches!(decode(&buf[one..cut]), Next::Corrupt(_)),
                "cut {cut}"
            );
        }
        let mut flipped = buf.clone();
        flipped[one + 12] ^= 1;
        assert!(matches!(decode(&flipped[one..]), Next::Corrupt(m) if m.contains("checksum")));
        assert!(matches!(decode(&[]), Next::End));

        // The frame alone: same kind, sequence and length, the event's
        // bytes undecoded, the same checks on length and checksum.
        let NextRaw::Record(raw, n) = decode_raw(&buf[one..]) else {
            panic!("second frame")
        };
        assert_eq!(
            (raw.kind, raw.sequence, n as usize),
            (Kind::Outcome, 7, buf.len() - one)
        );
        assert_eq!(AuditEvent::decode(raw.event).ok(), Some(ev));
        assert!(
            matches!(decode_raw(&flipped[one..]), NextRaw::Corrupt(m) if m.contains("checksum"))
        );
        assert!(matches!(
            decode_raw(&buf[one..buf.len() - 1]),
            NextRaw::Corrupt(_)
        ));
        assert!(matches!(decode_raw(&[]), NextRaw::End));
    }
}
