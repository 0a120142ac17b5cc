//! The durable state: one SQLite database (WAL, `synchronous=FULL`, mode
//! 0600 in a 0700 directory) holding per-device checkpoints (with their
//! trails: the events realtime moved them past, until a read verifies
//! them), the compacted change journal, target cursors, quarantine,
//! reconcile requests and device status for the CLI.
//!
//! Every step that advances a checkpoint or a cursor commits in the same
//! transaction as what it covers. The store holds user IDs, never user
//! records: no template, PIN or photo is ever written here.
//!
//! The state directory also holds the daemon lock ([`try_lock`]): one daemon
//! per state directory, and operator commands that write state act only
//! while they hold it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

mod lock;
pub use lock::{LOCK_FILE, try_lock};
pub mod multi;

pub const DB_FILE: &str = "state.db";
/// Schema version written in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state database {path} cannot be used: {reason}. The daemon will not reset it by itself; \
         move it aside (the next start rebuilds state with a full reconcile) or restore a backup"
    )]
    Unusable { path: PathBuf, reason: String },
    /// The disk or filesystem failed, not the file: it may pass.
    #[error(
        "state database {path} cannot be opened: {reason}. The disk or the filesystem failed (full? \
         read-only? an I/O error?), not the file, which is kept as it is: free space or repair the \
         filesystem; systemd starts the daemon again"
    )]
    Unavailable { path: PathBuf, reason: String },
    #[error(
        "state database {path} was written by a newer usersync (schema version {version}; this one \
         knows {known}) and cannot be used: run that version again, or move the file aside (the next \
         start rebuilds state with a full reconcile). The daemon never downgrades it by itself"
    )]
    Newer {
        path: PathBuf,
        version: i64,
        known: i64,
    },
    #[error(
        "state database {path} has schema version {version}, this usersync needs {known}: the daemon \
         upgrades it when it starts (`systemctl restart usersync`); operator commands never do"
    )]
    Outdated {
        path: PathBuf,
        version: i64,
        known: i64,
    },
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon lock cannot be opened or taken (not: another holds it).
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database task failed: {0}")]
    Task(String),
    #[error("state database holds a value this usersync cannot read: {0}")]
    Invalid(String),
}

/// What a journal row asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// User changed (enrolled, updated or deleted): apply its current state.
    User,
    /// Every user deleted at the source.
    DeleteAll,
    /// A reconcile with prune found the user on the target and at no
    /// source (pending lane only): deleted unless a source holds it now.
    Prune,
    /// A user event at a member of a multi-master group: ordered into the
    /// user's register ([`multi::record`]), not stored with this kind.
    Member(multi::MemberEvent),
}

/// A change to record in a group's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub group: String,
    /// Empty for [`ChangeKind::DeleteAll`].
    pub user_id: String,
    pub source: u32,
    pub kind: ChangeKind,
}

/// One row of a group's compacted journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    pub seq: u64,
    pub user_id: String,
    pub source: u32,
    pub kind: ChangeKind,
}

