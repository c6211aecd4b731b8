//! `rekey audit verify`: recomputes every entry's hash, follows every link, compares each
//! batch's chain with the tail its ledger row recorded and each stage's seal with the
//! chains it sealed, and reports gaps in the log while a stage ran. Each problem names the
//! entry (or run and batch) where it is.
//!
//! An entry's hash is SHA-256 over its predecessor's hash followed by [`entry_text`], the
//! same text the database's `rekey.audit_text` builds (FORMAT.md shows it). What this
//! detects: an entry changed (its hash no longer matches), an entry deleted (its successor
//! names it, or the control head or a batch's ledger row does), entries re-linked or
//! forked, and a stage's batch chains changed after the stage was sealed. What it cannot:
//! a whole chain rewritten from some entry on by someone who also rewrites the head row,
//! the ledger and the seals; compare the head printed here with one kept elsewhere (every
//! evidence report records it).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

/// What to check.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Report only problems and gaps at or after this time (everything is still read, so
    /// that links into earlier entries are checked).
    pub since: Option<DateTime<Utc>>,
    /// A pause longer than this between a stage's batch entries is a gap (the playbook:
    /// 5 minutes).
    pub max_gap_secs: f64,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            since: None,
            max_gap_secs: 300.0,
        }
    }
}

/// One thing found wrong, and where.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `edited`, `deleted`, `relinked`, `fork`, `head`, `tail` or `seal`.
    pub kind: &'static str,
    pub entry: Option<i64>,
    pub run_id: Option<i64>,
    pub batch_no: Option<i64>,
    pub message: String,
}

/// A pause in a stage's batch entries longer than the threshold.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub run_id: i64,
    pub stage_no: i32,
    /// The entries before and after the pause.
    pub after_entry: i64,
    pub before_entry: i64,
    pub seconds: f64,
}

/// What verification found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub entries: usize,
    /// Entries written before the log was chained (no hash), not covered.
    pub unchained: usize,
    pub control_entries: usize,
    pub batch_chains: usize,
    pub seals: usize,
    /// The control chain's newest entry and its hash (hex): keep it elsewhere to detect a
    /// rewrite of the whole chain.
    pub head: Option<(i64, String)>,
    pub problems: Vec<Problem>,
    pub gaps: Vec<Gap>,
    pub max_gap_secs: f64,
}

impl VerifyReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.gaps.is_empty()
    }
}

/// One field of the hashed text: `-;` for NULL, else `<characters>:<text>;`.
fn field(out: &mut String, v: Option<&str>) {
    match v {
        None => out.push_str("-;"),
        Some(t) => {
            out.push_str(&t.chars().count().to_string());
            out.push(':');
            out.push_str(t);
            out.push(';');
        }
    }
}

/// The fields of an entry as the database renders them as text, in hashing order.
#[derive(Debug, Clone, Default)]
pub struct EntryFields {
    pub id: i64,
    /// `YYYY-MM-DD HH24:MI:SS.US` in UTC.
    pub at: String,
    pub chain: String,
    pub prev_id: Option<i64>,
    pub key_id: Option<String>,
    pub operation: String,
    /// `true` or `false`.
    pub success: String,
    pub n_ops: String,
    pub run_id: Option<i64>,
    pub batch_no: Option<i64>,
    pub actor: String,
    /// `detail::text` as PostgreSQL renders the jsonb.
    pub detail: String,
}

/// The text an entry's hash covers after its predecessor's hash; the same as the
/// database's `rekey.audit_text`.
pub fn entry_text(e: &EntryFields) -> String {
    let mut s = String::from("rekey-audit-v1;");
    field(&mut s, Some(&e.id.to_string()));
    field(&mut s, Some(&e.at));
    field(&mut s, Some(&e.chain));
    field(&mut s, e.prev_id.map(|v| v.to_string()).as_deref());
    field(&mut s, e.key_id.as_deref());
    field(&mut s, Some(&e.operation));
    field(&mut s, Some(&e.success));
    field(&mut s, Some(&e.n_ops));
    field(&mut s, e.run_id.map(|v| v.to_string()).as_deref());
    field(&mut s, e.batch_no.map(|v| v.to_string()).as_deref());
    field(&mut s, Some(&e.actor));
    field(&mut s, Some(&e.detail));
    s
}

/// SHA-256 of the predecessor's hash followed by the entry's text.
pub fn entry_hash(prev_hash: &[u8], e: &EntryFields) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(entry_text(e).as_bytes());
    h.finalize().to_vec()
}

