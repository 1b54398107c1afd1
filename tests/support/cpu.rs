//! CPU time per row of the processes a benchmark runs, read from /proc.

/// Named processes' CPU time since [`CpuShares::start`].
pub struct CpuShares {
    processes: Vec<(&'static str, u32)>,
    before: Vec<f64>,
}

impl CpuShares {
    pub fn start(processes: Vec<(&'static str, u32)>) -> Self {
        let before = processes.iter().map(|(_, pid)| seconds(*pid)).collect();
        Self { processes, before }
    }

    /// Each process's CPU milliseconds per row since the start.
    pub fn per_row(&self, rows: usize) -> Vec<(&'static str, f64)> {
        self.processes
            .iter()
            .zip(&self.before)
            .map(|((name, pid), before)| (*name, (seconds(*pid) - before) * 1000.0 / rows as f64))
            .collect()
    }
}

/// The control plane's processes, named.
pub async fn control_plane() -> Vec<(&'static str, u32)> {
    let [etcd, apiserver, controller_manager] = super::control_plane().await.processes();
    vec![
        ("kube-apiserver", apiserver.pid()),
        ("etcd", etcd.pid()),
        ("kube-controller-manager", controller_manager.pid()),
    ]
}

/// The sum of the named processes' shares.
pub fn sum_of(shares: &[(&str, f64)], names: &[&str]) -> f64 {
    shares
        .iter()
        .filter(|(name, _)| names.contains(name))
        .map(|(_, ms)| ms)
        .sum()
}

/// The sum of all the shares: the whole system's CPU per row.
pub fn total(shares: &[(&str, f64)]) -> f64 {
    shares.iter().map(|(_, ms)| ms).sum()
}

/// "worker 0.041, receiver 0.044, ...".
pub fn describe(shares: &[(&str, f64)]) -> String {
    let parts: Vec<String> = shares
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.3}"))
        .collect();
    parts.join(", ")
}

/// A process's user + system CPU seconds.
pub fn seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}
