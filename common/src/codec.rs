//! The one place messages are turned into bytes and back: serde + bincode 2 (pinned at
//! `=2.0.1`), standard configuration with a size limit so that a hostile message cannot
//! make a worker allocate without bound.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Messages larger than this are refused on decode.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message ({len} bytes): {reason}")]
pub struct DecodeError {
    pub len: usize,
    pub reason: String,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config()).expect("rekey's message types always encode")
}

/// Decodes a whole message; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let err = |reason: String| DecodeError {
        len: bytes.len(),
        reason,
    };
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| err(e.to_string()))?;
    if used != bytes.len() {
        return Err(err(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}