/// A request to reconcile one target of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileRequest {
    pub group: String,
    pub target: u32,
    pub reason: String,
    pub prune: bool,
    /// Resume point: users up to this ID (in sorted order) are done.
    pub after_user: Option<String>,
    /// Which request this is (a new one for the same target bumps it).
    pub generation: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub group: String,
    pub device: u32,
    pub user_id: String,
    pub seq: u64,
    pub code: String,
    pub message: String,
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatusRow {
    pub device: u32,
    pub state: String,
    pub detail: String,
    pub updated_at: u64,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn kind_code(k: ChangeKind) -> i64 {
    match k {
        ChangeKind::User => 0,
        ChangeKind::DeleteAll => 1,
        ChangeKind::Prune => 2,
        // Stored as a user row with its register's columns (`multi`).
        ChangeKind::Member(_) => 0,
    }
}

/// A stored kind code; one this version does not know is an error (a
/// row written by a newer version), never taken for a user change.
fn kind_of(code: i64) -> rusqlite::Result<ChangeKind> {
    match code {
        0 => Ok(ChangeKind::User),
        1 => Ok(ChangeKind::DeleteAll),
        2 => Ok(ChangeKind::Prune),
        other => Err(rusqlite::Error::IntegralValueOutOfRange(0, other)),
    }
}

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE checkpoint (
        device_id  INTEGER PRIMARY KEY,
        event_id   INTEGER NOT NULL,
        -- What the checkpoint event looked like, to notice a log that was
        -- reset and refilled past the checkpoint (IDs restart, WIRE.md §5.5).
        anchor     TEXT,
        -- The newest event ID seen on the device (for the lag).
        newest     INTEGER,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE journal (
        grp         TEXT    NOT NULL,
        user_id     TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        source      INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL,
        PRIMARY KEY (grp, user_id)
    );
    CREATE INDEX journal_by_seq ON journal (grp, seq);
    CREATE TABLE cursor (
        grp       TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    CREATE TABLE quarantine (
        grp       TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        user_id   TEXT    NOT NULL,
        seq       INTEGER NOT NULL,
        code      TEXT    NOT NULL,
        message   TEXT    NOT NULL,
        since     INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id, user_id)
    );
    CREATE TABLE reconcile (
        grp          TEXT    NOT NULL,
        device_id    INTEGER NOT NULL,
        reason       TEXT    NOT NULL,
        prune        INTEGER NOT NULL,
        after_user   TEXT,
        requested_at INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    -- Users a reconcile found missing or different on one target; applied
    -- to that target alone, then removed.
    CREATE TABLE pending (
        grp       TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        user_id   TEXT    NOT NULL,
        source    INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id, user_id)
    );
    CREATE TABLE device_status (
        device_id  INTEGER PRIMARY KEY,
        state      TEXT    NOT NULL,
        detail     TEXT    NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE group_status (
        grp        TEXT PRIMARY KEY,
        diverged   TEXT,
        updated_at INTEGER NOT NULL
    );
    ",
    // 2: progress of the search for a device's newest event (first sight),
    // so a restart resumes it.
    "
    CREATE TABLE log_search (
        device_id INTEGER PRIMARY KEY,
        low       INTEGER NOT NULL,
        high      INTEGER NOT NULL
    );
    ",
    // 3: the sources and targets each group had when its applier last ran,
    // to notice a source added (its users need a reconcile), a target
    // removed (its cursor is stale) and a group removed (its state goes).
    "
    CREATE TABLE group_members (
        grp     TEXT PRIMARY KEY,
        sources TEXT NOT NULL,
        targets TEXT NOT NULL
    );
    ",
    // 4: users changed at a target itself (drift, until a reconcile of the
    // target), and the last result of each target's reconcile.
    "
    CREATE TABLE target_drift (
        grp        TEXT    NOT NULL,
        device_id  INTEGER NOT NULL,
        changes    INTEGER NOT NULL,
        last_user  TEXT    NOT NULL,
        last_at    INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    ALTER TABLE pending ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
    -- Bumped by every request, so a reconcile that was running when a new
    -- request came neither records its progress over it nor deletes it.
    ALTER TABLE reconcile ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE reconcile_result (
        grp         TEXT    NOT NULL,
        device_id   INTEGER NOT NULL,
        reason      TEXT    NOT NULL,
        finished_at INTEGER NOT NULL,
        missing     INTEGER NOT NULL,
        different   INTEGER NOT NULL,
        extra       INTEGER NOT NULL,
        pruned      INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    ",
    // 5: multi-master groups (`store::multi`). A user's journal row is its
    // last-writer-wins register: the winning change's time (the event's,
    // bounded by the clock-skew rule), the member it was made at (`origin`,
    // the tiebreak) and whether it deleted the user (a tombstone). `source`
    // stays where the version is read (the origin, unless it lost it).
    // One-way rows leave `stamp` NULL.
    "
    ALTER TABLE journal ADD COLUMN stamp INTEGER;
    ALTER TABLE journal ADD COLUMN origin INTEGER;
    ALTER TABLE journal ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    -- Writes of the daemon to members still expected to come back as
    -- events (echo detection by own writes); bounded by time and count.
    CREATE TABLE own_write (
        grp        TEXT    NOT NULL,
        device_id  INTEGER NOT NULL,
        user_id    TEXT    NOT NULL,
        op         INTEGER NOT NULL,
        pending    INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id, user_id, op)
    );
    CREATE INDEX own_write_by_expiry ON own_write (expires_at);
    -- When the group first ran as multi-master: a delete older than
    -- that of a user with no recorded change is history (a log read
    -- again from its start), not a change.
    CREATE TABLE member_group (
        grp        TEXT PRIMARY KEY,
        started_at INTEGER NOT NULL
    );
    -- The member that first reported changedOnDevice, and when.
    CREATE TABLE member_echo (
        grp       TEXT PRIMARY KEY,
        device_id INTEGER NOT NULL,
        seen_at   INTEGER NOT NULL
    );
    -- Users whose versions differ between members with no history to
    -- decide (the last reconcile's findings).
    CREATE TABLE member_conflict (
        grp      TEXT    NOT NULL,
        user_id  TEXT    NOT NULL,
        detail   TEXT    NOT NULL,
        found_at INTEGER NOT NULL,
        PRIMARY KEY (grp, user_id)
    );
    -- Each device's clock against the daemon's (its realtime events).
    CREATE TABLE device_clock (
        device_id   INTEGER PRIMARY KEY,
        skew_secs   INTEGER NOT NULL,
        measured_at INTEGER NOT NULL
    );
    ",
    // 6: the trail of each checkpoint: the events realtime moved it past
    // since a read last found the log as expected, oldest first, written in
    // the transaction that moves the checkpoint. The next read (a restart's
    // catch-up too) must find each of them unchanged, so a log reset without
    // a reboot whose next event passed for the continuation is still seen
    // (WIRE.md §5.5).
    "
    CREATE TABLE checkpoint_trail (
        device_id INTEGER NOT NULL,
        event_id  INTEGER NOT NULL,
        anchor    TEXT,
        PRIMARY KEY (device_id, event_id)
    );
    ",
    // 7: echo detection `observe` decides per member: which members of a
    // group reported changedOnDevice, and when. A member whose firmware
    // never sets the flag stays on own writes (keyed by the group alone,
    // one member's flag made every other member's changes foreign).
    "
    CREATE TABLE member_echo_by_member (
        grp       TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        seen_at   INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    INSERT INTO member_echo_by_member (grp, device_id, seen_at)
        SELECT grp, device_id, seen_at FROM member_echo;
    DROP TABLE member_echo;
    ALTER TABLE member_echo_by_member RENAME TO member_echo;
    ",
    // 8: one row per own write expected, in the order they were made
    // (`seq`): an echo overtakes only the other operation's writes made
    // before it, not a later one still to come back (a count per operation
    // could not tell them apart). Counts carried over as that many rows.
    "
    CREATE TABLE own_write_each (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        grp        TEXT    NOT NULL,
        device_id  INTEGER NOT NULL,
        user_id    TEXT    NOT NULL,
        op         INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    WITH RECURSIVE n(i) AS (
        SELECT 1 UNION ALL
        SELECT i + 1 FROM n WHERE i < (SELECT COALESCE(MAX(pending), 0) FROM own_write)
    )
    INSERT INTO own_write_each (grp, device_id, user_id, op, expires_at)
        SELECT o.grp, o.device_id, o.user_id, o.op, o.expires_at
        FROM own_write o JOIN n ON n.i <= o.pending
        ORDER BY o.expires_at;
    DROP TABLE own_write;
    ALTER TABLE own_write_each RENAME TO own_write;
    CREATE INDEX own_write_by_user ON own_write (grp, device_id, user_id, op, seq);
    CREATE INDEX own_write_by_expiry ON own_write (expires_at);
    ",
];

/// The state store. Cheap to clone; calls run on the blocking pool.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Creates `dir` (0700) if missing and tightens it if it exists. The
/// daemon calls it before it takes the lock in `dir`, and takes the lock
/// before [`Store::open`].
pub fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Gives a file in the state directory to the directory's owner when root
/// created it (an operator's `sudo usersync reconcile`, say): the service
/// runs as the directory's owner and could not open a root-owned 0600 file.
pub fn adopt(path: &Path, dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let err = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    let owner = std::fs::metadata(dir).map_err(err)?;
    match std::fs::metadata(path) {
        Ok(m) if m.uid() != owner.uid() || m.gid() != owner.gid() => {
            std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).map_err(err)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Creates the database file with mode 0600 before SQLite opens it; SQLite
/// gives its -wal and -shm files the same mode.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and upgrades its
    /// schema. Only a holder of the daemon lock may call it: the daemon,
    /// or an operator command that found no daemon running. A file that is
    /// not a usable database is an error naming the file, never a silent
    /// reset.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_as(dir, Schema::Upgrade, Check::Now)
    }

    /// [`Store::open`] without the integrity check of every page (the
    /// daemon's start: it costs a read of the whole file, 60–90 ms for
    /// 100,000 journal rows, before `READY=1`); the caller runs
    /// [`Store::check`] right after. A schema upgrade is never done on an
    /// unchecked file: then it is checked here.
    pub fn open_unchecked(dir: &Path) -> Result<Store, StoreError> {
        Store::open_as(dir, Schema::Upgrade, Check::Later)
    }

    /// The integrity check [`Store::open_unchecked`] left out.
    pub async fn check(&self) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.run(move |c| quick_check(c, &path)).await
    }

    fn open_as(dir: &Path, schema: Schema, check: Check) -> Result<Store, StoreError> {
        prepare_dir(dir)?;
        let path = dir.join(DB_FILE);
        prepare_file(&path)?;
        let unusable = |e: rusqlite::Error| open_error(&path, &e);
        let mut conn = Connection::open(&path).map_err(unusable)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(unusable)?;
        // Every statement is prepared once and kept: parsing SQL was 40 %
        // of the daemon's CPU when it replayed a long log.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let upgrade = schema_version(&conn).map_err(unusable)? < known_version();
        if check == Check::Now || upgrade {
            quick_check(&conn, &path)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unusable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unusable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unusable)?;
        migrate(&mut conn, &path, schema)?;
        for name in [
            DB_FILE,
            &format!("{DB_FILE}-wal"),
            &format!("{DB_FILE}-shm"),
        ] {
            adopt(&dir.join(name), dir)?;
        }
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// Opens the store of a daemon that has run before, maybe running now
    /// (operator commands): a missing database is an error, not created,
    /// and an older schema is an error, not upgraded (the daemon does that
    /// when it starts, holding its lock).
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        let exists = path.try_exists().map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        if !exists {
            return Err(StoreError::Unusable {
                reason: "it does not exist yet (has the daemon ever run with this configuration?)"
                    .into(),
                path,
            });
        }
        Store::open_as(dir, Schema::Require, Check::Now)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection, here and now (operator commands).
    pub fn with<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        f(&mut self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the blocking pool with the connection.
    pub async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    // ---- synchronous API (tests, CLI) ----------------------------------

    pub fn checkpoints(&self) -> Result<BTreeMap<u32, u32>, StoreError> {
        checkpoints(&self.lock())
    }

    pub fn checkpoint(&self, device: u32) -> Result<Option<u32>, StoreError> {
        checkpoint(&self.lock(), device)
    }

    pub fn journal(&self, group: &str) -> Result<Vec<JournalRow>, StoreError> {
        journal_after(&self.lock(), group, 0, usize::MAX)
    }

    pub fn cursors(&self, group: &str) -> Result<BTreeMap<u32, u64>, StoreError> {
        cursors(&self.lock(), group)
    }

    pub fn head(&self, group: &str) -> Result<u64, StoreError> {
        head(&self.lock(), group)
    }

    pub fn quarantine(&self) -> Result<Vec<QuarantineEntry>, StoreError> {
        quarantine(&self.lock())
    }

    pub fn reconcile_requests(&self) -> Result<Vec<ReconcileRequest>, StoreError> {
        reconcile_requests(&self.lock())
    }

    pub fn device_statuses(&self) -> Result<Vec<DeviceStatusRow>, StoreError> {
        device_statuses(&self.lock())
    }

    pub fn diverged(&self) -> Result<BTreeMap<String, String>, StoreError> {
        diverged(&self.lock())
    }

    /// Asks for a reconcile of `target` in `group` (restarting one that is
    /// under way).
    pub fn request_reconcile(
        &self,
        group: &str,
        target: u32,
        reason: &str,
        prune: bool,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        request_reconcile(&conn, group, target, reason, prune)?;
        Ok(())
    }

    /// Seeds a checkpoint (import of another tool's state).
    pub fn set_checkpoint(&self, device: u32, event_id: u32) -> Result<(), StoreError> {
        let conn = self.lock();
        set_checkpoint(&conn, device, event_id)
    }
}

/// Why a database could not be opened: the file's fault (damaged, not a
/// database: [`StoreError::Unusable`]) or the disk's (full, read-only, an
/// I/O error, locked: [`StoreError::Unavailable`], which may pass). A full
/// disk answers "disk I/O error" when SQLite sizes its -shm file: that is
/// no reason to move a good file aside.
fn open_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    let (path, reason) = (path.to_owned(), e.to_string());
    match e.sqlite_error_code() {
        Some(
            SystemIoFailure
            | DiskFull
            | CannotOpen
            | ReadOnly
            | PermissionDenied
            | DatabaseBusy
            | DatabaseLocked
            | OutOfMemory
            | FileLockingProtocolFailed,
        ) => StoreError::Unavailable { path, reason },
        _ => StoreError::Unusable { path, reason },
    }
}

/// Statements kept prepared per connection (the daemon uses about 40).
const STATEMENT_CACHE: usize = 64;

/// When opening checks the integrity of every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Now,
    /// The caller runs [`Store::check`] itself.
    Later,
}

fn schema_version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn known_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// `PRAGMA quick_check`: a file that is not a usable database is an error
/// naming it, never a silent reset.
fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // One row per problem, each maybe several lines: the first few, on one
    // line, so the error's first line says what is wrong.
    let problems: Vec<String> = conn
        .prepare("PRAGMA quick_check(3)")
        .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| open_error(path, &e))?;
    if problems != ["ok"] {
        let said = problems
            .join(" ")
            .replace("*** in database main ***", "")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        return Err(StoreError::Unusable {
            path: path.to_owned(),
            reason: format!("integrity check failed: {said}"),
        });
    }
    Ok(())
}

/// Whether opening may upgrade the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    /// The caller holds the daemon lock.
    Upgrade,
    /// A daemon may be running on it: the schema must be current already.
    Require,
}

fn migrate(conn: &mut Connection, path: &Path, schema: Schema) -> Result<(), StoreError> {
    let version = schema_version(conn)?;
    let known = known_version();
    if version > known {
        return Err(StoreError::Newer {
            path: path.to_owned(),
            version,
            known,
        });
    }
    if version < known && schema == Schema::Require {
        return Err(StoreError::Outdated {
            path: path.to_owned(),
            version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(0))?;
        tx.commit()?;
    }
    Ok(())
}

// ---- queries, usable inside a transaction -----------------------------------

pub fn checkpoints(conn: &Connection) -> Result<BTreeMap<u32, u32>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, event_id FROM checkpoint")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn checkpoint(conn: &Connection, device: u32) -> Result<Option<u32>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT event_id FROM checkpoint WHERE device_id = ?1")?
        .query_row([i64::from(device)], |r| r.get::<_, u32>(0))
        .optional()?)
}

