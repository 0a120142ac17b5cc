//! Pure planning of the sync engine: which targets move together, which
//! journal rows go in one batch, and how records split into Multi calls
//! bounded by count and bytes.

use std::collections::BTreeMap;

use crate::store::{ChangeKind, JournalRow};

/// The next cohort: eligible targets below `head` at the same cursor move
/// together in one Multi call. Cohorts take turns: the one at the lowest
/// cursor above `after` (where the cohort served last moved to), else the
/// lowest. So a
/// target replaying a long backlog shares the applier with the targets
/// that only need the newest changes. Returns (cursor, targets).
pub fn cohort(
    cursors: &BTreeMap<u32, u64>,
    eligible: &[u32],
    head: u64,
    after: Option<u64>,
) -> Option<(u64, Vec<u32>)> {
    let behind: Vec<(u32, u64)> = eligible
        .iter()
        .filter_map(|t| cursors.get(t).map(|c| (*t, *c)))
        .filter(|(_, c)| *c < head)
        .collect();
    let next = after.and_then(|a| behind.iter().map(|(_, c)| *c).filter(|c| *c > a).min());
    let pick = next.or_else(|| behind.iter().map(|(_, c)| *c).min())?;
    let mut targets: Vec<u32> = behind
        .into_iter()
        .filter(|(_, c)| *c == pick)
        .map(|(t, _)| t)
        .collect();
    targets.sort_unstable();
    Some((pick, targets))
}

/// What one batch does: either a delete-all barrier alone, or user rows up
/// to (not including) the next barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    DeleteAll(JournalRow),
    Users(Vec<JournalRow>),
}

/// Cuts `rows` (ascending by seq) into the next batch.
pub fn next_batch(rows: Vec<JournalRow>) -> Option<Batch> {
    let first = rows.first()?;
    if first.kind == ChangeKind::DeleteAll {
        return rows.into_iter().next().map(Batch::DeleteAll);
    }
    Some(Batch::Users(
        rows.into_iter()
            .take_while(|r| r.kind == ChangeKind::User)
            .collect(),
    ))
}

/// Splits items into consecutive chunks of at most `max_items` and at most
/// `max_bytes` (a single item larger than `max_bytes` travels alone).
pub fn chunks<T>(
    items: Vec<T>,
    size: impl Fn(&T) -> usize,
    max_items: usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let s = size(&item);
        if !cur.is_empty() && (cur.len() >= max_items.max(1) || bytes.saturating_add(s) > max_bytes)
        {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes = bytes.saturating_add(s);
        cur.push(item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(seq: u64, kind: ChangeKind) -> JournalRow {
        JournalRow {
            seq,
            user_id: format!("u{seq}"),
            source: 1,
            kind,
        }
    }

    #[test]
    fn cohort_is_the_slowest_behind_head() {
        let cursors: BTreeMap<u32, u64> = [(1, 5), (2, 3), (3, 3), (4, 9)].into();
        assert_eq!(
            cohort(&cursors, &[1, 2, 3, 4], 9, None),
            Some((3, vec![2, 3]))
        );
        assert_eq!(cohort(&cursors, &[1, 4], 9, None), Some((5, vec![1])));
        assert_eq!(cohort(&cursors, &[4], 9, None), None, "caught up");
        assert_eq!(cohort(&cursors, &[7], 9, None), None, "no cursor");
    }

    #[test]
    fn cohorts_take_turns() {
        // Target 1 replays a long backlog; 2 and 3 need only the newest.
        let cursors: BTreeMap<u32, u64> = [(1, 10), (2, 9_990), (3, 9_990)].into();
        let all = [1, 2, 3];
        assert_eq!(cohort(&cursors, &all, 10_000, None), Some((10, vec![1])));
        assert_eq!(
            cohort(&cursors, &all, 10_000, Some(10)),
            Some((9_990, vec![2, 3]))
        );
        // After the last cohort, back to the lowest.
        assert_eq!(
            cohort(&cursors, &all, 10_000, Some(9_990)),
            Some((10, vec![1]))
        );
    }

    #[test]
    fn batches_stop_at_delete_all() {
        let rows = vec![
            row(1, ChangeKind::User),
            row(2, ChangeKind::User),
            row(3, ChangeKind::DeleteAll),
            row(4, ChangeKind::User),
        ];
        assert_eq!(
            next_batch(rows.clone()),
            Some(Batch::Users(rows[..2].to_vec()))
        );
        assert_eq!(
            next_batch(rows[2..].to_vec()),
            Some(Batch::DeleteAll(rows[2].clone()))
        );
        assert_eq!(next_batch(vec![]), None);
    }

    proptest! {
        /// Chunking keeps every item once, in order, and within bounds.
        #[test]
        fn chunks_keep_order_and_bounds(
            sizes in proptest::collection::vec(0usize..5000, 0..200),
            max_items in 1usize..20,
            max_bytes in 1usize..20000,
        ) {
            let items: Vec<(usize, usize)> = sizes.iter().copied().enumerate().collect();
            let out = chunks(items.clone(), |(_, s)| *s, max_items, max_bytes);
            let flat: Vec<(usize, usize)> = out.iter().flatten().copied().collect();
            prop_assert_eq!(flat, items);
            for c in &out {
                prop_assert!(!c.is_empty());
                prop_assert!(c.len() <= max_items);
                let bytes: usize = c.iter().map(|(_, s)| *s).sum();
                prop_assert!(bytes <= max_bytes || c.len() == 1);
            }
        }

        /// The cohort is exactly the eligible targets at the lowest cursor
        /// below head that is above the last one served, else at the
        /// lowest (checked against a direct model).
        #[test]
        fn cohort_matches_model(
            cursors in proptest::collection::btree_map(0u32..10, 0u64..20, 0..10),
            eligible in proptest::collection::vec(0u32..12, 0..12),
            head in 0u64..25,
            after in proptest::option::of(0u64..25),
        ) {
            let got = cohort(&cursors, &eligible, head, after);
            let behind: Vec<u32> = eligible.iter().copied()
                .filter(|t| cursors.get(t).is_some_and(|c| *c < head)).collect();
            let above = after.and_then(|a| behind.iter().map(|t| cursors[t]).filter(|c| *c > a).min());
            match above.or_else(|| behind.iter().map(|t| cursors[t]).min()) {
                None => prop_assert_eq!(got, None),
                Some(min) => {
                    let mut expect: Vec<u32> = behind.into_iter().filter(|t| cursors[t] == min).collect();
                    expect.sort_unstable();
                    expect.dedup();
                    let (c, mut ts) = got.unwrap();
                    ts.dedup();
                    prop_assert_eq!(c, min);
                    prop_assert_eq!(ts, expect);
                }
            }
        }
    }
}
