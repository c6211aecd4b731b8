//! Seeding: N records over `demo.users`, `demo.agents` and `demo.conversations` with
//! encrypted columns of realistic sizes (emails of tens of bytes, API keys, message bodies
//! from 200 bytes to several KiB), deterministic from a seed, written with binary COPY.
//! Every plaintext's SHA-256 goes to `demo.plaintext_digests`. With a corrupt fraction,
//! some values are planted so that they cannot decrypt: flipped bits, a key the store does
//! not know, or a ciphertext moved from another row.

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::KeyState;
use rekey_common::keys::ring::{FieldKey, KeyRing};
use rekey_common::secret::KeyMaterial;
use sha2::{Digest, Sha256};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// What to seed.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub rows: i64,
    pub seed: u64,
    /// Fraction of non-NULL values planted so that they cannot decrypt.
    pub corrupt_fraction: f64,
    /// Rows per COPY chunk.
    pub chunk: i64,
}

impl Default for SeedOptions {
    fn default() -> Self {
        Self {
            rows: 10_000,
            seed: 1,
            corrupt_fraction: 0.0,
            chunk: 5_000,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SeedReport {
    pub rows: i64,
    pub values: i64,
    pub corrupt_values: i64,
    pub per_table: Vec<(String, i64)>,
}

/// A demo table's shape.
struct Shape {
    table: &'static str,
    columns: [&'static str; 2],
    extra: &'static str,
}

const SHAPES: [Shape; 3] = [
    Shape {
        table: "demo.users",
        columns: ["email", "phone"],
        extra: "name",
    },
    Shape {
        table: "demo.agents",
        columns: ["api_key", "system_prompt"],
        extra: "name",
    },
    Shape {
        table: "demo.conversations",
        columns: ["body", "summary"],
        extra: "title",
    },
];

/// The id of the i-th row of a table: dense for users, sparse for agents (every third id),
/// and skewed for conversations (dense, then a jump of 1000 between rows).
fn row_id(table_idx: usize, i: i64, n: i64) -> i64 {
    match table_idx {
        0 => i + 1,
        1 => 3 * i + 1,
        _ => {
            if i < n / 2 {
                i + 1
            } else {
                n / 2 + 1 + (i - n / 2) * 1000
            }
        }
    }
}

fn words(rng: &mut StdRng, min: usize, max: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "key",
        "rotation",
        "agent",
        "lightning",
        "secret",
        "customer",
        "order",
        "invoice",
        "deploy",
        "staging",
        "please",
        "review",
        "summary",
        "ticket",
        "refund",
        "latency",
        "database",
        "cluster",
        "message",
    ];
    let len = rng.random_range(min..=max);
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        s.push(' ');
    }
    s.truncate(len);
    s
}

/// The plaintext of (table, column) for the row with ordinal `i`; `None` is NULL.
fn plaintext(rng: &mut StdRng, table_idx: usize, col: usize, i: i64) -> Option<Vec<u8>> {
    let v = match (table_idx, col) {
        (0, 0) => format!("user{i}.{}@example.com", rng.random_range(0..100_000)),
        (0, 1) => {
            if rng.random_bool(0.1) {
                return None;
            }
            format!(
                "+1 555 {:04} {:04}",
                rng.random_range(0..10_000),
                rng.random_range(0..10_000)
            )
        }
        (1, 0) => {
            let bytes: [u8; 24] = rng.random();
            format!(
                "sk-live-{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        }
        (1, 1) => words(rng, 200, 800),
        (2, 0) => words(rng, 200, 4096),
        _ => {
            if rng.random_bool(0.2) {
                return None;
            }
            words(rng, 100, 300)
        }
    };
    Some(v.into_bytes())
}

/// One chunk's rows, ready for COPY.
#[derive(Default)]
struct Chunk {
    ids: Vec<i64>,
    extra: Vec<String>,
    values: [Vec<Option<Vec<u8>>>; 2],
    digests: Vec<(String, i64, Vec<u8>, bool)>,
    corrupt: i64,
}

fn build_chunk(
    ring: &KeyRing,
    stranger: &FieldKey,
    opts: &SeedOptions,
    table_idx: usize,
    start: i64,
    end: i64,
    n: i64,
) -> anyhow::Result<Chunk> {
    let shape = &SHAPES[table_idx];
    // One generator per chunk, seeded from (seed, table, chunk start): deterministic
    // whatever the chunk size of other tables and whatever the order of chunks.
    let mut rng = StdRng::seed_from_u64(
        opts.seed ^ ((table_idx as u64) << 56) ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut c = Chunk::default();
    for i in start..end {
        let id = row_id(table_idx, i, n);
        c.ids.push(id);
        c.extra.push(format!("{} {i}", shape.extra));
        for col in 0..2 {
            let Some(pt) = plaintext(&mut rng, table_idx, col, i) else {
                c.values[col].push(None);
                continue;
            };
            let loc = FieldLocation {
                table: shape.table,
                column: shape.columns[col],
                row_id: id,
            };
            let corrupt =
                opts.corrupt_fraction > 0.0 && rng.random_bool(opts.corrupt_fraction.min(1.0));
            let env = if corrupt {
                c.corrupt += 1;
                match rng.random_range(0..3) {
                    0 => {
                        let mut e = envelope::seal(ring, &loc, &pt)?;
                        let at = rng.random_range(envelope::HEADER_LEN..e.len());
                        e[at] ^= 1 << rng.random_range(0..8);
                        e
                    }
                    1 => envelope::seal_with(stranger, &loc, &pt)?,
                    _ => {
                        let moved = FieldLocation {
                            row_id: id + 1,
                            ..loc
                        };
                        envelope::seal(ring, &moved, &pt)?
                    }
                }
            } else {
                envelope::seal(ring, &loc, &pt)?
            };
            c.digests.push((
                shape.columns[col].to_owned(),
                id,
                Sha256::digest(&pt).to_vec(),
                corrupt,
            ));
            c.values[col].push(Some(env));
        }
    }
    Ok(c)
}

async fn copy_chunk(pool: &Pool, table_idx: usize, chunk: &Chunk) -> anyhow::Result<()> {
    let shape = &SHAPES[table_idx];
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let extra_cols = if table_idx == 0 {
        "name"
    } else if table_idx == 1 {
        "user_id, name"
    } else {
        "agent_id, title"
    };
    let sink = tx
        .copy_in(&format!(
            "COPY {} (id, {extra_cols}, {}, {}) FROM STDIN BINARY",
            shape.table, shape.columns[0], shape.columns[1]
        ))
        .await?;
    let types: Vec<Type> = if table_idx == 0 {
        vec![Type::INT8, Type::TEXT, Type::BYTEA, Type::BYTEA]
    } else {
        vec![Type::INT8, Type::INT8, Type::TEXT, Type::BYTEA, Type::BYTEA]
    };
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for (k, id) in chunk.ids.iter().enumerate() {
        let parent = id % 997 + 1;
        let row: Vec<&(dyn ToSql + Sync)> = if table_idx == 0 {
            vec![
                id,
                &chunk.extra[k],
                &chunk.values[0][k],
                &chunk.values[1][k],
            ]
        } else {
            vec![
                id,
                &parent,
                &chunk.extra[k],
                &chunk.values[0][k],
                &chunk.values[1][k],
            ]
        };
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    let sink = tx
        .copy_in("COPY demo.plaintext_digests (table_name, column_name, row_id, digest, corrupt) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[Type::TEXT, Type::TEXT, Type::INT8, Type::BYTEA, Type::BOOL],
    );
    futures::pin_mut!(writer);
    let table = shape.table.to_owned();
    for (col, id, digest, corrupt) in &chunk.digests {
        writer
            .as_mut()
            .write(&[&table, col, id, digest, corrupt])
            .await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(())
}

/// Seeds `opts.rows` records with the ring's active key. The demo tables must be empty.
pub async fn seed(
    pool: &Pool,
    ring: Arc<KeyRing>,
    opts: &SeedOptions,
) -> anyhow::Result<SeedReport> {
    anyhow::ensure!(
        ring.encrypt_key().is_some(),
        "there is no active field key: run `rekey keys init` first"
    );
    let stranger = Arc::new(FieldKey::new(
        Uuid::new_v4(),
        KeyState::Active,
        &KeyMaterial::generate(),
        0,
        u64::MAX,
    ));
    let counts = [
        opts.rows * 4 / 10,
        opts.rows * 2 / 10,
        opts.rows - opts.rows * 4 / 10 - opts.rows * 2 / 10,
    ];
    let mut report = SeedReport::default();
    for (table_idx, &n) in counts.iter().enumerate() {
        let mut start = 0;
        let mut pending: Option<tokio::task::JoinHandle<anyhow::Result<Chunk>>> = None;
        // Build the next chunk (CPU, on the blocking pool) while the previous one copies.
        loop {
            let next = (start < n).then(|| {
                let end = (start + opts.chunk).min(n);
                let (ring, stranger, opts2) = (ring.clone(), stranger.clone(), opts.clone());
                let s = start;
                start = end;
                tokio::task::spawn_blocking(move || {
                    build_chunk(&ring, &stranger, &opts2, table_idx, s, end, n)
                })
            });
            if let Some(h) = pending.take() {
                let chunk = h.await.context("seed worker")??;
                copy_chunk(pool, table_idx, &chunk)
                    .await
                    .with_context(|| format!("copy into {}", SHAPES[table_idx].table))?;
                report.values += chunk.digests.len() as i64;
                report.corrupt_values += chunk.corrupt;
            }
            match next {
                Some(h) => pending = Some(h),
                None => break,
            }
        }
        report.rows += n;
        report
            .per_table
            .push((SHAPES[table_idx].table.to_owned(), n));
    }
    let client = pool.get().await?;
    rekey_common::keys::store::add_encryptions(&**client, &ring.take_encryption_counts()).await?;
    client
        .batch_execute("ANALYZE demo.users; ANALYZE demo.agents; ANALYZE demo.conversations")
        .await?;
    Ok(report)
}

/// Prepares the demo for a load tool: migrations, the first keys if missing, the demo
/// tables emptied, then `rows` records seeded with `seed` and the tables vacuumed.
pub async fn reseed(
    pool: &Pool,
    settings: &rekey_common::Settings,
    master: &rekey_common::keys::master::MasterKey,
    rows: i64,
    seed: u64,
) -> anyhow::Result<SeedReport> {
    rekey_common::db::migrate(pool).await?;
    rekey_common::db::migrate_demo(pool).await?;
    {
        let mut c = pool.get().await?;
        let tx = c.transaction().await?;
        rekey_common::keys::store::init(&tx, master, &settings.key_policy, &settings.actor).await?;
        tx.commit().await?;
    }
    pool.get()
        .await?
        .batch_execute(
            "TRUNCATE demo.users, demo.agents, demo.conversations, demo.plaintext_digests",
        )
        .await?;
    let ring = Arc::new(rekey_common::keys::store::load_ring(&**pool.get().await?, master).await?);
    let report = self::seed(
        pool,
        ring,
        &SeedOptions {
            rows,
            seed,
            ..Default::default()
        },
    )
    .await?;
    vacuum(pool).await?;
    Ok(report)
}

/// `VACUUM ANALYZE` of each demo table, one statement each: several in one message would
/// run as one transaction, and VACUUM refuses that.
pub async fn vacuum(pool: &Pool) -> anyhow::Result<()> {
    let c = pool.get().await?;
    for t in ["demo.users", "demo.agents", "demo.conversations"] {
        c.batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .with_context(|| format!("vacuum {t}"))?;
    }
    Ok(())
}