/// Seeds a checkpoint without an anchor (import); any trail it had is
/// dropped, as it led to another checkpoint.
pub fn set_checkpoint(conn: &Connection, device: u32, event_id: u32) -> Result<(), StoreError> {
    clear_trail(conn, device)?;
    set_checkpoint_anchored(conn, device, event_id, None)
}

/// One event of a checkpoint trail: (event, anchor).
pub type TrailRow = (u32, Option<String>);

/// Every device's checkpoint trail, oldest first.
pub fn trails(conn: &Connection) -> Result<BTreeMap<u32, Vec<TrailRow>>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT device_id, event_id, anchor FROM checkpoint_trail ORDER BY device_id, event_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?, r.get(2)?))
    })?;
    let mut out: BTreeMap<u32, Vec<TrailRow>> = BTreeMap::new();
    for row in rows {
        let (device, event, anchor) = row?;
        out.entry(device).or_default().push((event, anchor));
    }
    Ok(out)
}

/// Adds an event to a device's checkpoint trail.
pub fn add_to_trail(
    conn: &Connection,
    device: u32,
    event_id: u32,
    anchor: Option<&str>,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO checkpoint_trail (device_id, event_id, anchor) VALUES (?1, ?2, ?3)",
        params![i64::from(device), i64::from(event_id), anchor],
    )?;
    Ok(())
}

