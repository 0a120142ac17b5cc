//! The schema: numbered migrations, applied in order, each once
//! (`PRAGMA user_version` counts them). Append; never edit one that shipped.

pub(super) const MIGRATIONS: &[&str] = &[
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
    // 9: when each own write's call returned (`done_tick`, the process's
    // own-write tick, 0 for a write of an earlier run; `done_at_ms`, unix
    // ms): a read of the member's log that started after it and found no
    // echo ends the expectation (`store::multi::expire_own_writes`).
    // Rows carried over are taken as done when they were expected.
    "
    ALTER TABLE own_write ADD COLUMN done_tick INTEGER;
    ALTER TABLE own_write ADD COLUMN done_at_ms INTEGER;
    UPDATE own_write SET done_tick = 0, done_at_ms = (expires_at - 900) * 1000;
    CREATE INDEX own_write_in_flight ON own_write (grp) WHERE done_tick IS NULL;
    ",
    // 10: when each own write was sent (unix ms): one in flight when the
    // daemon stopped returned by the call timeout after it, at the latest.
    // Rows carried over keep no time (taken as returned at the restart).
    "
    ALTER TABLE own_write ADD COLUMN sent_at_ms INTEGER;
    ",
    // 11: the journal's head when a member joined a multi-master group: a
    // version recorded before it was never given to that member (what it
    // holds of it came from elsewhere), whatever its cursor says.
    "
    CREATE TABLE member_joined (
        grp       TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        PRIMARY KEY (grp, device_id)
    );
    ",
];
