//! The messages that cross RabbitMQ: batch orders (coordinator → workers) and batch
//! reports (workers → coordinator). The only place message types live. Every message
//! starts with a format version; a worker checks each batch against the ledger before any
//! work, so a message is an order to look, never a source of truth.
//!
//! A batch order carries an HMAC-SHA-256 tag under a key derived from the master key
//! ([`MessageKey`]), so that nobody who can merely publish on the broker can order a batch:
//! a worker refuses an order whose tag does not verify before it reads the database.
//! FORMAT.md gives the derivation and the tagged bytes with a worked example.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::codec;
use crate::keys::master::MasterKey;
use uuid::Uuid;

/// The message format this build writes and accepts (2: batch orders carry a tag).
pub const FORMAT_VERSION: u16 = 2;

/// Length of a batch order's tag (HMAC-SHA-256).
pub const TAG_LEN: usize = 32;

/// HKDF-SHA-256 `info` of the message key: names its one use.
pub const MESSAGE_KEY_INFO: &[u8] = b"rekey batch message hmac v2";

/// One batch to rotate: rows of `table` with `id_lo <= id <= id_hi`, of stage `stage_no`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMessage {
    pub format: u16,
    /// The id (fingerprint) of the master key whose message key made `tag`: a worker
    /// holding another master key (not yet restarted after `rotate-master`) tells such an
    /// order from a forged one, and hands it back instead of refusing it.
    pub master_key_id: [u8; 16],
    pub run_id: i64,
    pub batch_no: i64,
    pub stage_no: i32,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    /// Which publication of the batch this is (1 for the first), for logs.
    pub attempt: i32,
    /// HMAC-SHA-256 over [`BatchMessage::tagged_text`] under the [`MessageKey`]; set by
    /// [`BatchMessage::sealed`], checked by [`MessageKey::verify`].
    pub tag: [u8; TAG_LEN],
}

/// The key that tags batch orders: HKDF-SHA-256 of the master key (no salt, `info`
/// [`MESSAGE_KEY_INFO`], 32 bytes). Whoever holds the master key can make it; nobody
/// else can make a tag a worker accepts. Redacted `Debug`, zeroized on drop.
pub struct MessageKey {
    key: Zeroizing<[u8; 32]>,
    master_key_id: Uuid,
}

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageKey([REDACTED])")
    }
}

impl MessageKey {
    pub fn derive(master: &MasterKey) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(None, master.message_key_ikm());
        let mut okm = Zeroizing::new([0u8; 32]);
        hk.expand(MESSAGE_KEY_INFO, okm.as_mut())
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        Self {
            key: okm,
            master_key_id: master.id(),
        }
    }

    /// The id of the master key this key was derived from.
    pub fn master_key_id(&self) -> Uuid {
        self.master_key_id
    }

    fn mac(&self, msg: &BatchMessage) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(msg.tagged_text().as_bytes());
        mac
    }

    /// The tag of `msg`'s fields (its own `tag` is not part of them).
    pub fn tag(&self, msg: &BatchMessage) -> [u8; TAG_LEN] {
        self.mac(msg).finalize().into_bytes().into()
    }

    /// Whether `msg`'s tag is the one this key gives its fields (compared in constant time).
    pub fn verify(&self, msg: &BatchMessage) -> Result<(), MessageError> {
        self.mac(msg)
            .verify_slice(&msg.tag)
            .map_err(|_| MessageError::BadTag)
    }

    /// The raw key, for FORMAT.md's worked example only.
    #[doc(hidden)]
    pub fn expose_for_spec(&self) -> &[u8; 32] {
        &self.key
    }
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
    #[error(
        "the batch order's tag does not verify under this worker's master key (forged or altered)"
    )]
    BadTag,
    #[error(
        "the batch order is tagged under master key {theirs}, this worker holds {ours}: restart it with the key store's master key"
    )]
    OtherMasterKey { theirs: Uuid, ours: Uuid },
}

impl MessageError {
    /// A short stable name for the kind of refusal, for the aggregated audit entries.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Undecodable(_) => "undecodable",
            Self::UnknownVersion(_) => "unknown_version",
            Self::BadTag => "bad_tag",
            Self::OtherMasterKey { .. } => "other_master_key",
        }
    }
}

impl BatchMessage {
    /// This message with its master key id and its tag set under `key`.
    pub fn sealed(mut self, key: &MessageKey) -> Self {
        self.master_key_id = *key.master_key_id.as_bytes();
        self.tag = key.tag(&self);
        self
    }

    /// The master key id the message says its tag was made under.
    pub fn master_key(&self) -> Uuid {
        Uuid::from_bytes(self.master_key_id)
    }

    /// The text the tag is computed over: `rekey-batch-v2;` then each field as
    /// `<length in bytes>:<value>;` (integers in decimal, the master key id as a
    /// hyphenated lower-case UUID): format, master_key_id, run_id, batch_no, stage_no,
    /// table, id_lo, id_hi, attempt. Independent of the wire encoding.
    pub fn tagged_text(&self) -> String {
        let mut text = String::from("rekey-batch-v2;");
        let fields = [
            self.format.to_string(),
            self.master_key().to_string(),
            self.run_id.to_string(),
            self.batch_no.to_string(),
            self.stage_no.to_string(),
            self.table.clone(),
            self.id_lo.to_string(),
            self.id_hi.to_string(),
            self.attempt.to_string(),
        ];
        for f in fields {
            text.push_str(&format!("{}:{f};", f.len()));
        }
        text
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        match codec::decode::<Self>(bytes) {
            Ok(m) if m.format == FORMAT_VERSION => Ok(m),
            Ok(m) => Err(MessageError::UnknownVersion(m.format)),
            // Another format with other fields (version 1 had no tag) is reported as a
            // version mismatch.
            Err(e) => match version_prefix(bytes) {
                Some(v) if v != FORMAT_VERSION && (1..100).contains(&v) => {
                    Err(MessageError::UnknownVersion(v))
                }
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

    fn key(byte: u8) -> MessageKey {
        MessageKey::derive(&MasterKey::new(crate::secret::KeyMaterial::from_bytes(
            &[byte; 32],
        )))
    }

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
            master_key_id: [0; 16],
            tag: [0; TAG_LEN],
        }
        .sealed(&key(1))
    }

    #[test]
    fn a_tag_verifies_under_its_key_only_and_binds_every_field() {
        let m = msg();
        assert!(key(1).verify(&m).is_ok());
        assert!(matches!(key(2).verify(&m), Err(MessageError::BadTag)));
        let altered: Vec<BatchMessage> = vec![
            BatchMessage {
                run_id: 8,
                ..m.clone()
            },
            BatchMessage {
                batch_no: 13,
                ..m.clone()
            },
            BatchMessage {
                stage_no: 1,
                ..m.clone()
            },
            BatchMessage {
                table: "demo.users2".into(),
                ..m.clone()
            },
            BatchMessage {
                id_lo: 0,
                ..m.clone()
            },
            BatchMessage {
                id_hi: 1001,
                ..m.clone()
            },
            BatchMessage {
                attempt: 2,
                ..m.clone()
            },
            BatchMessage {
                tag: [0; TAG_LEN],
                ..m.clone()
            },
        ];
        for a in altered {
            assert!(key(1).verify(&a).is_err(), "{a:?}");
        }
        assert_eq!(format!("{:?}", key(1)), "MessageKey([REDACTED])");
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
