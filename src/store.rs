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
mod checkpoints;
mod journal;
pub mod multi;
mod schema;
mod targets;
#[cfg(test)]
mod tests;

pub use checkpoints::*;
pub use journal::*;
use schema::MIGRATIONS;
pub use targets::*;

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

/// The wall clock in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
        Store::open_as(dir, Schema::Upgrade)
    }

    fn open_as(dir: &Path, schema: Schema) -> Result<Store, StoreError> {
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
        quick_check(&conn, &path)?;
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
        Store::open_as(dir, Schema::Require)
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
