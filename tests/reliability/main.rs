//! Bad input, tried and tabulated: every case runs the real `usersync`
//! binary (the one cargo builds for this test) against bad input, compares
//! what it observes with what the case expects, and prints one line per
//! case; `--write FILE` also writes the Markdown table (docs/RELIABILITY.md):
//!
//!     cargo test --release --test reliability -- --write docs/RELIABILITY.md
//!
//! The program exits non-zero when any observed outcome departs from its
//! expectation. It is a test target without libtest (`harness = false`) so
//! that `cargo test` runs every case on every run (it cannot rot), while
//! the same program writes the document: cargo builds the daemon binary
//! first and hands its path over (`CARGO_BIN_EXE_usersync`, given to test
//! targets only), so the table never describes a stale binary.
//!
//! Arguments: `--write FILE`; words that are not options select the cases
//! whose name contains one of them (as libtest filters do: `cargo test foo`
//! runs no case here unless one is named after `foo`); `--list` lists the
//! cases; `--ignored` runs none (there are no ignored cases); other libtest
//! options are accepted and ignored.
//!
//! The sections:
//!
//! * [`configs`]: every fixture under `tests/fixtures/config/invalid/` (and a
//!   few files no fixture can be), through `check-config` and `run`: exit
//!   78, `file:line: reason` on stderr, and the state database the file
//!   points at left byte for byte;
//! * [`state`]: a damaged or newer state database: the daemon stops with an
//!   error that names the file and what to do, and never touches it;
//! * [`disk`]: a read-only and a full state directory (a size-limited tmpfs
//!   where the machine lets us mount one, `RLIMIT_FSIZE` everywhere);
//! * [`gateway`]: hostile data from the simulator: the daemon logs and
//!   skips, keeps syncing, and never deletes a user a source holds.

mod configs;
mod daemon;
mod disk;
mod gateway;
mod report;
mod site;
mod state;

use std::process::ExitCode;

use report::{Case, Row, Verdict};

/// The command line, read the way libtest's is read by `cargo test`.
#[derive(Debug, Default)]
struct Args {
    write: Option<std::path::PathBuf>,
    filters: Vec<String>,
    list: bool,
    ignored: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args::default();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--write" => {
                    let path = args.next().ok_or("--write needs a file")?;
                    a.write = Some(path.into());
                }
                "--list" => a.list = true,
                "--ignored" => a.ignored = true,
                // libtest options with a value.
                "--test-threads" | "--format" | "--color" | "--skip" | "-Z" | "--logfile"
                | "--report-time" | "--shuffle-seed" => {
                    args.next();
                }
                other if other.starts_with('-') => {}
                other => a.filters.push(other.to_owned()),
            }
        }
        Ok(a)
    }

    fn selects(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("reliability: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reliability: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cases: Vec<Case> = [
        configs::cases(),
        state::cases(),
        disk::cases(),
        gateway::cases(),
    ]
    .into_iter()
    .flatten()
    .filter(|c| args.selects(&c.name))
    .collect();
    if args.list {
        for c in &cases {
            println!("{}: test", c.name);
        }
        return ExitCode::SUCCESS;
    }
    if args.ignored || cases.is_empty() {
        return ExitCode::SUCCESS;
    }
    let started = std::time::Instant::now();
    let total = cases.len();
    let mut rows: Vec<Row> = Vec::with_capacity(total);
    for case in cases {
        let t0 = std::time::Instant::now();
        let row = runtime.block_on(case.run());
        println!(
            "reliability {}/{total} {} ... {} ({:.1} s)",
            rows.len() + 1,
            row.name,
            row.verdict.word(),
            t0.elapsed().as_secs_f64()
        );
        if let Verdict::Fail(why) = &row.verdict {
            println!(
                "    {why}\n    observed: exit {}; {}; {}",
                row.exit, row.message, row.state
            );
        }
        rows.push(row);
    }
    let failed = rows
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Fail(_)))
        .count();
    let skipped = rows
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Skip(_)))
        .count();
    println!(
        "reliability: {total} cases, {} pass, {failed} fail, {skipped} not run ({:.0} s)",
        total - failed - skipped,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.write {
        let text = report::document(&rows);
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("reliability: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("reliability: wrote {}", path.display());
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