/// The hash a chain starts from: the control chain's, or one batch's.
pub fn genesis(chain: &str, run_id: Option<i64>, batch_no: Option<i64>) -> Vec<u8> {
    let text = if chain == "batch" {
        format!(
            "rekey-audit-v1 batch {} {}",
            run_id.unwrap_or_default(),
            batch_no.unwrap_or_default()
        )
    } else {
        "rekey-audit-v1 control".to_owned()
    };
    Sha256::digest(text.as_bytes()).to_vec()
}

/// The digest a stage seal records: SHA-256 (hex) over `<batch_no>:<tail hash hex or ->:
/// <entries>;` for each batch in order.
pub fn seal_digest(tails: &[BatchTailRow]) -> String {
    let mut h = Sha256::new();
    for (batch_no, tail, n) in tails {
        let tail = tail.as_deref().map_or("-".to_owned(), hex::encode);
        h.update(format!("{batch_no}:{tail}:{n};").as_bytes());
    }
    hex::encode(h.finalize())
}

/// A batch's number, chain tail hash and entry count, as a seal covers them.
pub type BatchTailRow = (i64, Option<Vec<u8>>, i32);

struct Entry {
    f: EntryFields,
    at: DateTime<Utc>,
    prev_hash: Option<Vec<u8>>,
    hash: Option<Vec<u8>>,
    detail: serde_json::Value,
}

