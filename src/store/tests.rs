use super::*;

/// A file root creates in the state directory goes to the directory's
/// owner (the service user), who could not open it otherwise. Not as
/// root, nothing can be given away and nothing is.
#[test]
fn files_root_creates_go_to_the_directory_owner() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let root = rustix::process::geteuid().is_root();
    if root {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    }
    let file = dir.path().join("daemon.lock");
    std::fs::write(&file, b"").unwrap();
    let mine = std::fs::metadata(&file).unwrap().uid();
    adopt(&file, dir.path()).unwrap();
    let now = std::fs::metadata(&file).unwrap().uid();
    if root {
        assert_eq!(now, 65534);
    } else {
        assert_eq!(now, mine);
    }
}
use std::os::unix::fs::PermissionsExt;

fn change(group: &str, user: &str) -> Change {
    Change {
        group: group.into(),
        user_id: user.into(),
        source: 1,
        kind: ChangeKind::User,
    }
}

#[test]
fn files_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let store = Store::open(&dir).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(store.path()), 0o600);
    // Re-opening tightens a directory someone loosened.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(store);
    Store::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

#[test]
fn garbage_is_reported_not_reset() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(DB_FILE), vec![0x42; 8192]).unwrap();
    let err = Store::open(tmp.path()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("state.db"), "{text}");
    assert!(text.contains("will not reset"), "{text}");
    // The file is untouched.
    assert_eq!(
        std::fs::read(tmp.path().join(DB_FILE)).unwrap(),
        vec![0x42; 8192]
    );
}

/// Started on a full disk, the daemon said the state database "cannot
/// be used … move it aside", for a good file: the disk's errors now
/// say the disk failed and the file is kept.
#[test]
fn a_failing_disk_is_not_a_damaged_file() {
    use rusqlite::ffi;
    let failure = |code: i32| {
        let e = rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
        open_error(Path::new("/s/state.db"), &e).to_string()
    };
    for code in [
        ffi::SQLITE_IOERR_SHMSIZE,
        ffi::SQLITE_FULL,
        ffi::SQLITE_READONLY,
    ] {
        let text = failure(code);
        assert!(
            text.contains("cannot be opened") && text.contains("not the file"),
            "{text}"
        );
        assert!(!text.contains("aside"), "{text}");
    }
    for code in [ffi::SQLITE_CORRUPT, ffi::SQLITE_NOTADB] {
        let text = failure(code);
        assert!(
            text.contains("cannot be used") && text.contains("move it aside"),
            "{text}"
        );
    }
}

#[test]
fn trails_are_kept_per_device_until_cleared_or_replaced_by_an_import() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let conn = store.lock();
    set_checkpoint_anchored(&conn, 1, 12, Some("t/2000/0/u")).unwrap();
    add_to_trail(&conn, 1, 11, Some("t/1000/0/")).unwrap();
    add_to_trail(&conn, 1, 10, None).unwrap();
    add_to_trail(&conn, 2, 5, Some("x")).unwrap();
    let all = trails(&conn).unwrap();
    assert_eq!(all[&1], vec![(10, None), (11, Some("t/1000/0/".into()))]);
    clear_trail(&conn, 1).unwrap();
    assert!(!trails(&conn).unwrap().contains_key(&1));
    // An imported checkpoint starts without a trail.
    set_checkpoint(&conn, 2, 40).unwrap();
    assert!(trails(&conn).unwrap().is_empty());
}

/// Migration 7 keeps the member that showed changedOnDevice under the
/// group-wide table, now one row per member.
#[test]
fn member_echo_is_keyed_by_member_after_migration_7() {
    let mut conn = Connection::open_in_memory().unwrap();
    for (i, sql) in MIGRATIONS.iter().take(6).enumerate() {
        conn.execute_batch(sql).unwrap();
        conn.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
            .unwrap();
    }
    conn.execute(
        "INSERT INTO member_echo (grp, device_id, seen_at) VALUES ('g', 2, 5)",
        [],
    )
    .unwrap();
    migrate(&mut conn, Path::new("mem"), Schema::Upgrade).unwrap();
    assert_eq!(multi::echo_observed(&conn, "g").unwrap(), vec![(2, 5)]);
    conn.execute(
        "INSERT INTO member_echo (grp, device_id, seen_at) VALUES ('g', 3, 6)",
        [],
    )
    .unwrap();
    assert_eq!(
        multi::echo_observed(&conn, "g").unwrap(),
        vec![(2, 5), (3, 6)]
    );
}

/// Migration 8 turns each counted own write into a row of its own.
#[test]
fn own_writes_are_one_row_each_after_migration_8() {
    let mut conn = Connection::open_in_memory().unwrap();
    for (i, sql) in MIGRATIONS.iter().take(7).enumerate() {
        conn.execute_batch(sql).unwrap();
        conn.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
            .unwrap();
    }
    let later = now() + 600;
    conn.execute(
        "INSERT INTO own_write (grp, device_id, user_id, op, pending, expires_at)
             VALUES ('g', 1, 'u', 0, 3, ?1), ('g', 2, 'v', 1, 1, ?1)",
        [later],
    )
    .unwrap();
    migrate(&mut conn, Path::new("mem"), Schema::Upgrade).unwrap();
    assert_eq!(multi::own_writes_expected(&conn, "g").unwrap(), 4);
}

#[test]
fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    store
        .lock()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    drop(store);
    let before = std::fs::read(tmp.path().join(DB_FILE)).unwrap();
    let err = Store::open(tmp.path()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("schema version 99"), "{text}");
    assert!(text.contains("newer usersync"), "{text}");
    assert!(text.contains("move the file aside"), "{text}");
    assert_eq!(std::fs::read(tmp.path().join(DB_FILE)).unwrap(), before);
}

