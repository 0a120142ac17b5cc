//! The daemon lock: an advisory lock on `daemon.lock` in the state
//! directory. The daemon holds it for as long as it runs; operator commands
//! take it to know whether a daemon runs, and hold it while they write what
//! the daemon owns (checkpoints, devices on its behalf). It never waits:
//! whoever needs to wait for it (the daemon at start) retries.

use std::path::Path;

use super::StoreError;

/// The lock a running daemon holds in its state directory.
pub const LOCK_FILE: &str = "daemon.lock";

/// Takes the daemon lock of `dir` without waiting. `Ok(None)`: held by
/// someone else.
pub fn try_lock(dir: &Path) -> Result<Option<std::fs::File>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| StoreError::Lock {
            path: path.clone(),
            source,
        })?;
    super::adopt(&path, dir)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Lock { path, source }),
    }
}