/// Checks the whole log; see the module's description.
pub async fn verify<C: GenericClient>(
    client: &C,
    opts: &VerifyOptions,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), chain, prev_id,
                    key_id::text, operation, success::text, n_ops::text, run_id, batch_no, actor,
                    detail::text, prev_hash, hash, at, detail
               FROM rekey.audit_log ORDER BY id",
            &[],
        )
        .await?;
    let entries: Vec<Entry> = rows
        .iter()
        .map(|r| Entry {
            f: EntryFields {
                id: r.get(0),
                at: r.get(1),
                chain: r.get(2),
                prev_id: r.get(3),
                key_id: r.get(4),
                operation: r.get(5),
                success: r.get(6),
                n_ops: r.get(7),
                run_id: r.get(8),
                batch_no: r.get(9),
                actor: r.get(10),
                detail: r.get(11),
            },
            prev_hash: r.get(12),
            hash: r.get(13),
            at: r.get(14),
            detail: r.get(15),
        })
        .collect();
    let mut report = VerifyReport {
        entries: entries.len(),
        max_gap_secs: opts.max_gap_secs,
        ..Default::default()
    };
    let in_window = |at: &DateTime<Utc>| opts.since.is_none_or(|s| *at >= s);
    let mut problems: Vec<(DateTime<Utc>, Problem)> = Vec::new();
    let mut problem =
        |at: DateTime<Utc>, kind: &'static str, e: Option<&EntryFields>, message: String| {
            problems.push((
                at,
                Problem {
                    kind,
                    entry: e.map(|e| e.id),
                    run_id: e.and_then(|e| e.run_id),
                    batch_no: e.and_then(|e| e.batch_no),
                    message,
                },
            ))
        };

    let by_id: HashMap<i64, &Entry> = entries.iter().map(|e| (e.f.id, e)).collect();
    let mut successors: HashMap<i64, Vec<i64>> = HashMap::new();
    // Each batch chain's entries: (run, batch) → (count, newest id).
    let mut segments: HashMap<(i64, i64), (i32, i64)> = HashMap::new();
    for e in &entries {
        let Some(hash) = &e.hash else {
            report.unchained += 1;
            continue;
        };
        let f = &e.f;
        if f.chain == "batch" {
            let s = segments
                .entry((f.run_id.unwrap_or_default(), f.batch_no.unwrap_or_default()))
                .or_insert((0, f.id));
            s.0 += 1;
            s.1 = s.1.max(f.id);
        } else {
            report.control_entries += 1;
        }
        let prev_hash = e.prev_hash.clone().unwrap_or_default();
        if entry_hash(&prev_hash, f) != *hash {
            problem(
                e.at,
                "edited",
                Some(f),
                format!(
                    "entry {} ({} by {}) was changed after it was written: its hash does not match its content",
                    f.id, f.operation, f.actor
                ),
            );
        }
        match f.prev_id {
            None => {
                if prev_hash != genesis(&f.chain, f.run_id, f.batch_no) {
                    problem(
                        e.at,
                        "relinked",
                        Some(f),
                        format!(
                            "entry {} claims to start its chain but does not carry the chain's starting hash",
                            f.id
                        ),
                    );
                }
            }
            Some(p) => {
                successors.entry(p).or_default().push(f.id);
                match by_id.get(&p) {
                    None => problem(
                        e.at,
                        "deleted",
                        Some(f),
                        format!("entry {p} was deleted: entry {} follows it", f.id),
                    ),
                    Some(pe) => {
                        let same_chain = pe.f.chain == f.chain
                            && (f.chain == "control"
                                || (pe.f.run_id == f.run_id && pe.f.batch_no == f.batch_no));
                        if pe.hash.as_deref() != Some(prev_hash.as_slice()) || !same_chain {
                            problem(
                                e.at,
                                "relinked",
                                Some(f),
                                format!(
                                    "entry {} no longer follows entry {p} as it did when written (entry {p} or the link was changed)",
                                    f.id
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    for (p, next) in &successors {
        if next.len() > 1 {
            let e = by_id.get(&next[1]).copied();
            problem(
                e.map_or(Utc::now(), |e| e.at),
                "fork",
                e.map(|e| &e.f),
                format!("entries {next:?} all follow entry {p}: a chain forked"),
            );
        }
    }
    report.batch_chains = segments.len();

    // The control chain's head: its newest entry must be there, unchanged, and be the only
    // control entry nothing follows.
    let head = client
        .query_opt(
            "SELECT last_id, last_hash FROM rekey.audit_head WHERE chain = 'control'",
            &[],
        )
        .await?;
    if let Some(h) = head {
        let (last_id, last_hash): (Option<i64>, Option<Vec<u8>>) = (h.get(0), h.get(1));
        if let Some(last_id) = last_id {
            report.head = Some((
                last_id,
                last_hash.as_deref().map(hex::encode).unwrap_or_default(),
            ));
            match by_id.get(&last_id) {
                None => problem(
                    Utc::now(),
                    "deleted",
                    None,
                    format!("entry {last_id}, the newest of the control chain, was deleted"),
                ),
                Some(e) if e.hash != last_hash => problem(
                    e.at,
                    "edited",
                    Some(&e.f),
                    format!("entry {last_id}, the newest of the control chain, was changed"),
                ),
                Some(_) => {}
            }
            for e in entries.iter().filter(|e| {
                e.hash.is_some()
                    && e.f.chain == "control"
                    && e.f.id != last_id
                    && !successors.contains_key(&e.f.id)
            }) {
                problem(
                    e.at,
                    "deleted",
                    Some(&e.f),
                    format!(
                        "the control chain ends at entry {} as well as at its head {last_id}: what followed {} was deleted",
                        e.f.id, e.f.id
                    ),
                );
            }
        }
    }

    // Each batch's chain against its ledger row, and each stage seal against its batches.
    let batches = client
        .query(
            "SELECT run_id, batch_no, stage_no, audit_tail_id, audit_tail, audit_entries, done_at
               FROM rekey.batches ORDER BY run_id, batch_no",
            &[],
        )
        .await?;
    let mut stage_of: HashMap<(i64, i64), i32> = HashMap::new();
    let mut actual_tails: HashMap<(i64, i32), Vec<BatchTailRow>> = HashMap::new();
    for b in &batches {
        let (run_id, batch_no, stage_no): (i64, i64, i32) = (b.get(0), b.get(1), b.get(2));
        stage_of.insert((run_id, batch_no), stage_no);
        let actual = segments.get(&(run_id, batch_no));
        actual_tails.entry((run_id, stage_no)).or_default().push((
            batch_no,
            actual.and_then(|(_, id)| by_id.get(id).and_then(|e| e.hash.clone())),
            actual.map_or(0, |(n, _)| *n),
        ));
        let Some(recorded) = b.get::<_, Option<i32>>(5) else {
            continue;
        };
        let done_at: Option<DateTime<Utc>> = b.get(6);
        let at = done_at.unwrap_or_else(Utc::now);
        let where_ = EntryFields {
            id: b.get::<_, Option<i64>>(3).unwrap_or_default(),
            run_id: Some(run_id),
            batch_no: Some(batch_no),
            ..Default::default()
        };
        let found = actual.map_or(0, |(n, _)| *n);
        let tail_hash: Option<Vec<u8>> = b.get(4);
        let actual_hash = actual.and_then(|(_, id)| by_id.get(id).and_then(|e| e.hash.clone()));
        if found != recorded {
            problem(
                at,
                "deleted",
                Some(&where_),
                format!(
                    "batch {batch_no} of run {run_id} wrote {recorded} audit entries (its ledger row says), {found} are there"
                ),
            );
        } else if actual_hash != tail_hash {
            problem(
                at,
                "tail",
                Some(&where_),
                format!(
                    "batch {batch_no} of run {run_id}: its audit chain does not end where its ledger row says"
                ),
            );
        }
    }
    for e in entries
        .iter()
        .filter(|e| e.hash.is_some() && e.f.operation == "audit_seal")
    {
        report.seals += 1;
        let (Some(run_id), Some(stage_no)) = (
            e.f.run_id,
            e.detail.get("stage_no").and_then(|v| v.as_i64()),
        ) else {
            continue;
        };
        let tails = actual_tails
            .get(&(run_id, stage_no as i32))
            .cloned()
            .unwrap_or_default();
        let sealed = e.detail.get("digest").and_then(|v| v.as_str());
        if sealed != Some(seal_digest(&tails).as_str()) {
            problem(
                e.at,
                "seal",
                Some(&e.f),
                format!(
                    "run {run_id} stage {stage_no}: its batches or their audit chains changed after entry {} sealed them",
                    e.f.id
                ),
            );
        }
    }

    // Gaps: pauses between a stage's batch entries.
    let mut by_stage: HashMap<(i64, i32), Vec<&Entry>> = HashMap::new();
    for e in entries.iter().filter(|e| e.f.chain == "batch") {
        let (Some(r), Some(b)) = (e.f.run_id, e.f.batch_no) else {
            continue;
        };
        if let Some(s) = stage_of.get(&(r, b)) {
            by_stage.entry((r, *s)).or_default().push(e);
        }
    }
    let mut keys: Vec<_> = by_stage.keys().copied().collect();
    keys.sort();
    for k in keys {
        let mut list = by_stage.remove(&k).unwrap_or_default();
        list.sort_by_key(|e| (e.at, e.f.id));
        for w in list.windows(2) {
            let secs = (w[1].at - w[0].at).num_milliseconds() as f64 / 1000.0;
            if secs > opts.max_gap_secs && in_window(&w[1].at) {
                report.gaps.push(Gap {
                    run_id: k.0,
                    stage_no: k.1,
                    after_entry: w[0].f.id,
                    before_entry: w[1].f.id,
                    seconds: secs,
                });
            }
        }
    }
    let mut seen = HashSet::new();
    problems.sort_by_key(|(_, p)| p.entry);
    report.problems = problems
        .into_iter()
        .filter(|(at, _)| in_window(at))
        .map(|(_, p)| p)
        .filter(|p| seen.insert(p.message.clone()))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_text_matches_format_md() {
        let e = EntryFields {
            id: 7,
            at: "2026-11-29 06:00:00.123456".into(),
            chain: "control".into(),
            prev_id: Some(6),
            key_id: None,
            operation: "gate".into(),
            success: "true".into(),
            n_ops: "1".into(),
            run_id: Some(3),
            batch_no: None,
            actor: "ops".into(),
            detail: r#"{"stage_no": 0}"#.into(),
        };
        let text = entry_text(&e);
        assert_eq!(
            text,
            r#"rekey-audit-v1;1:7;26:2026-11-29 06:00:00.123456;7:control;1:6;-;4:gate;4:true;1:1;1:3;-;3:ops;15:{"stage_no": 0};"#
        );
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../FORMAT.md")).unwrap();
        assert!(doc.contains(&text), "FORMAT.md shows this text");
        // Lengths count characters, as PostgreSQL's length() does.
        let mut s = String::new();
        field(&mut s, Some("é€"));
        assert_eq!(s, "2:é€;");
    }

    #[test]
    fn the_seal_digest_covers_order_tails_and_counts() {
        let a = vec![(1, Some(vec![1u8, 2]), 3), (2, None, 0)];
        let mut b = a.clone();
        b[0].2 = 2;
        assert_ne!(seal_digest(&a), seal_digest(&b));
        let mut c = a.clone();
        c.reverse();
        assert_ne!(seal_digest(&a), seal_digest(&c));
        assert_eq!(seal_digest(&a), seal_digest(&a.clone()));
    }
}
