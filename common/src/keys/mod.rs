//! The key hierarchy: a master key (from outside the database) wraps data keys, data keys
//! wrap field keys, field keys encrypt values.
//!
//! - [`master`]: where the master key comes from ([`master::MasterKeyProvider`]).
//! - [`wrap`]: the wrapped-key format (pure crypto, no I/O).
//! - [`ring`]: the in-memory set of unwrapped field keys that `envelope` uses.
//! - [`store`]: the key store in Postgres, states and transitions, rotations.
//! - [`census`]: counts of values under each key, read from envelope headers in SQL.

pub mod census;
pub mod master;
pub mod pkcs11;
pub mod ring;
pub mod store;
pub mod wrap;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which level of the hierarchy a stored key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// Wrapped by the master key; wraps field keys. Rotated every 90 days by default.
    Data,
    /// Wrapped by a data key; encrypts field values. Rotated every 30 days by default.
    Field,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Data => "data",
            KeyKind::Field => "field",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for KeyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "data" => Ok(KeyKind::Data),
            "field" => Ok(KeyKind::Field),
            other => Err(format!(
                "unknown key kind {other:?} (expected data or field)"
            )),
        }
    }
}

/// How long keys live and how many encryptions a key may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyPolicy {
    pub field_rotation_days: u32,
    pub data_rotation_days: u32,
    /// Random 96-bit nonces allow 2^32 encryptions per key (NIST SP 800-38D).
    pub nonce_budget: u64,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            field_rotation_days: 30,
            data_rotation_days: 90,
            nonce_budget: 1 << 32,
        }
    }
}

/// A key's life: `pending` → `active` → `decrypt_only` → `retired` → `destroyed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published so every reader can decrypt with it, not yet used to encrypt.
    Pending,
    /// The one key of its kind that encrypts new values.
    Active,
    /// Decrypts existing values only.
    DecryptOnly,
    /// No longer usable; its wrapped material is still stored.
    Retired,
    /// Wrapped material erased.
    Destroyed,
}

impl KeyState {
    pub const ALL: [KeyState; 5] = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::DecryptOnly,
        KeyState::Retired,
        KeyState::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt_only",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The legal transitions. `decrypt_only → active` exists for rollback; the same list
    /// is enforced by a trigger in the database (`V1__keys.sql`).
    pub fn can_become(self, to: KeyState) -> bool {
        use KeyState::*;
        matches!(
            (self, to),
            (Pending, Active)
                | (Pending, Retired)
                | (Active, DecryptOnly)
                | (DecryptOnly, Active)
                | (DecryptOnly, Retired)
                | (Retired, Destroyed)
        )
    }

    /// Whether values under a key in this state can still be decrypted.
    pub fn can_decrypt(self) -> bool {
        matches!(
            self,
            KeyState::Pending | KeyState::Active | KeyState::DecryptOnly
        )
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown key state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_legal() {
        let legal: Vec<(KeyState, KeyState)> = KeyState::ALL
            .iter()
            .flat_map(|&a| KeyState::ALL.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        use KeyState::*;
        assert_eq!(
            legal,
            vec![
                (Pending, Active),
                (Pending, Retired),
                (Active, DecryptOnly),
                (DecryptOnly, Active),
                (DecryptOnly, Retired),
                (Retired, Destroyed)
            ]
        );
    }
}
