//! Child processes that are always stopped: by `Drop`, or by
//! [`kill_all_registered`] from an exit hook when their owner is a static that
//! never drops (a test binary's shared control plane).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static REGISTERED_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A started child process whose output goes to a log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Starts `command`, sending stdout and stderr to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> std::io::Result<Self> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().map_err(|e| {
            std::io::Error::new(e.kind(), format!("starting {name} ({command:?}): {e}"))
        })?;
        REGISTERED_PIDS.lock().unwrap().push(child.id());
        Ok(Self {
            name: name.to_string(),
            child,
            log_path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Returns an error when the process has already exited.
    pub fn ensure_running(&mut self) -> std::io::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(std::io::Error::other(format!(
                "{} exited early with {status}; last log lines:\n{}",
                self.name,
                self.log_tail(30)
            ))),
        }
    }

    /// Sends SIGKILL at once, as a crash would.
    pub fn kill_hard(&mut self) {
        signal(self.child.id(), Signal::Kill);
        let _ = self.child.wait();
        unregister(self.child.id());
    }

    /// Sends SIGTERM, waits up to `grace` for the exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            unregister(self.child.id());
            return Some(status);
        }
        signal(self.child.id(), Signal::Term);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                unregister(self.child.id());
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_hard();
        None
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn unregister(pid: u32) {
    REGISTERED_PIDS.lock().unwrap().retain(|p| *p != pid);
}

/// Kills every process started through [`ManagedProcess::spawn`] that is still
/// registered. Meant for exit hooks; only PIDs this process started are signalled.
pub fn kill_all_registered() {
    let pids = std::mem::take(&mut *REGISTERED_PIDS.lock().unwrap());
    for pid in pids {
        signal(pid, Signal::Kill);
    }
}

enum Signal {
    Term,
    Kill,
}

fn signal(pid: u32, sig: Signal) {
    let flag = match sig {
        Signal::Term => "-TERM",
        Signal::Kill => "-KILL",
    };
    // `kill(1)` keeps this crate free of unsafe libc calls; it is in procps/coreutils everywhere.
    let _ = Command::new("kill")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
