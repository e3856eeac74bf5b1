//! Task records in the store: a small versioned binary layout (fast to load at 1M tasks).

use super::Source;
use super::table::{COUNTED, Task, some_time};
use crate::task::{FailureReason, Status};

const RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("task record is corrupt or of an unknown version")]
pub struct DecodeError;

/// A record as read, borrowing its text from the record bytes.
#[derive(Debug, PartialEq)]
pub(super) struct DecodedTask<'a> {
    pub(super) model: &'a str,
    pub(super) status: Status,
    pub(super) upstream_status: &'a str,
    pub(super) source: Source,
    pub(super) created_at: Option<i64>,
    pub(super) updated_at: Option<i64>,
    pub(super) completed_at: Option<i64>,
    pub(super) first_seen: i64,
    pub(super) last_polled: Option<i64>,
    pub(super) polls: u32,
    pub(super) not_found: u16,
    pub(super) not_found_since: i64,
    pub(super) counted: bool,
    pub(super) credits_used: f64,
    pub(super) credits_refunded: f64,
    pub(super) failure_reason: Option<FailureReason>,
    pub(super) finished_at: Option<i64>,
    pub(super) error_message: Option<&'a str>,
    pub(super) last_error: Option<&'a str>,
}

pub(super) fn encode_task(t: &Task, model: &str, upstream_status: &str) -> Vec<u8> {
    let error_message = t.error_message().unwrap_or("");
    let last_error = t.last_error().unwrap_or("");
    let mut out = Vec::with_capacity(
        71 + model.len() + upstream_status.len() + error_message.len() + last_error.len(),
    );
    out.push(RECORD_VERSION);
    out.push(t.status.index() as u8);
    out.push(source_to_byte(t.source));
    out.push(u8::from(t.has(COUNTED)));
    out.push(t.failure_reason.map_or(u8::MAX, |r| r.index() as u8));
    put_str(&mut out, model);
    put_str(&mut out, upstream_status);
    for v in [
        t.created_at,
        t.updated_at,
        t.completed_at,
        t.last_polled,
        t.finished_at,
    ] {
        // NO_TIME is the record's "absent" too.
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&t.first_seen.to_le_bytes());
    out.extend_from_slice(&t.polls.to_le_bytes());
    out.extend_from_slice(&t.not_found.to_le_bytes());
    out.extend_from_slice(&t.not_found_since().to_le_bytes());
    out.extend_from_slice(&t.credits_used.to_le_bytes());
    out.extend_from_slice(&t.credits_refunded.to_le_bytes());
    put_str(&mut out, error_message);
    put_str(&mut out, last_error);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self.0.split_first_chunk::<N>().ok_or(DecodeError)?;
        self.0 = tail;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        Ok(some_time(self.i64()?))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u16()? as usize;
        if self.0.len() < n {
            return Err(DecodeError);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        std::str::from_utf8(head).map_err(|_| DecodeError)
    }
}

pub(super) fn decode_task(bytes: &[u8]) -> Result<DecodedTask<'_>, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != RECORD_VERSION {
        return Err(DecodeError);
    }
    let status = Status::from_index(r.u8()? as usize).ok_or(DecodeError)?;
    let source = source_from_byte(r.u8()?);
    let counted = r.u8()? != 0;
    let reason_byte = r.u8()?;
    let failure_reason = if reason_byte == u8::MAX {
        None
    } else {
        Some(FailureReason::from_index(reason_byte as usize).ok_or(DecodeError)?)
    };
    let model = r.str()?;
    let upstream_status = r.str()?;
    let created_at = r.opt_i64()?;
    let updated_at = r.opt_i64()?;
    let completed_at = r.opt_i64()?;
    let last_polled = r.opt_i64()?;
    let finished_at = r.opt_i64()?;
    let first_seen = r.i64()?;
    let polls = r.u32()?;
    let not_found = r.u16()?;
    let not_found_since = r.i64()?;
    let credits_used = r.f64()?;
    let credits_refunded = r.f64()?;
    let error_message = Some(r.str()?).filter(|s| !s.is_empty());
    let last_error = Some(r.str()?).filter(|s| !s.is_empty());
    Ok(DecodedTask {
        model,
        status,
        upstream_status,
        source,
        created_at,
        updated_at,
        completed_at,
        first_seen,
        last_polled,
        polls,
        not_found,
        not_found_since,
        counted,
        credits_used,
        credits_refunded,
        failure_reason,
        finished_at,
        error_message,
        last_error,
    })
}

/// The store byte of each source. Records on disk hold these: a byte never changes
/// meaning, a new source takes the next free one.
fn source_to_byte(source: Source) -> u8 {
    match source {
        Source::Static => 0,
        Source::File => 1,
        Source::Api => 2,
        Source::Webhook => 3,
        Source::History => 4,
        Source::Proxy => 5,
    }
}

/// An unknown byte (a newer version's source) reads as `api`.
fn source_from_byte(b: u8) -> Source {
    match b {
        0 => Source::Static,
        1 => Source::File,
        3 => Source::Webhook,
        4 => Source::History,
        5 => Source::Proxy,
        _ => Source::Api,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::test_support::{completed, obs, tasks};
    use crate::store;

    #[test]
    fn source_bytes_are_stable() {
        let bytes: Vec<u8> = Source::ALL.iter().map(|&s| source_to_byte(s)).collect();
        assert_eq!(bytes, [0, 1, 2, 3, 4, 5]);
        for source in Source::ALL {
            assert_eq!(source_from_byte(source_to_byte(source)), source);
        }
        assert_eq!(source_from_byte(200), Source::Api);
    }

    #[test]
    fn records_round_trip_through_the_store_encoding() {
        let p = tasks();
        p.track("a", Source::History, 5);
        let mut o = obs("a", Status::Failed);
        o.failure_reason = Some(FailureReason::ContentModeration);
        o.error_message = Some("blocked".into());
        o.credits_used = Some(2.5);
        p.observe(&o, 10);
        let pending = p.take_pending();
        let (key, record) = &pending.batch.put_tasks[0];
        assert_eq!(store::split_task_key(key), Some(("p", "a")));
        let d = decode_task(record).unwrap();
        assert_eq!(d.status, Status::Failed);
        assert_eq!(d.failure_reason, Some(FailureReason::ContentModeration));
        assert_eq!(d.model, "m");
        assert!(d.counted);
        assert_eq!(d.credits_used, 2.5);
        assert_eq!(d.error_message, Some("blocked"));
        assert_eq!(d.source, Source::History);
        assert!(decode_task(&record[..record.len() - 1]).is_err());

        let q = tasks();
        q.restore_task("a", record, 20).unwrap();
        q.observe(&o, 30);
        assert_eq!(
            completed(&q.take_pending().events),
            0,
            "restored counted task is not recounted"
        );
    }
}
