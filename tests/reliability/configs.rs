//! Invalid configuration files: exit 78, `file:line: reason`, state left
//! alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::daemon::{Launcher, usersync};
use crate::report::{Case, Observed, Section, first_line};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/invalid")
}

/// `# expect: LINE: TEXT` of a fixture.
fn expectation(text: &str) -> Option<(Option<usize>, String)> {
    let spec = text.lines().next()?.strip_prefix("# expect: ")?;
    let (line, reason) = spec
        .split_once(": ")
        .unwrap_or((spec.trim_end_matches(':'), ""));
    Some((line.parse().ok(), reason.to_owned()))
}

pub fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut cases: Vec<Case> = files.into_iter().map(fixture_case).collect();
    cases.extend(other_cases());
    cases
}

fn fixture_case(file: PathBuf) -> Case {
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let spec = expectation(&text);
    let (line, reason) = spec.clone().unwrap_or((None, String::new()));
    let base = format!("{name}.toml");
    let input = match line.and_then(|n| text.lines().nth(n - 1).map(|l| (n, l))) {
        Some((n, l)) => format!("`{base}` line {n}: `{}`", l.trim()),
        None => format!("`{base}`"),
    };
    let at = match line {
        Some(n) => format!("{base}:{n}:"),
        None => format!("{base}:"),
    };
    let expected = if reason.is_empty() {
        format!("exit 78, `{at}` (a TOML syntax error)")
    } else {
        format!("exit 78, `{at} {reason}`")
    };
    Case::new(
        Section::Config,
        format!("config/{name}"),
        input,
        expected,
        move || async move {
            let Some((line, reason)) = spec else {
                anyhow::bail!(
                    "{}: first line must be `# expect: LINE: TEXT`",
                    file.display()
                );
            };
            let dir = tempfile::tempdir()?;
            // The fixture's neighbours (CA files) come along: relative
            // paths in it stay valid.
            for e in std::fs::read_dir(fixtures())? {
                let p = e?.path();
                if p.is_file() {
                    std::fs::copy(&p, dir.path().join(p.file_name().context("file name")?))?;
                }
            }
            let copy = dir.path().join(&base);
            let state = dir.path().join("state");
            // Point an absolute state.dir at a real state database, on the
            // same line, so line numbers stay as the fixture says.
            let text = std::fs::read_to_string(&copy)?
                .lines()
                .map(|l| {
                    let t = l.trim_start();
                    if t.starts_with("dir = \"/") {
                        format!("dir = \"{}\"", state.display())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let points_at_state = text.contains(&state.display().to_string());
            std::fs::write(&copy, text + "\n")?;
            let state = points_at_state.then_some(state.as_path());
            let at = match line {
                Some(n) => format!("{}:{n}: ", copy.display()),
                None => format!("{}", copy.display()),
            };
            Ok(try_both(&copy, state, &at, &reason)
                .await?
                .redact(dir.path()))
        },
    )
}

/// A state directory holding a state database with one checkpoint.
fn seed_state(state: &Path) -> Result<()> {
    let store = usersync::store::Store::open(state)?;
    store.set_checkpoint(540_000_001, 42)?;
    Ok(())
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .map(|p| {
                    let bytes = std::fs::read(&p).unwrap_or_default();
                    (p, bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `check-config FILE` and `run --config FILE` must both exit 78 naming
/// `at` and `reason`, and leave `state` (the state directory the file
/// names, if it names a usable one) as it was.
async fn try_both(file: &Path, state: Option<&Path>, at: &str, reason: &str) -> Result<Observed> {
    if let Some(state) = state {
        seed_state(state)?;
    }
    let before = state.map(snapshot);
    let direct = Launcher::direct();
    let check = usersync(&direct, &["check-config".as_ref(), file.as_os_str()]).await?;
    let run = usersync(
        &direct,
        &["run".as_ref(), "--config".as_ref(), file.as_os_str()],
    )
    .await?;
    let after = state.map(snapshot);
    let mut o = Observed::default();
    o.exit = if check.code == run.code {
        run.exit()
    } else {
        format!("check-config {}, run {}", check.exit(), run.exit())
    };
    o.message = first_line(&run.stderr);
    let kept = before == after;
    o.state = match (&before, kept) {
        (None, _) => "— (the file names no usable state directory)".into(),
        (Some(_), true) => "state.db byte-identical, nothing created".into(),
        (Some(_), false) => "state directory CHANGED".into(),
    };
    for (what, out) in [("check-config", &check), ("run", &run)] {
        o.expect(
            out.code == Some(78),
            format!("{what} exited {}", out.exit()),
        );
        o.expect(
            out.stderr.contains(at) && out.stderr.contains(reason),
            format!("{what}: stderr lacks {at:?} and {reason:?}"),
        );
    }
    o.expect(
        first_line(&check.stderr) == first_line(&run.stderr),
        "check-config and run say different things",
    );
    o.expect(kept, "the state directory changed");
    Ok(o)
}

/// Files no fixture can be (or that need a path made at run time).
fn other_cases() -> Vec<Case> {
    let mut v = Vec::new();
    v.push(Case::new(
        Section::Config,
        "config/no-such-file",
        "`--config` names a file that does not exist",
        "exit 78, `FILE: cannot read: No such file or directory`",
        || async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("usersync.toml");
            let at = format!("{}: cannot read: ", file.display());
            Ok(try_both(&file, None, &at, "No such file")
                .await?
                .redact(dir.path()))
        },
    ));
    v.push(Case::new(
        Section::Config,
        "config/not-utf8",
        "a file of bytes that are not UTF-8 (`0xFF 0xFE` and a valid-looking rest)",
        "exit 78, `FILE: cannot read: stream did not contain valid UTF-8`",
        || async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("usersync.toml");
            let mut bytes = vec![0xFF, 0xFE];
            bytes.extend_from_slice(b"[gateway]\naddress = \"localhost:4000\"\n");
            std::fs::write(&file, bytes)?;
            let at = format!("{}: cannot read: ", file.display());
            Ok(try_both(&file, None, &at, "valid UTF-8")
                .await?
                .redact(dir.path()))
        },
    ));
    v.push(Case::new(
        Section::Config,
        "config/empty-file",
        "an empty file",
        "exit 78, `FILE:1: missing field `gateway``",
        || async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("usersync.toml");
            std::fs::write(&file, "")?;
            let at = format!("{}:1: ", file.display());
            Ok(try_both(&file, None, &at, "missing field `gateway`")
                .await?
                .redact(dir.path()))
        },
    ));
    v.push(Case::new(
        Section::Config,
        "config/state-dir-is-a-file",
        "a valid file whose `[state] dir` is a regular file",
        "exit 78, `FILE: state.dir …: cannot be used: not a directory` (a restart cannot fix it)",
        || async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("usersync.toml");
            let not_dir = dir.path().join("not-a-dir");
            std::fs::write(&not_dir, "keep me")?;
            std::fs::write(
                &file,
                format!(
                    "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n",
                    not_dir.display()
                ),
            )?;
            let at = format!(
                "{}: state.dir {}: cannot be used",
                file.display(),
                not_dir.display()
            );
            let mut o = try_both(&file, None, &at, "not a directory").await?;
            let kept = std::fs::read(&not_dir)? == b"keep me";
            o.expect(kept, "the file named as state.dir changed");
            o.state = if kept {
                "the file named as state.dir keeps its bytes".into()
            } else {
                "the file named as state.dir CHANGED".into()
            };
            Ok(o.redact(dir.path()))
        },
    ));
    v
}