/// Empties a device's checkpoint trail (a read found the log as expected).
pub fn clear_trail(conn: &Connection, device: u32) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM checkpoint_trail WHERE device_id = ?1",
        [i64::from(device)],
    )?;
    Ok(())
}

pub fn set_checkpoint_anchored(
    conn: &Connection,
    device: u32,
    event_id: u32,
    anchor: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO checkpoint (device_id, event_id, anchor, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device_id) DO UPDATE SET event_id = ?2, anchor = ?3, updated_at = ?4",
    )?
    .execute(params![
        i64::from(device),
        i64::from(event_id),
        anchor,
        now()
    ])?;
    Ok(())
}

/// The progress of the search for a device's newest event: (newest event
/// known, an ID known to be past the newest).
pub fn log_search(conn: &Connection, device: u32) -> Result<Option<(u32, u64)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT low, high FROM log_search WHERE device_id = ?1")?
        .query_row([i64::from(device)], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?))
        })
        .optional()?)
}

pub fn set_log_search(
    conn: &Connection,
    device: u32,
    low: u32,
    high: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO log_search (device_id, low, high) VALUES (?1, ?2, ?3)
         ON CONFLICT (device_id) DO UPDATE SET low = ?2, high = ?3",
    )?
    .execute(params![
        i64::from(device),
        i64::from(low),
        i64::try_from(high).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

pub fn clear_log_search(conn: &Connection, device: u32) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM log_search WHERE device_id = ?1")?
        .execute([i64::from(device)])?;
    Ok(())
}

/// Records the newest event ID seen on a device.
pub fn set_newest(conn: &Connection, device: u32, newest: u32) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE checkpoint SET newest = MAX(COALESCE(newest, 0), ?2) WHERE device_id = ?1",
    )?
    .execute(params![i64::from(device), i64::from(newest)])?;
    Ok(())
}

