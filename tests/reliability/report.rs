//! Cases, their observed outcomes and the Markdown document.

use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// The parts of the document, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Config,
    State,
    Disk,
    Gateway,
}

impl Section {
    fn title(self) -> &'static str {
        match self {
            Section::Config => "Invalid configuration files",
            Section::State => "A damaged or foreign state database",
            Section::Disk => "A read-only or full state directory",
            Section::Gateway => "Hostile data from the gateway",
        }
    }

    fn intro(self) -> &'static str {
        match self {
            Section::Config => {
                "Every fixture under `tests/fixtures/config/invalid/` (its first line says \
                 `# expect: LINE: REASON`; `tests/config_files.rs` checks the same files) and a few \
                 files no fixture can be, copied into a temporary directory `$DIR` whose state \
                 directory already holds a state database. Each file is given to \
                 `usersync check-config FILE` and to `usersync run --config FILE`: both must exit \
                 78 (the unit's `RestartPreventExitStatus=78`) with `FILE:LINE: REASON` on stderr, \
                 and the state database must be left byte for byte. The message column shows \
                 `run`'s first line (`check-config` must print the same)."
            }
            Section::State => {
                "A state database written by the daemon (checkpoints, journal, cursors of a \
                 one-source, one-target group), damaged while the daemon was stopped. `run` must \
                 stop before it does anything, with an error that names the file and what to do, \
                 and leave the file byte for byte (it never resets or repairs recorded state by \
                 itself); then the advice is followed and the daemon must start and deliver a \
                 change made while it was down."
            }
            Section::Disk => {
                "The state directory cannot be written: read-only (a read-only bind mount in a \
                 private mount namespace, `EROFS`, where the machine allows one; else the \
                 directory's mode), full (a tmpfs with `size=` in a private mount namespace, \
                 `ENOSPC`, where the machine allows one) or past the process's file size limit \
                 (`RLIMIT_FSIZE` set with prlimit(2) on the running daemon, `SIGXFSZ` ignored so \
                 writes fail with `EFBIG`; this needs no privilege). Changes are made at the \
                 source meanwhile; once the condition is lifted they must arrive, and the state \
                 database must pass `PRAGMA integrity_check` with no checkpoint moved back. A \
                 filesystem that turns read-only under a running daemon is not staged: a \
                 read-only bind mount does not stop writes through files already open; its \
                 writes would fail as a full disk's do, on the path the full cases try."
            }
            Section::Gateway => {
                "The simulator (`src/sim/`) with two groups, `a` (source A → target B) and `c` \
                 (source C → target D), and its least convenient answers; the daemon runs with \
                 `tail_check_delay_ms = 100` and `idle_check_interval_secs = 2` (600 by default: \
                 where a case depends on it, it says so). After a warm-up user reaches both \
                 targets, the fault is applied to A (or the gateway), then a change at C must \
                 reach D and a later change at A must reach B. Throughout, the daemon must stay up \
                 (then exit 0 on SIGTERM), never panic, and never delete from a target a user \
                 its source holds (the simulator's delete guard watches every delete). The \
                 message column is the daemon's log line that tells the fault."
            }
        }
    }
}

/// What a case's run saw.
#[derive(Debug, Default)]
pub struct Observed {
    pub exit: String,
    pub message: String,
    pub state: String,
    departures: Vec<String>,
    skipped: Option<String>,
}

impl Observed {
    /// Records a departure from the expectation unless `ok`.
    pub fn expect(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.departures.push(what.into());
        }
    }

    /// The case could not run on this machine (and is not a failure).
    pub fn skipped(why: impl Into<String>) -> Observed {
        Observed {
            exit: "—".into(),
            message: "—".into(),
            state: "—".into(),
            skipped: Some(why.into()),
            ..Observed::default()
        }
    }

    /// Replaces `dir` (a temporary directory) by `$DIR` in what is shown.
    pub fn redact(mut self, dir: &Path) -> Observed {
        let d = dir.display().to_string();
        for s in [&mut self.exit, &mut self.message, &mut self.state] {
            *s = s.replace(&d, "$DIR");
        }
        for s in &mut self.departures {
            *s = s.replace(&d, "$DIR");
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "FAIL",
            Verdict::Skip(_) => "not run",
        }
    }
}

