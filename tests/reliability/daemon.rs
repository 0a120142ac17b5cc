//! The real `usersync` binary as a child process: one-shot commands, and
//! the daemon with its JSON log lines collected in a file (through a pipe,
//! so a file size limit on the daemon cannot cut its own log).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary cargo built for this test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_usersync"))
}

/// A one-shot command's deadline, and a stopping daemon's.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// How the binary is started: directly, or through wrappers.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    prefix: Vec<OsString>,
}

impl Launcher {
    pub fn direct() -> Self {
        Launcher::default()
    }

    /// Through `sh`, with SIGXFSZ ignored (the disposition survives exec):
    /// a write past `RLIMIT_FSIZE` then fails with EFBIG instead of killing
    /// the process.
    pub fn ignoring_sigxfsz(mut self) -> Self {
        self.prefix.extend(
            ["sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\""]
                .into_iter()
                .map(OsString::from),
        );
        self
    }

    /// Inside the mount namespace of process `pid` (nsenter execs the
    /// command without forking when it enters only a mount namespace, so
    /// the child's PID is the daemon's).
    pub fn in_mount_namespace(mut self, pid: u32) -> Self {
        let mut p: Vec<OsString> = ["nsenter", "-t", &pid.to_string(), "-m", "--"]
            .into_iter()
            .map(OsString::from)
            .collect();
        p.append(&mut self.prefix);
        self.prefix = p;
        self
    }

    pub fn command(&self, args: &[&OsStr]) -> Command {
        let mut all: Vec<OsString> = self.prefix.clone();
        all.push(bin().into_os_string());
        all.extend(args.iter().map(|a| a.to_os_string()));
        let mut cmd = Command::new(&all[0]);
        cmd.args(&all[1..])
            .stdin(Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        cmd
    }
}

/// What a one-shot command did.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stderr: String,
}

impl Output {
    pub fn exit(&self) -> String {
        self.code
            .map_or_else(|| "killed by a signal".to_owned(), |c| c.to_string())
    }
}

/// Runs `usersync ARGS` to its end.
pub async fn usersync(launcher: &Launcher, args: &[&OsStr]) -> Result<Output> {
    let mut cmd = launcher.command(args);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let out = tokio::time::timeout(COMMAND_DEADLINE, cmd.output())
        .await
        .map_err(|_| anyhow!("`usersync {args:?}` did not end within {COMMAND_DEADLINE:?}"))?
        .with_context(|| format!("starting `usersync {args:?}`"))?;
    Ok(Output {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `usersync run` as a child process.
pub struct Daemon {
    child: Child,
    pid: u32,
    log: PathBuf,
    copier: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `usersync run --config CONFIG` with JSON log lines appended
    /// to `log`.
    pub fn start(launcher: &Launcher, config: &Path, log: &Path) -> Result<Daemon> {
        let mut cmd = launcher.command(&[
            "run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--log-target".as_ref(),
            "stderr".as_ref(),
            "--log-format".as_ref(),
            "json".as_ref(),
        ]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting usersync run")?;
        let pid = child.id().context("the daemon has no PID")?;
        let mut stderr = child.stderr.take().context("the daemon's stderr")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("{}", log.display()))?;
        let mut file = tokio::fs::File::from_std(file);
        // Written and flushed chunk by chunk, so the file is current.
        let copier = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 || file.write_all(&buf[..n]).await.is_err() || file.flush().await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Daemon {
            child,
            pid,
            log: log.to_owned(),
            copier: Some(copier),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits for it to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = tokio::time::timeout(within, self.child.wait())
            .await
            .map_err(|_| anyhow!("the daemon did not exit within {within:?}"))??;
        self.status = Some(s);
        self.drain().await;
        Ok(s)
    }

    /// SIGTERM, then waits for the exit (SIGKILL and an error if it does
    /// not come).
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited()? {
            self.drain().await;
            return Ok(s);
        }
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.pid)?).context("the daemon's PID")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        match tokio::time::timeout(COMMAND_DEADLINE, self.child.wait()).await {
            Ok(s) => {
                let s = s?;
                self.status = Some(s);
                self.drain().await;
                Ok(s)
            }
            Err(_) => {
                let _ = self.child.start_kill();
                bail!("the daemon did not stop within {COMMAND_DEADLINE:?} of SIGTERM")
            }
        }
    }

    async fn drain(&mut self) {
        if let Some(c) = self.copier.take() {
            let _ = c.await;
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> Log {
        Log::parse(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// One log line: a JSON object, or a line that is not one (a panic).
#[derive(Debug, Clone)]
pub struct Line {
    pub level: String,
    pub message: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Line {
    pub fn is_problem(&self) -> bool {
        matches!(self.level.as_str(), "WARN" | "ERROR" | "RAW")
    }

    /// The message or any field value contains `text`.
    pub fn says(&self, text: &str) -> bool {
        self.message.contains(text)
            || self.fields.values().any(|v| match v {
                serde_json::Value::String(s) => s.contains(text),
                other => other.to_string().contains(text),
            })
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.level == "RAW" {
            return write!(f, "{}", self.message);
        }
        write!(f, "{} {}", self.level, self.message)?;
        let shown: Vec<String> = self
            .fields
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "timestamp" | "module" | "spans"))
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let v = if v.chars().count() > 200 {
                    format!("{}…", v.chars().take(200).collect::<String>())
                } else {
                    v
                };
                format!("{k}={v}")
            })
            .collect();
        if !shown.is_empty() {
            write!(f, " ({})", shown.join(", "))?;
        }
        Ok(())
    }
}

/// A daemon's log.
#[derive(Debug, Default)]
pub struct Log {
    raw: String,
    pub lines: Vec<Line>,
}

impl Log {
    pub fn parse(raw: &str) -> Log {
        let lines = raw
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Object(mut m)) => {
                    let text = |m: &mut serde_json::Map<String, serde_json::Value>, k: &str| match m
                        .remove(k)
                    {
                        Some(serde_json::Value::String(s)) => s,
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    Line {
                        level: text(&mut m, "level"),
                        message: text(&mut m, "message"),
                        fields: m,
                    }
                }
                _ => Line {
                    level: "RAW".into(),
                    message: l.to_owned(),
                    fields: serde_json::Map::new(),
                },
            })
            .collect();
        Log {
            raw: raw.to_owned(),
            lines,
        }
    }

    pub fn panicked(&self) -> bool {
        self.raw.contains("panicked at")
    }

    /// The first line from index `from` on that satisfies `pred`.
    pub fn find(&self, from: usize, pred: impl Fn(&Line) -> bool) -> Option<&Line> {
        self.lines.iter().skip(from).find(|l| pred(l))
    }

    /// WARN and ERROR lines (and lines that are not JSON) from `from` on.
    pub fn problems(&self, from: usize) -> Vec<&Line> {
        self.lines
            .iter()
            .skip(from)
            .filter(|l| l.is_problem())
            .collect()
    }
}

/// Polls `check` every 20 ms until it holds; an error at the deadline.
pub async fn until<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
