//! The crypto of one batch: open each value with the key its header names, seal it under
//! the target key, open the new value once more to verify it, and count what happened.
//!
//! **Architecture invariant:** nothing here does I/O: no database, no broker, no file, no
//! clock. It takes rows and a key ring and returns new values, errors and counts, so that
//! it runs on the blocking pool and is tested without a database.

use std::collections::{HashMap, HashSet};

use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use uuid::Uuid;

/// The counts a batch records in the ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub n_rows: i64,
    pub n_values: i64,
    pub n_rotated: i64,
    pub n_skipped: i64,
    pub n_null: i64,
    pub n_errors: i64,
}

/// (key, operation, success) → number of operations.
pub type OpCounts = Vec<((Option<Uuid>, &'static str, bool), i64)>;

/// A value that could not be decrypted: where it is and why; never its bytes.
#[derive(Debug, Clone)]
pub(super) struct ValueError {
    pub(super) column: usize,
    pub(super) row_id: i64,
    pub(super) key_id: Option<Uuid>,
    pub(super) kind: &'static str,
}

/// What the crypto of a batch produced.
#[derive(Debug, Default)]
pub(super) struct Computed {
    pub(super) ids: Vec<i64>,
    /// For each of `ids`, its index in the rows computed from.
    pub(super) rows_idx: Vec<usize>,
    /// Per column, per updated row: the new envelope, or `None` to leave the value alone.
    pub(super) new_values: Vec<Vec<Option<Vec<u8>>>>,
    pub(super) errors: Vec<ValueError>,
    /// (key id, operation, success) → number of operations.
    pub(super) audit: HashMap<(Option<Uuid>, &'static str, bool), i64>,
    pub(super) counts: Counts,
    /// Key ids named by values that the ring does not hold.
    pub(super) unknown_keys: HashSet<Uuid>,
    /// Encryptions made under the target key, written or not: each used a random nonce,
    /// so each counts against the key's nonce budget ([`Computed::forget`] keeps them).
    pub(super) sealed: u64,
}

/// Re-encrypts one batch's values. Pure CPU; no I/O.
pub(super) fn compute(
    ring: &KeyRing,
    target: Uuid,
    sources: Option<&[Uuid]>,
    table: &str,
    columns: &[String],
    rows: &[(i64, Vec<Option<Vec<u8>>>)],
) -> anyhow::Result<Computed> {
    let target_key = ring
        .get(&target)
        .ok_or_else(|| anyhow::anyhow!("target key {target} is not in the key ring"))?;
    let mut out = Computed {
        new_values: vec![Vec::new(); columns.len()],
        ..Default::default()
    };
    out.counts.n_rows = rows.len() as i64;
    for (ri, (row_id, values)) in rows.iter().enumerate() {
        let mut changed: Vec<Option<Vec<u8>>> = vec![None; columns.len()];
        let mut any = false;
        for (ci, value) in values.iter().enumerate() {
            let Some(value) = value else {
                out.counts.n_null += 1;
                continue;
            };
            out.counts.n_values += 1;
            let header_key = envelope::key_id(value).ok();
            let not_a_source = match (sources, header_key) {
                (Some(sources), Some(k)) => !sources.contains(&k),
                _ => false,
            };
            if header_key == Some(target) || not_a_source {
                out.counts.n_skipped += 1;
                continue;
            }
            let loc = FieldLocation {
                table,
                column: &columns[ci],
                row_id: *row_id,
            };
            match envelope::open(ring, &loc, value) {
                Err(e) => {
                    if let envelope::Error::UnknownKey { key_id } = e {
                        out.unknown_keys.insert(key_id);
                    }
                    out.errors.push(ValueError {
                        column: ci,
                        row_id: *row_id,
                        key_id: header_key,
                        kind: e.kind(),
                    });
                    *out.audit.entry((header_key, "decrypt", false)).or_default() += 1;
                    out.counts.n_errors += 1;
                }
                Ok(plain) => {
                    *out.audit.entry((header_key, "decrypt", true)).or_default() += 1;
                    let sealed = envelope::seal_with(target_key, &loc, plain.as_bytes())?;
                    out.sealed += 1;
                    // Verify before anything is written: the new value must open to the
                    // same plaintext, or the batch fails whole.
                    let check = envelope::open_with(target_key, &loc, &sealed)
                        .map_err(|e| anyhow::anyhow!("verification of a re-encrypted value failed at {table}.{} row {row_id}: {e}", columns[ci]))?;
                    if check.as_bytes() != plain.as_bytes() {
                        anyhow::bail!(
                            "verification of a re-encrypted value failed at {table}.{} row {row_id}: plaintext differs",
                            columns[ci]
                        );
                    }
                    *out.audit
                        .entry((Some(target), "encrypt", true))
                        .or_default() += 1;
                    *out.audit.entry((Some(target), "verify", true)).or_default() += 1;
                    out.counts.n_rotated += 1;
                    changed[ci] = Some(sealed);
                    any = true;
                }
            }
        }
        if any {
            out.ids.push(*row_id);
            out.rows_idx.push(ri);
            for (ci, v) in changed.into_iter().enumerate() {
                out.new_values[ci].push(v);
            }
        }
    }
    Ok(out)
}

impl Computed {
    /// Takes back what `rows` (the rows this was computed from) contributed for the rows in
    /// `forget`, which were not written: their counts, audit entries and new values. Only
    /// rows in `ids` can be forgotten (a row with nothing to write is never missed).
    pub(super) fn forget(
        &mut self,
        rows: &[(i64, Vec<Option<Vec<u8>>>)],
        target: Uuid,
        forget: &HashSet<i64>,
    ) {
        let mut dec = |key: (Option<Uuid>, &'static str, bool)| {
            if let Some(n) = self.audit.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.audit.remove(&key);
                }
            }
        };
        let mut keep = vec![true; self.ids.len()];
        for (pos, (id, ri)) in self.ids.iter().zip(&self.rows_idx).enumerate() {
            if !forget.contains(id) {
                continue;
            }
            keep[pos] = false;
            let c = &mut self.counts;
            c.n_rows -= 1;
            for (ci, value) in rows[*ri].1.iter().enumerate() {
                let Some(value) = value else {
                    c.n_null -= 1;
                    continue;
                };
                c.n_values -= 1;
                let header_key = envelope::key_id(value).ok();
                if self.new_values[ci][pos].is_some() {
                    c.n_rotated -= 1;
                    dec((header_key, "decrypt", true));
                    dec((Some(target), "encrypt", true));
                    dec((Some(target), "verify", true));
                } else if let Some(e) = self
                    .errors
                    .iter()
                    .position(|e| e.row_id == *id && e.column == ci)
                {
                    self.errors.swap_remove(e);
                    c.n_errors -= 1;
                    dec((header_key, "decrypt", false));
                } else {
                    c.n_skipped -= 1;
                }
            }
        }
        let mut k = keep.iter();
        self.ids.retain(|_| *k.next().expect("same length"));
        let mut k = keep.iter();
        self.rows_idx.retain(|_| *k.next().expect("same length"));
        for col in &mut self.new_values {
            let mut k = keep.iter();
            col.retain(|_| *k.next().expect("same length"));
        }
    }

    /// Adds what another computation (of other rows) did. Its `ids` are taken as written.
    pub(super) fn absorb(&mut self, other: Computed) {
        self.ids.extend(other.ids);
        self.errors.extend(other.errors);
        for (k, n) in other.audit {
            *self.audit.entry(k).or_default() += n;
        }
        let (c, o) = (&mut self.counts, other.counts);
        c.n_rows += o.n_rows;
        c.n_values += o.n_values;
        c.n_rotated += o.n_rotated;
        c.n_skipped += o.n_skipped;
        c.n_null += o.n_null;
        c.n_errors += o.n_errors;
        self.unknown_keys.extend(other.unknown_keys);
        self.sealed += other.sealed;
        // `new_values` and `rows_idx` describe only the first computation's rows; the other's
        // values are already written.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The architecture invariant: this module does no I/O, so it names nothing that does.
    #[test]
    fn compute_names_nothing_that_does_io() {
        let code = include_str!("compute.rs");
        let code = &code[..code.find("#[cfg(test)]").unwrap()];
        for banned in [
            "tokio",
            "deadpool",
            "postgres",
            "lapin",
            "std::fs",
            "std::net",
            "std::time",
            "async ",
            ".await",
        ] {
            assert!(!code.contains(banned), "compute.rs names {banned}");
        }
    }
    use rekey_common::keys::KeyState;
    use rekey_common::keys::ring::FieldKey;
    use rekey_common::secret::KeyMaterial;

    fn key(ring: &mut KeyRing, state: KeyState) -> Uuid {
        let id = Uuid::new_v4();
        ring.insert(FieldKey::new(
            id,
            state,
            &KeyMaterial::generate(),
            0,
            1 << 32,
        ));
        id
    }

    type Rows = Vec<(i64, Vec<Option<Vec<u8>>>)>;

    /// Rows of two columns mixing every kind of value: under the old key, under the target,
    /// null, corrupt, under a key the ring does not hold.
    fn rows(ring: &KeyRing, old: Uuid, target: Uuid, stranger: &KeyRing, ids: &[i64]) -> Rows {
        let cols = ["email", "phone"];
        ids.iter()
            .map(|&id| {
                let values = cols
                    .iter()
                    .enumerate()
                    .map(|(ci, col)| {
                        let loc = FieldLocation {
                            table: "demo.users",
                            column: col,
                            row_id: id,
                        };
                        let seal = |ring: &KeyRing, k: Uuid| {
                            envelope::seal_with(ring.get(&k).unwrap(), &loc, b"plaintext").unwrap()
                        };
                        match (id as usize + ci) % 6 {
                            0 => None,
                            1 => Some(seal(ring, target)),
                            2 => {
                                let mut v = seal(ring, old);
                                let last = v.len() - 1;
                                v[last] ^= 1;
                                Some(v)
                            }
                            3 => {
                                let k = stranger.encrypt_key().unwrap();
                                Some(envelope::seal_with(k, &loc, b"plaintext").unwrap())
                            }
                            _ => Some(seal(ring, old)),
                        }
                    })
                    .collect();
                (id, values)
            })
            .collect()
    }

    fn audit_sorted(c: &Computed) -> OpCounts {
        let mut v: Vec<_> = c.audit.iter().map(|(k, n)| (*k, *n)).collect();
        v.sort_by_key(|((k, op, ok), _)| (*k, *op, *ok));
        v
    }

    #[test]
    pub(super) fn forgetting_missed_rows_and_absorbing_their_redo_gives_the_counts_of_one_pass() {
        let mut ring = KeyRing::default();
        let old = key(&mut ring, KeyState::DecryptOnly);
        let target = key(&mut ring, KeyState::Active);
        let mut stranger = KeyRing::default();
        let s = key(&mut stranger, KeyState::Active);
        stranger.set_encrypt_key(s).unwrap();
        let ids: Vec<i64> = (1..=60).collect();
        let all = rows(&ring, old, target, &stranger, &ids);
        let columns = vec!["email".to_owned(), "phone".to_owned()];
        let whole = compute(&ring, target, None, "demo.users", &columns, &all).unwrap();
        assert!(whole.counts.n_rotated > 0 && whole.counts.n_errors > 0);
        assert!(whole.counts.n_skipped > 0 && whole.counts.n_null > 0);

        // Every third written row was "missed": forget it, then compute those rows again.
        let missed: HashSet<i64> = whole.ids.iter().copied().step_by(3).collect();
        let mut first = compute(&ring, target, None, "demo.users", &columns, &all).unwrap();
        first.forget(&all, target, &missed);
        assert_eq!(first.ids.len(), whole.ids.len() - missed.len());
        assert!(first.ids.iter().all(|id| !missed.contains(id)));
        assert!(first.new_values.iter().all(|c| c.len() == first.ids.len()));
        assert_eq!(first.rows_idx.len(), first.ids.len());
        for (id, ri) in first.ids.iter().zip(&first.rows_idx) {
            assert_eq!(all[*ri].0, *id, "indexes still point at their rows");
        }
        let again: Rows = all
            .iter()
            .filter(|(id, _)| missed.contains(id))
            .cloned()
            .collect();
        let redo = compute(&ring, target, None, "demo.users", &columns, &again).unwrap();
        let redone = redo.sealed;
        first.absorb(redo);

        assert_eq!(first.counts, whole.counts);
        // The forgotten rows' encryptions still count against the budget, and so do the
        // redo's: more nonces were used than values written.
        assert_eq!(whole.sealed, whole.counts.n_rotated as u64);
        assert_eq!(first.sealed, whole.sealed + redone);
        assert!(redone > 0);
        assert_eq!(audit_sorted(&first), audit_sorted(&whole));
        assert_eq!(first.errors.len(), whole.errors.len());
        let mut a = first.ids.clone();
        a.sort_unstable();
        assert_eq!(a, whole.ids);
    }

    #[test]
    pub(super) fn forgetting_a_row_the_application_put_under_the_target_leaves_it_skipped() {
        let mut ring = KeyRing::default();
        let old = key(&mut ring, KeyState::DecryptOnly);
        let target = key(&mut ring, KeyState::Active);
        let stranger = KeyRing::default();
        // Rows 4 and 5: both columns under the old key (ids ≡ 4, 5 mod 6 give kinds 4/5, 5/0).
        let all = rows(&ring, old, target, &stranger, &[4]);
        let columns = vec!["email".to_owned(), "phone".to_owned()];
        let mut c = compute(&ring, target, None, "demo.users", &columns, &all).unwrap();
        assert_eq!(c.counts.n_rotated, 2);
        c.forget(&all, target, &HashSet::from([4]));
        assert_eq!(c.counts, Counts::default());
        assert!(c.audit.is_empty(), "{:?}", c.audit);
        // Meanwhile the application wrote both values under the target key.
        let now = rows(&ring, target, target, &stranger, &[4]);
        c.absorb(compute(&ring, target, None, "demo.users", &columns, &now).unwrap());
        assert_eq!(c.counts.n_rotated, 0);
        assert_eq!(c.counts.n_skipped, 2);
        assert_eq!(c.counts.n_rows, 1);
        assert!(c.audit.is_empty());
    }
}