/// One line of the table.
#[derive(Debug)]
pub struct Row {
    pub section: Section,
    pub name: String,
    pub input: String,
    pub expected: String,
    pub exit: String,
    pub message: String,
    pub state: String,
    pub verdict: Verdict,
}

type Run = Pin<Box<dyn Future<Output = anyhow::Result<Observed>>>>;

/// A case: what goes in, what should happen, and how to try it.
pub struct Case {
    pub section: Section,
    pub name: String,
    pub input: String,
    pub expected: String,
    run: Box<dyn FnOnce() -> Run>,
}

impl Case {
    pub fn new<F, Fut>(
        section: Section,
        name: impl Into<String>,
        input: impl Into<String>,
        expected: impl Into<String>,
        run: F,
    ) -> Case
    where
        F: FnOnce() -> Fut + 'static,
        Fut: Future<Output = anyhow::Result<Observed>> + 'static,
    {
        Case {
            section,
            name: name.into(),
            input: input.into(),
            expected: expected.into(),
            run: Box::new(move || Box::pin(run())),
        }
    }

    pub async fn run(self) -> Row {
        let (verdict, exit, message, state) = match (self.run)().await {
            Ok(o) => {
                let verdict = match (o.skipped, o.departures.is_empty()) {
                    (Some(why), _) => Verdict::Skip(why),
                    (None, true) => Verdict::Pass,
                    (None, false) => Verdict::Fail(o.departures.join("; ")),
                };
                (verdict, o.exit, o.message, o.state)
            }
            Err(e) => (
                Verdict::Fail(format!("the case could not finish: {e:#}")),
                "—".into(),
                "—".into(),
                "—".into(),
            ),
        };
        Row {
            section: self.section,
            name: self.name,
            input: self.input,
            expected: self.expected,
            exit,
            message,
            state,
            verdict,
        }
    }
}

/// A table cell: one line, pipes escaped.
fn cell(s: &str) -> String {
    s.trim().replace('|', "\\|").replace('\n', "<br>")
}

/// The first line of `text` (trimmed), or `(nothing)`.
pub fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map_or_else(|| "(nothing)".to_owned(), str::to_owned)
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// The whole document: a header saying where, how and when, the summary,
/// then one table per section.
pub fn document(rows: &[Row]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = command_output("uname", &["-sr"]).unwrap_or_else(|| "unknown kernel".into());
    let user = if rustix::process::geteuid().is_root() {
        "root".to_owned()
    } else {
        format!("uid {}", rustix::process::geteuid().as_raw())
    };
    let date = command_output("date", &["-u"]).unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let release = if cfg!(debug_assertions) {
        ""
    } else {
        "--release "
    };
    let pass = rows.iter().filter(|r| r.verdict == Verdict::Pass).count();
    let fail = rows
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Fail(_)))
        .count();
    let skip = rows.len() - pass - fail;
    let mut text = format!(
        "# Reliability: bad input, tried\n\n\
         Written by `tests/reliability/` (see its module doc), which runs every case against the \
         real `usersync` binary and exits non-zero if any observed outcome departs from its \
         expectation; `cargo test` runs it too.\n\n\
         - Machine: {cores} cores (nproc), {cpu}; {kernel}; run as {user}\n\
         - Command: `cargo test {release}--test reliability -- {}`\n\
         - Date: {date}\n\
         - Result: {} cases: {pass} pass, {fail} fail, {skip} not run on this machine\n\n\
         Temporary directories are shown as `$DIR`.\n",
        args.join(" "),
        rows.len(),
    );
    let mut sections: Vec<Section> = rows.iter().map(|r| r.section).collect();
    sections.dedup();
    let mut n = 0;
    for s in sections {
        let _ = write!(
            text,
            "\n## {}\n\n{}\n\n| # | case | input | expected | exit | message (first line) | state | result |\n\
             |---:|---|---|---|---|---|---|---|\n",
            s.title(),
            s.intro()
        );
        for r in rows.iter().filter(|r| r.section == s) {
            n += 1;
            let result = match &r.verdict {
                Verdict::Pass => "pass".to_owned(),
                Verdict::Fail(why) => format!("**FAIL**: {why}"),
                Verdict::Skip(why) => format!("not run: {why}"),
            };
            let _ = writeln!(
                text,
                "| {n} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&r.name),
                cell(&r.input),
                cell(&r.expected),
                cell(&r.exit),
                cell(&r.message),
                cell(&r.state),
                cell(&result)
            );
        }
    }
    text
}
