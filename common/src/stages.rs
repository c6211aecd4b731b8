//! Stages: a record belongs to a stage by a seeded hash of its primary key, so that the 1%
//! canary is a uniform random sample of every table and the stages are nested
//! (1% ⊂ 25% ⊂ 50% ⊂ 75% ⊂ 100%). The bucket is computed in SQL, where the rows are.

/// Buckets per table: a stage of p percent holds buckets `[0, p * 100)`.
pub const BUCKETS: i32 = 10_000;

/// The SQL expression giving a row's bucket in `[0, 10000)` for id column `id_sql` and the
/// run's seed as parameter `seed_param` (e.g. `$4`).
pub fn bucket_sql(id_sql: &str, seed_param: &str) -> String {
    format!(
        "((hashint8extended({id_sql}, {seed_param}::int8) % {BUCKETS}) + {BUCKETS}) % {BUCKETS}"
    )
}

/// The bucket range `[lo, hi)` of stage `stage_no` given the run's cumulative percentages.
pub fn bucket_range(stages: &[i32], stage_no: i32) -> Option<(i32, i32)> {
    let i = usize::try_from(stage_no).ok()?;
    let hi = *stages.get(i)? * 100;
    let lo = if i == 0 { 0 } else { stages[i - 1] * 100 };
    Some((lo, hi))
}

/// Checks a `--stages` list: strictly increasing percentages ending at 100.
pub fn validate(stages: &[i32]) -> Result<(), String> {
    if stages.is_empty() {
        return Err("no stages given".into());
    }
    if stages.iter().any(|&p| !(1..=100).contains(&p)) {
        return Err("every stage must be a percentage from 1 to 100".into());
    }
    if stages.windows(2).any(|w| w[0] >= w[1]) {
        return Err("stages must be strictly increasing (e.g. 1,25,50,75,100)".into());
    }
    if *stages.last().expect("non-empty") != 100 {
        return Err("the last stage must be 100".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_ranges_are_nested_and_cover_everything() {
        let s = [1, 25, 50, 75, 100];
        assert_eq!(bucket_range(&s, 0), Some((0, 100)));
        assert_eq!(bucket_range(&s, 1), Some((100, 2500)));
        assert_eq!(bucket_range(&s, 4), Some((7500, 10000)));
        assert_eq!(bucket_range(&s, 5), None);
        assert!(validate(&s).is_ok());
        assert!(validate(&[50, 25, 100]).is_err());
        assert!(validate(&[1, 50]).is_err());
    }
}