/// SQLite's integrity report has a line of its own before each
/// problem; the error said only that line ("*** in database main
/// ***") and put the advice lines below. Now it is one line that says
/// what is wrong and what to do.
#[test]
fn damage_is_said_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    for d in 1..2000 {
        store.set_checkpoint(d, d * 7).unwrap();
    }
    drop(store);
    let path = tmp.path().join(DB_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    let at = bytes.len() / 2 / page * page;
    use rand::{RngCore, SeedableRng};
    rand::rngs::StdRng::seed_from_u64(0x5EED).fill_bytes(&mut bytes[at..at + page]);
    std::fs::write(&path, &bytes).unwrap();
    let text = Store::open(tmp.path()).unwrap_err().to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("cannot be used: "), "{text}");
    assert!(!text.contains("***"), "{text}");
    assert!(text.contains("move it aside"), "{text}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn journal_compacts_and_sequences_increase() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    {
        let mut conn = store.lock();
        let tx = conn.transaction().unwrap();
        assert_eq!(record_change(&tx, &change("g", "a")).unwrap(), 1);
        assert_eq!(record_change(&tx, &change("g", "b")).unwrap(), 2);
        assert_eq!(record_change(&tx, &change("g", "a")).unwrap(), 3);
        assert_eq!(record_change(&tx, &change("h", "a")).unwrap(), 1);
        tx.commit().unwrap();
    }
    let rows = store.journal("g").unwrap();
    let ids: Vec<(u64, &str)> = rows.iter().map(|r| (r.seq, r.user_id.as_str())).collect();
    assert_eq!(ids, vec![(2, "b"), (3, "a")]);
    assert_eq!(store.head("g").unwrap(), 3);
    let conn = store.lock();
    advance_cursor(&conn, "g", 7, 3).unwrap();
    advance_cursor(&conn, "g", 7, 2).unwrap();
    assert_eq!(
        cursors(&conn, "g").unwrap()[&7],
        3,
        "cursors never move back"
    );
    assert_eq!(journal_after(&conn, "g", 2, 10).unwrap().len(), 1);
}

#[test]
fn reconcile_requests_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    store
        .request_reconcile("g", 5, "first start", false)
        .unwrap();
    let first = store.reconcile_requests().unwrap()[0].generation;
    reconcile_progress(&store.lock(), "g", 5, first, "u100").unwrap();
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    let req = &store.reconcile_requests().unwrap()[0];
    assert_eq!(req.after_user.as_deref(), Some("u100"));
    // A new request restarts it; the old run can neither record its
    // progress over it nor end it.
    store.request_reconcile("g", 5, "again", true).unwrap();
    let req = store.reconcile_requests().unwrap()[0].clone();
    assert_eq!((req.after_user.as_deref(), req.prune), (None, true));
    assert_ne!(req.generation, first);
    reconcile_progress(&store.lock(), "g", 5, first, "u200").unwrap();
    reconcile_done(&store.lock(), "g", 5, first).unwrap();
    let still = &store.reconcile_requests().unwrap()[0];
    assert_eq!(still.after_user, None);
    reconcile_done(&store.lock(), "g", 5, req.generation).unwrap();
    assert!(store.reconcile_requests().unwrap().is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Record(bool, u8),
    Advance(bool, u8, u64),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (any::<bool>(), 0u8..6).prop_map(|(g, u)| Op::Record(g, u)),
        (any::<bool>(), 0u8..3, 0u64..40).prop_map(|(g, t, s)| Op::Advance(g, t, s)),
    ]
}

proptest::proptest! {
    /// Against a model: per group, the journal holds each user once at
    /// the sequence number of its latest change; sequence numbers only
    /// grow; `journal_after(cursor)` is exactly the users changed after
    /// the cursor, in order; cursors never move back.
    #[test]
    fn journal_and_cursors_match_a_model(ops in proptest::collection::vec(op(), 0..80)) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let name = |g: bool| if g { "g" } else { "h" };
        let mut latest: BTreeMap<(&str, String), u64> = BTreeMap::new();
        let mut counter: BTreeMap<&str, u64> = BTreeMap::new();
        let mut model_cursors: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for op in ops {
            let mut conn = store.lock();
            match op {
                Op::Record(g, u) => {
                    let tx = conn.transaction().unwrap();
                    let seq = record_change(&tx, &change(name(g), &format!("u{u}"))).unwrap();
                    tx.commit().unwrap();
                    let c = counter.entry(name(g)).or_insert(0);
                    *c += 1;
                    proptest::prop_assert_eq!(seq, *c);
                    latest.insert((name(g), format!("u{u}")), seq);
                }
                Op::Advance(g, t, s) => {
                    advance_cursor(&conn, name(g), u32::from(t), s).unwrap();
                    let m = model_cursors.entry((name(g), u32::from(t))).or_insert(0);
                    *m = (*m).max(s);
                }
            }
        }
        for g in ["g", "h"] {
            let conn = store.lock();
            for cursor in 0..=counter.get(g).copied().unwrap_or(0) {
                let got: Vec<(u64, String)> = journal_after(&conn, g, cursor, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.seq, r.user_id))
                    .collect();
                let mut want: Vec<(u64, String)> = latest
                    .iter()
                    .filter(|((gg, _), s)| *gg == g && **s > cursor)
                    .map(|((_, u), s)| (*s, u.clone()))
                    .collect();
                want.sort();
                proptest::prop_assert_eq!(got, want);
            }
            let cs = cursors(&conn, g).unwrap();
            for ((gg, t), s) in &model_cursors {
                if *gg == g {
                    proptest::prop_assert_eq!(cs.get(t).copied(), Some(*s));
                }
            }
        }
    }
}