/// A device's checkpoint row: (checkpoint, newest seen, updated_at).
pub type CheckpointRow = (u32, Option<u32>, u64);

/// Per device: its checkpoint row.
pub fn checkpoint_rows(conn: &Connection) -> Result<BTreeMap<u32, CheckpointRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT device_id, event_id, newest, updated_at FROM checkpoint")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, u32>(0)?,
            (
                r.get::<_, u32>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, u64>(3)?,
            ),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Checkpoints with their anchors.
pub fn anchored_checkpoints(
    conn: &Connection,
) -> Result<BTreeMap<u32, (u32, Option<String>)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, event_id, anchor FROM checkpoint")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, (r.get::<_, u32>(1)?, r.get(2)?)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn head(conn: &Connection, group: &str) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM journal WHERE grp = ?1")?
        .query_row([group], |r| r.get::<_, u64>(0))?)
}

/// Records a change, replacing the user's earlier row (compaction) with a
/// new, higher sequence number. Returns the sequence number.
pub fn record_change(tx: &Transaction<'_>, change: &Change) -> Result<u64, StoreError> {
    if let ChangeKind::Member(ev) = &change.kind {
        // Ordered into the user's register: it may not win (older, or an
        // echo of the daemon's own write).
        return match multi::record(tx, change, ev)? {
            multi::Recorded::Won(seq) => Ok(seq),
            _ => head(tx, &change.group),
        };
    }
    let seq = head(tx, &change.group)? + 1;
    tx.prepare_cached(
        "INSERT INTO journal (grp, user_id, seq, source, kind, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (grp, user_id) DO UPDATE
         SET seq = ?3, source = ?4, kind = ?5, recorded_at = ?6,
             stamp = NULL, origin = NULL, deleted = 0",
    )?
    .execute(params![
        change.group,
        change.user_id,
        i64::try_from(seq).unwrap_or(i64::MAX),
        i64::from(change.source),
        kind_code(change.kind),
        now()
    ])?;
    Ok(seq)
}

