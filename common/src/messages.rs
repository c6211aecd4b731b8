//! The messages that cross RabbitMQ: batch orders (coordinator → workers) and batch
//! reports (workers → coordinator). The only place message types live. Every message
//! starts with a format version; a worker checks each batch against the ledger before any
//! work, so a message is an order to look, never a source of truth.

use serde::{Deserialize, Serialize};

use crate::codec;

/// The message format this build writes and accepts.
pub const FORMAT_VERSION: u16 = 1;

/// One batch to rotate: rows of `table` with `id_lo <= id <= id_hi`, of stage `stage_no`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMessage {
    pub format: u16,
    pub run_id: i64,
    pub batch_no: i64,
    pub stage_no: i32,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    /// Which publication of the batch this is (1 for the first), for logs.
    pub attempt: i32,
}

/// What happened to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Rotated and committed now.
    Done,
    /// Already done by an earlier delivery; nothing changed.
    AlreadyDone,
    /// Refused and dead-lettered.
    DeadLettered,
    /// The run is paused or finished; the batch was handed back.
    Skipped,
}

/// A worker's report after it acked a batch. Progress is recomputed from the ledger; the
/// report only wakes the coordinator and feeds its progress bar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReport {
    pub format: u16,
    pub run_id: i64,
    pub batch_no: i64,
    pub outcome: Outcome,
    pub n_rows: i64,
    pub n_rotated: i64,
    pub n_errors: i64,
    pub worker: String,
    pub elapsed_ms: u64,
}

/// Why a message body is refused before any work.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error(transparent)]
    Undecodable(#[from] codec::DecodeError),
    #[error("unsupported message format version {0} (this build reads {FORMAT_VERSION})")]
    UnknownVersion(u16),
}

impl BatchMessage {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        match codec::decode::<Self>(bytes) {
            Ok(m) if m.format == FORMAT_VERSION => Ok(m),
            Ok(m) => Err(MessageError::UnknownVersion(m.format)),
            // A future format with other fields is reported as a version mismatch.
            Err(e) => match version_prefix(bytes) {
                Some(v) if (2..100).contains(&v) => Err(MessageError::UnknownVersion(v)),
                _ => Err(MessageError::Undecodable(e)),
            },
        }
    }
}

/// The leading format version of a message, if the bytes start with a valid varint u16.
fn version_prefix(bytes: &[u8]) -> Option<u16> {
    let cfg = bincode::config::standard();
    bincode::serde::decode_from_slice::<u16, _>(bytes, cfg)
        .ok()
        .map(|(v, _)| v)
}

impl BatchReport {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let r: Self = codec::decode(bytes)?;
        if r.format != FORMAT_VERSION {
            return Err(MessageError::UnknownVersion(r.format));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> BatchMessage {
        BatchMessage {
            format: FORMAT_VERSION,
            run_id: 7,
            batch_no: 12,
            stage_no: 0,
            table: "demo.users".into(),
            id_lo: 1,
            id_hi: 1000,
            attempt: 1,
        }
    }

    #[test]
    fn batch_message_round_trips() {
        assert_eq!(BatchMessage::decode(&msg().encode()).unwrap(), msg());
    }

    #[test]
    fn random_bytes_and_other_versions_are_refused() {
        assert!(matches!(
            BatchMessage::decode(b""),
            Err(MessageError::Undecodable(_))
        ));
        assert!(BatchMessage::decode(&[0xff; 40]).is_err());
        let mut m = msg();
        m.format = 9;
        assert!(matches!(
            BatchMessage::decode(&m.encode()),
            Err(MessageError::UnknownVersion(9))
        ));
        let mut bytes = msg().encode();
        bytes.push(0);
        assert!(matches!(
            BatchMessage::decode(&bytes),
            Err(MessageError::Undecodable(_))
        ));
    }
}