pub fn journal_after(
    conn: &Connection,
    group: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<JournalRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, user_id, source, kind FROM journal
         WHERE grp = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            group,
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok(JournalRow {
                seq: r.get::<_, u64>(0)?,
                user_id: r.get(1)?,
                source: r.get::<_, u32>(2)?,
                kind: kind_of(r.get(3)?)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Journal rows not applied yet, summed over every target, plus rows
/// queued for single targets (the `pending` of the STATUS line): one
/// query, counted in SQLite, where [`backlog`] and [`pending_counts`] build
/// a map of every target every two seconds.
pub fn pending_total(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM cursor c JOIN journal j ON j.grp = c.grp AND j.seq > c.seq)
                  + (SELECT COUNT(*) FROM pending)",
        )?
        .query_row([], |r| r.get::<_, u64>(0))?)
}

/// Journal rows each target has not applied yet, per (group, target).
pub fn backlog(conn: &Connection) -> Result<BTreeMap<(String, u32), u64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.grp, c.device_id,
                (SELECT COUNT(*) FROM journal j WHERE j.grp = c.grp AND j.seq > c.seq)
         FROM cursor c",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(((r.get(0)?, r.get::<_, u32>(1)?), r.get::<_, u64>(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Queues `user` for `target` alone (reconcile).
pub fn add_pending(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
    source: u32,
) -> Result<(), StoreError> {
    add_pending_kind(conn, group, target, user, source, ChangeKind::User)
}

/// Queues a user for one target; `kind` is [`ChangeKind::User`] (apply
/// the source's state) or [`ChangeKind::Prune`].
pub fn add_pending_kind(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
    source: u32,
    kind: ChangeKind,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO pending (grp, device_id, user_id, source, kind) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (grp, device_id, user_id) DO UPDATE SET source = ?4, kind = ?5",
    )?
    .execute(params![
        group,
        i64::from(target),
        user,
        i64::from(source),
        kind_code(kind)
    ])?;
    Ok(())
}

/// Up to `limit` queued users of `target` whose source is one of
/// `sources`, as journal rows with seq 0.
pub fn pending(
    conn: &Connection,
    group: &str,
    target: u32,
    limit: usize,
    sources: &[u32],
) -> Result<Vec<JournalRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, source, kind FROM pending WHERE grp = ?1 AND device_id = ?2
         AND source IN (SELECT value FROM json_each(?4))
         ORDER BY user_id LIMIT ?3",
    )?;
    let sources = serde_json::to_string(sources).unwrap_or_else(|_| "[]".into());
    let rows = stmt.query_map(
        params![
            group,
            i64::from(target),
            i64::try_from(limit).unwrap_or(i64::MAX),
            sources
        ],
        |r| {
            Ok(JournalRow {
                seq: 0,
                user_id: r.get(0)?,
                source: r.get::<_, u32>(1)?,
                kind: kind_of(r.get(2)?)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A group's sources and targets as its applier last saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembers {
    pub sources: Vec<u32>,
    pub targets: Vec<u32>,
}

/// The sources and targets a group had when its applier last ran.
pub fn group_members(conn: &Connection, group: &str) -> Result<Option<GroupMembers>, StoreError> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT sources, targets FROM group_members WHERE grp = ?1")?
        .query_row([group], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((s, t)) = row else {
        return Ok(None);
    };
    let parse = |v: &str| -> Result<Vec<u32>, StoreError> {
        serde_json::from_str(v)
            .map_err(|e| StoreError::Invalid(format!("group_members of {group}: {e}")))
    };
    Ok(Some(GroupMembers {
        sources: parse(&s)?,
        targets: parse(&t)?,
    }))
}

pub fn set_group_members(
    conn: &Connection,
    group: &str,
    sources: &[u32],
    targets: &[u32],
) -> Result<(), StoreError> {
    let enc = |v: &[u32]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "INSERT INTO group_members (grp, sources, targets) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp) DO UPDATE SET sources = ?2, targets = ?3",
    )?
    .execute(params![group, enc(sources), enc(targets)])?;
    Ok(())
}

/// Every group some state is stored for.
pub fn stored_groups(conn: &Connection) -> Result<BTreeSet<String>, StoreError> {
    // Group by group, one index seek each (the key of every table starts
    // with `grp`): a UNION of the tables read every journal row, 10–45 ms
    // for 100,000 rows at each start.
    let mut groups = BTreeSet::new();
    for table in ["journal", "cursor", "pending", "reconcile", "group_members"] {
        let mut first = conn.prepare_cached(&format!("SELECT MIN(grp) FROM {table}"))?;
        let mut next =
            conn.prepare_cached(&format!("SELECT MIN(grp) FROM {table} WHERE grp > ?1"))?;
        let mut grp: Option<String> = first.query_row([], |r| r.get(0))?;
        while let Some(g) = grp {
            grp = next.query_row([&g], |r| r.get(0))?;
            groups.insert(g);
        }
    }
    Ok(groups)
}

/// Forgets a group that left the configuration: a group added later under
/// the same name starts afresh (with a full reconcile), never from stale
/// cursors.
pub fn drop_group(conn: &Connection, group: &str) -> Result<(), StoreError> {
    for table in [
        "journal",
        "cursor",
        "pending",
        "reconcile",
        "quarantine",
        "group_status",
        "group_members",
        "target_drift",
        "reconcile_result",
        "own_write",
        "member_group",
        "member_echo",
        "member_conflict",
    ] {
        conn.execute(&format!("DELETE FROM {table} WHERE grp = ?1"), [group])?;
    }
    Ok(())
}

/// Counts a user changed at a target itself.
pub fn record_target_change(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO target_drift (grp, device_id, changes, last_user, last_at)
         VALUES (?1, ?2, 1, ?3, ?4)
         ON CONFLICT (grp, device_id) DO UPDATE SET changes = changes + 1, last_user = ?3, last_at = ?4")?
        .execute(params![group, i64::from(target), user, now()])?;
    Ok(())
}

/// Users changed at a target itself since its last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetDrift {
    pub group: String,
    pub target: u32,
    pub changes: u64,
    pub last_user: String,
    pub last_at: u64,
}

pub fn target_drift(conn: &Connection) -> Result<Vec<TargetDrift>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, changes, last_user, last_at FROM target_drift ORDER BY grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TargetDrift {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            changes: r.get::<_, u64>(2)?,
            last_user: r.get(3)?,
            last_at: r.get::<_, u64>(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The outcome of a target's last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileResult {
    pub group: String,
    pub target: u32,
    pub reason: String,
    pub finished_at: u64,
    /// Users the target lacked.
    pub missing: u64,
    /// Users it held with other bytes.
    pub different: u64,
    /// Users it held that no source holds.
    pub extra: u64,
    /// Of those, deleted (prune).
    pub pruned: u64,
}

/// Records a finished reconcile; the target's drift count starts over.
pub fn record_reconcile_result(conn: &Connection, r: &ReconcileResult) -> Result<(), StoreError> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    conn.prepare_cached("INSERT INTO reconcile_result (grp, device_id, reason, finished_at, missing, different, extra, pruned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (grp, device_id) DO UPDATE SET reason = ?3, finished_at = ?4, missing = ?5,
           different = ?6, extra = ?7, pruned = ?8")?
        .execute(params![
            r.group,
            i64::from(r.target),
            r.reason,
            n(r.finished_at),
            n(r.missing),
            n(r.different),
            n(r.extra),
            n(r.pruned)
        ])?;
    conn.prepare_cached("DELETE FROM target_drift WHERE grp = ?1 AND device_id = ?2")?
        .execute(params![r.group, i64::from(r.target)])?;
    Ok(())
}

pub fn reconcile_results(conn: &Connection) -> Result<Vec<ReconcileResult>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, reason, finished_at, missing, different, extra, pruned
         FROM reconcile_result ORDER BY grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ReconcileResult {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            reason: r.get(2)?,
            finished_at: r.get::<_, u64>(3)?,
            missing: r.get::<_, u64>(4)?,
            different: r.get::<_, u64>(5)?,
            extra: r.get::<_, u64>(6)?,
            pruned: r.get::<_, u64>(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Drops a group's pending rows whose source is not one of `sources`.
pub fn drop_pending_of_other_sources(
    conn: &Connection,
    group: &str,
    sources: &[u32],
) -> Result<(), StoreError> {
    let sources = serde_json::to_string(sources).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "DELETE FROM pending WHERE grp = ?1 AND source NOT IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![group, sources])?;
    Ok(())
}

/// Forgets a target that left a group.
pub fn drop_target(conn: &Connection, group: &str, target: u32) -> Result<(), StoreError> {
    for table in [
        "cursor",
        "pending",
        "reconcile",
        "quarantine",
        "target_drift",
        "reconcile_result",
    ] {
        conn.execute(
            &format!("DELETE FROM {table} WHERE grp = ?1 AND device_id = ?2"),
            params![group, i64::from(target)],
        )?;
    }
    Ok(())
}

pub fn remove_pending(
    conn: &Connection,
    group: &str,
    target: u32,
    users: &[String],
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached("DELETE FROM pending WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3")?;
    for u in users {
        stmt.execute(params![group, i64::from(target), u])?;
    }
    Ok(())
}

/// Queued users per (group, target).
pub fn pending_counts(conn: &Connection) -> Result<BTreeMap<(String, u32), u64>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT grp, device_id, COUNT(*) FROM pending GROUP BY grp, device_id")?;
    let rows = stmt.query_map([], |r| {
        Ok(((r.get(0)?, r.get::<_, u32>(1)?), r.get::<_, u64>(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn cursors(conn: &Connection, group: &str) -> Result<BTreeMap<u32, u64>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, seq FROM cursor WHERE grp = ?1")?;
    let rows = stmt.query_map([group], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Moves a target's cursor forward (never back).
pub fn advance_cursor(
    conn: &Connection,
    group: &str,
    device: u32,
    seq: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO cursor (grp, device_id, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp, device_id) DO UPDATE SET seq = MAX(seq, ?3)",
    )?
    .execute(params![
        group,
        i64::from(device),
        i64::try_from(seq).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

pub fn add_quarantine(conn: &Connection, e: &QuarantineEntry) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO quarantine (grp, device_id, user_id, seq, code, message, since)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (grp, device_id, user_id) DO UPDATE SET seq = ?4, code = ?5, message = ?6",
    )?
    .execute(params![
        e.group,
        i64::from(e.device),
        e.user_id,
        i64::try_from(e.seq).unwrap_or(i64::MAX),
        e.code,
        e.message,
        i64::try_from(e.since).unwrap_or(0)
    ])?;
    Ok(())
}

pub fn clear_quarantine(
    conn: &Connection,
    group: &str,
    device: u32,
    user_ids: &[String],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM quarantine WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3",
    )?;
    for u in user_ids {
        stmt.execute(params![group, i64::from(device), u])?;
    }
    Ok(())
}

pub fn quarantine(conn: &Connection) -> Result<Vec<QuarantineEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, user_id, seq, code, message, since FROM quarantine
         ORDER BY grp, device_id, user_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(QuarantineEntry {
            group: r.get(0)?,
            device: r.get::<_, u32>(1)?,
            user_id: r.get(2)?,
            seq: r.get::<_, u64>(3)?,
            code: r.get(4)?,
            message: r.get(5)?,
            since: r.get::<_, u64>(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn request_reconcile(
    conn: &Connection,
    group: &str,
    target: u32,
    reason: &str,
    prune: bool,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO reconcile (grp, device_id, reason, prune, after_user, requested_at)
         VALUES (?1, ?2, ?3, ?4, NULL, ?5)
         ON CONFLICT (grp, device_id) DO UPDATE
         SET reason = ?3, prune = MAX(prune, ?4), after_user = NULL, requested_at = ?5,
             generation = generation + 1",
    )?
    .execute(params![
        group,
        i64::from(target),
        reason,
        i64::from(prune),
        now()
    ])?;
    Ok(())
}

pub fn reconcile_requests(conn: &Connection) -> Result<Vec<ReconcileRequest>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, reason, prune, after_user, generation FROM reconcile
         ORDER BY requested_at, grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ReconcileRequest {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            reason: r.get(2)?,
            prune: r.get::<_, i64>(3)? != 0,
            after_user: r.get(4)?,
            generation: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records how far request `generation` got (nothing if a newer request
/// replaced it meanwhile).
pub fn reconcile_progress(
    conn: &Connection,
    group: &str,
    target: u32,
    generation: i64,
    after_user: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE reconcile SET after_user = ?4 WHERE grp = ?1 AND device_id = ?2 AND generation = ?3")?
        .execute(params![group, i64::from(target), generation, after_user])?;
    Ok(())
}

/// Ends request `generation` (a newer request for the target stays).
pub fn reconcile_done(
    conn: &Connection,
    group: &str,
    target: u32,
    generation: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM reconcile WHERE grp = ?1 AND device_id = ?2 AND generation = ?3",
    )?
    .execute(params![group, i64::from(target), generation])?;
    Ok(())
}

pub fn set_device_status(
    conn: &Connection,
    device: u32,
    state: &str,
    detail: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO device_status (device_id, state, detail, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device_id) DO UPDATE SET state = ?2, detail = ?3, updated_at = ?4",
    )?
    .execute(params![i64::from(device), state, detail, now()])?;
    Ok(())
}

pub fn device_statuses(conn: &Connection) -> Result<Vec<DeviceStatusRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, state, detail, updated_at FROM device_status ORDER BY device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(DeviceStatusRow {
            device: r.get::<_, u32>(0)?,
            state: r.get(1)?,
            detail: r.get(2)?,
            updated_at: r.get::<_, u64>(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_diverged(conn: &Connection, group: &str, why: Option<&str>) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO group_status (grp, diverged, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp) DO UPDATE SET diverged = ?2, updated_at = ?3",
    )?
    .execute(params![group, why, now()])?;
    Ok(())
}

pub fn diverged(conn: &Connection) -> Result<BTreeMap<String, String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT grp, diverged FROM group_status WHERE diverged IS NOT NULL")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
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
}
