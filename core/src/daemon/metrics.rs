//! The daemon's figures for an admin's monitoring, as a file in Prometheus'
//! text exposition format (0.0.4), which node-exporter's textfile collector
//! reads (`--collector.textfile.directory`): jobs by state and user, memory
//! per pool, each user's fair-share usage, the intake backlog.
//!
//! A file, not an endpoint: the unit allows the daemon no network sockets
//! (`RestrictAddressFamilies=AF_UNIX AF_NETLINK`).  With `metrics_file:` set
//! the main loop writes it at start, every [`WRITE_EVERY`], and once more at a
//! clean stop (with `mezod_up 0`).  Each write is a fresh temporary in the
//! same folder (`.NAME.partial`, which the collector skips: it reads
//! `*.prom` only), mode 0644 whatever the umask (node-exporter runs as its own
//! user), renamed over the file: a scrape sees the old file or the new one.
//! Not fsynced: the file is rewritten within seconds of any start.
//!
//! Rendering is a pure function of a [`Snapshot`], so the exact text is
//! tested here; the daemon fills the snapshot from its state
//! (`server/metrics.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How often the main loop rewrites the file.
pub const WRITE_EVERY: Duration = Duration::from_secs(15);

/// What one write of the metrics file says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The daemon's version (`mezod_info`).
    pub version: String,
    /// False in the last write of a clean stop.
    pub up: bool,
    /// (user, state) → jobs in the table: every state of every user with a
    /// job, zeros included, so a count that drops to 0 stays a series.
    pub jobs: BTreeMap<(String, String), u64>,
    pub pools: Vec<PoolFigures>,
    /// User → decayed device-seconds (the fair-share ledger).
    pub usage: BTreeMap<String, f64>,
    /// Preemptions of jobs in the table, when the daemon counts them.
    pub preemptions: Option<u64>,
    /// Files in the spool's `new/` waiting for a check (none: not known).
    pub intake_backlog: Option<u64>,
    /// Intake checks under way.
    pub intake_checking: u64,
    /// Intake and new starts are paused by a full disk.
    pub disk_low: bool,
}

/// One pool (a GPU, or the CPU) as the last admission pass saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFigures {
    /// "GPU 0 (NVIDIA H100 80GB HBM3)" or "CPU".
    pub name: String,
    /// The GPU's UUID (none for the CPU).
    pub uuid: Option<String>,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// The estimates of our jobs running there, summed.
    pub reserved_bytes: u64,
    pub running_jobs: u64,
}

impl Snapshot {
    /// Count one more `state` job of `user`, and give the user every other
    /// state at 0 (`states`: the names there are).
    pub(crate) fn add_jobs(&mut self, user: &str, state: &str, n: u64, states: &[&str]) {
        for s in states {
            self.jobs
                .entry((user.to_string(), s.to_string()))
                .or_insert(0);
        }
        *self
            .jobs
            .entry((user.to_string(), state.to_string()))
            .or_insert(0) += n;
    }
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: Go's spelling of the non-finite ones, else the shortest
/// decimal that reads back as the same number.
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// One metric family: its HELP and TYPE lines, then its samples (none
/// written at all when it has no samples).
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    started: bool,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], v: f64) {
        if !self.started {
            self.started = true;
            let _ = writeln!(self.out, "# HELP {} {}", self.name, self.help);
            let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind);
        }
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value(v));
    }
}

fn family<'a>(
    out: &'a mut String,
    name: &'static str,
    kind: &'static str,
    help: &'static str,
) -> Family<'a> {
    Family {
        out,
        name,
        help,
        kind,
        started: false,
    }
}

/// The whole file.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let o = &mut out;
    family(
        o,
        "mezod_up",
        "gauge",
        "1 while the daemon runs; 0 written at a clean stop.",
    )
    .sample(&[], if s.up { 1.0 } else { 0.0 });
    family(o, "mezod_info", "gauge", "The daemon's version.")
        .sample(&[("version", &s.version)], 1.0);
    let mut f = family(
        o,
        "mezod_jobs",
        "gauge",
        "Jobs in the daemon's table by state and owner.",
    );
    for ((user, state), n) in &s.jobs {
        f.sample(&[("state", state), ("user", user)], *n as f64);
    }
    type Figure = fn(&PoolFigures) -> u64;
    let pool_families: [(&'static str, &'static str, Figure); 4] = [
        (
            "mezod_pool_total_bytes",
            "Memory of a pool (a GPU, or the machine's RAM for CPU jobs).",
            |p| p.total_bytes,
        ),
        (
            "mezod_pool_free_bytes",
            "Free memory of a pool as last measured (NVML, or MemAvailable).",
            |p| p.free_bytes,
        ),
        (
            "mezod_pool_reserved_bytes",
            "The memory estimates of mezod's jobs running in a pool, summed.",
            |p| p.reserved_bytes,
        ),
        (
            "mezod_pool_running_jobs",
            "mezod's jobs running in a pool.",
            |p| p.running_jobs,
        ),
    ];
    for (name, help, figure) in pool_families {
        let mut f = family(o, name, "gauge", help);
        for p in &s.pools {
            let v = figure(p) as f64;
            match &p.uuid {
                Some(uuid) => f.sample(&[("pool", &p.name), ("uuid", uuid)], v),
                None => f.sample(&[("pool", &p.name)], v),
            }
        }
    }
    let mut f = family(
        o,
        "mezod_user_usage_device_seconds",
        "gauge",
        "A user's recent usage for fair share: device-seconds, decayed with the configured half-life.",
    );
    for (user, u) in &s.usage {
        f.sample(&[("user", user)], *u);
    }
    if let Some(n) = s.preemptions {
        family(
            o,
            "mezod_preemptions_total",
            "counter",
            "Preemptions of the jobs in the daemon's table.",
        )
        .sample(&[], n as f64);
    }
    if let Some(n) = s.intake_backlog {
        family(
            o,
            "mezod_intake_backlog",
            "gauge",
            "Files in the spool waiting for their intake check.",
        )
        .sample(&[], n as f64);
    }
    family(
        o,
        "mezod_intake_checking",
        "gauge",
        "Intake checks under way.",
    )
    .sample(&[], s.intake_checking as f64);
    family(
        o,
        "mezod_disk_low",
        "gauge",
        "1 while a full state or spool disk pauses intake and new starts.",
    )
    .sample(&[], if s.disk_low { 1.0 } else { 0.0 });
    out
}

/// Replace `path` with `text`: a fresh temporary beside it (never an
/// existing file or a link), mode 0644, renamed over it.  The folder is
/// opened without following a link in its last component; the file's name
/// is one plain component.
pub(crate) fn write_file(path: &Path, text: &str) -> Result<()> {
    use rustix::fs::{Mode, OFlags};
    let (Some(folder), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        bail!("{} names no file", path.display());
    };
    let dir = crate::safe_fs::Dir::open(folder)?;
    let tmp = crate::durable::fit_file_name(".", name, ".partial");
    dir.remove(&tmp)
        .with_context(|| format!("in {}", folder.display()))?;
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .with_context(|| format!("creating {}", folder.join(&tmp).display()))?;
    // The umask may have taken bits away: node-exporter reads it as another user.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o644))
        .with_context(|| format!("setting the mode of {}", folder.join(&tmp).display()))?;
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(text.as_bytes())
        .with_context(|| format!("writing {}", folder.join(&tmp).display()))
        .and_then(|_| {
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)
                .with_context(|| format!("renaming {tmp} to {}", path.display()))
        });
    if written.is_err() {
        let _ = dir.remove(&tmp);
    }
    written
}

/// Where the main loop stands with the file: when it last wrote it, and
/// the failure it last logged (each failure is logged once, and a recovery
/// once).
#[derive(Debug)]
pub struct MetricsFile {
    path: std::path::PathBuf,
    last: Option<std::time::Instant>,
    failing: Option<String>,
}

impl MetricsFile {
    pub fn new(path: std::path::PathBuf) -> Self {
        if path.extension().is_none_or(|e| e != "prom") {
            tracing::warn!(
                "metrics_file {} does not end in .prom: node-exporter's textfile collector reads *.prom only",
                path.display()
            );
        }
        Self {
            path,
            last: None,
            failing: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Never written, or not for [`WRITE_EVERY`].
    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= WRITE_EVERY)
    }

    /// Write `snapshot`; a failure is logged (once until it changes), never
    /// returned: monitoring must not stop the daemon.
    pub fn write(&mut self, snapshot: &Snapshot) {
        self.last = Some(std::time::Instant::now());
        match write_file(&self.path, &render(snapshot)) {
            Ok(()) => {
                if self.failing.take().is_some() {
                    tracing::info!("wrote the metrics file {} again", self.path.display());
                }
            }
            Err(e) => {
                let mut msg = format!("could not write the metrics file: {e:#}");
                if e.chain().any(|c| {
                    c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::ROFS)
                }) {
                    msg.push_str(
                        " (under the systemd unit's ProtectSystem=strict, add its folder to ReadWritePaths=)",
                    );
                }
                if self.failing.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg}; the daemon goes on without it");
                    self.failing = Some(msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [&str; 3] = ["queued", "running", "done"];

    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            version: "0.1.0".into(),
            up: true,
            pools: vec![
                PoolFigures {
                    name: "GPU 0 (Evil \"GPU\"\nmezod_up 0)".into(),
                    uuid: Some("GPU-0\\x".into()),
                    total_bytes: 80 << 30,
                    free_bytes: 3 << 30,
                    reserved_bytes: 1_500_000_000,
                    running_jobs: 2,
                },
                PoolFigures {
                    name: "CPU".into(),
                    uuid: None,
                    total_bytes: 1 << 36,
                    free_bytes: 1 << 35,
                    reserved_bytes: 0,
                    running_jobs: 0,
                },
            ],
            preemptions: Some(3),
            intake_backlog: Some(7),
            intake_checking: 4,
            ..Default::default()
        };
        s.add_jobs("nobody", "queued", 2, &STATES);
        s.add_jobs("nobody", "done", 1, &STATES);
        s.add_jobs("nobody", "queued", 1, &STATES);
        s.add_jobs("a\"b\nc\\d", "running", 1, &STATES);
        s.usage.insert("nobody".into(), 7560.5);
        s.usage.insert("65533".into(), 0.0);
        s
    }

    /// The file, line by line: HELP and TYPE before each family's samples,
    /// labels sorted by user then state, every label value escaped (a
    /// hostile name cannot start a line of its own or close its quote).
    #[test]
    fn the_text_format_exactly() {
        let text = render(&snapshot());
        let expected = [
            "# HELP mezod_up 1 while the daemon runs; 0 written at a clean stop.",
            "# TYPE mezod_up gauge",
            "mezod_up 1",
            "# HELP mezod_info The daemon's version.",
            "# TYPE mezod_info gauge",
            "mezod_info{version=\"0.1.0\"} 1",
            "# HELP mezod_jobs Jobs in the daemon's table by state and owner.",
            "# TYPE mezod_jobs gauge",
            r#"mezod_jobs{state="done",user="a\"b\nc\\d"} 0"#,
            r#"mezod_jobs{state="queued",user="a\"b\nc\\d"} 0"#,
            r#"mezod_jobs{state="running",user="a\"b\nc\\d"} 1"#,
            r#"mezod_jobs{state="done",user="nobody"} 1"#,
            r#"mezod_jobs{state="queued",user="nobody"} 3"#,
            r#"mezod_jobs{state="running",user="nobody"} 0"#,
            "# HELP mezod_pool_total_bytes Memory of a pool (a GPU, or the machine's RAM for CPU jobs).",
            "# TYPE mezod_pool_total_bytes gauge",
            r#"mezod_pool_total_bytes{pool="GPU 0 (Evil \"GPU\"\nmezod_up 0)",uuid="GPU-0\\x"} 85899345920"#,
            r#"mezod_pool_total_bytes{pool="CPU"} 68719476736"#,
            "# HELP mezod_pool_free_bytes Free memory of a pool as last measured (NVML, or MemAvailable).",
            "# TYPE mezod_pool_free_bytes gauge",
            r#"mezod_pool_free_bytes{pool="GPU 0 (Evil \"GPU\"\nmezod_up 0)",uuid="GPU-0\\x"} 3221225472"#,
            r#"mezod_pool_free_bytes{pool="CPU"} 34359738368"#,
            "# HELP mezod_pool_reserved_bytes The memory estimates of mezod's jobs running in a pool, summed.",
            "# TYPE mezod_pool_reserved_bytes gauge",
            r#"mezod_pool_reserved_bytes{pool="GPU 0 (Evil \"GPU\"\nmezod_up 0)",uuid="GPU-0\\x"} 1500000000"#,
            r#"mezod_pool_reserved_bytes{pool="CPU"} 0"#,
            "# HELP mezod_pool_running_jobs mezod's jobs running in a pool.",
            "# TYPE mezod_pool_running_jobs gauge",
            r#"mezod_pool_running_jobs{pool="GPU 0 (Evil \"GPU\"\nmezod_up 0)",uuid="GPU-0\\x"} 2"#,
            r#"mezod_pool_running_jobs{pool="CPU"} 0"#,
            "# HELP mezod_user_usage_device_seconds A user's recent usage for fair share: device-seconds, decayed with the configured half-life.",
            "# TYPE mezod_user_usage_device_seconds gauge",
            r#"mezod_user_usage_device_seconds{user="65533"} 0"#,
            r#"mezod_user_usage_device_seconds{user="nobody"} 7560.5"#,
            "# HELP mezod_preemptions_total Preemptions of the jobs in the daemon's table.",
            "# TYPE mezod_preemptions_total counter",
            "mezod_preemptions_total 3",
            "# HELP mezod_intake_backlog Files in the spool waiting for their intake check.",
            "# TYPE mezod_intake_backlog gauge",
            "mezod_intake_backlog 7",
            "# HELP mezod_intake_checking Intake checks under way.",
            "# TYPE mezod_intake_checking gauge",
            "mezod_intake_checking 4",
            "# HELP mezod_disk_low 1 while a full state or spool disk pauses intake and new starts.",
            "# TYPE mezod_disk_low gauge",
            "mezod_disk_low 0",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for (i, (got, want)) in lines.iter().zip(expected.iter()).enumerate() {
            assert_eq!(got, want, "line {}", i + 1);
        }
        assert_eq!(lines.len(), expected.len(), "{text}");
        assert!(text.ends_with('\n'));
    }

    /// What is not known is left out, HELP and TYPE too; nothing but
    /// `mezod_up` says a stopped daemon is up; values that are not numbers
    /// are spelled as Prometheus reads them.
    #[test]
    fn unknown_figures_are_left_out() {
        let mut s = Snapshot {
            version: "x".into(),
            ..Default::default()
        };
        s.usage.insert("u".into(), f64::NAN);
        let text = render(&s);
        assert!(text.starts_with("# HELP mezod_up"));
        assert!(text.contains("\nmezod_up 0\n"));
        for absent in [
            "mezod_jobs",
            "mezod_pool_",
            "mezod_preemptions",
            "mezod_intake_backlog",
        ] {
            assert!(!text.contains(absent), "{absent}: {text}");
        }
        assert!(text.contains("mezod_user_usage_device_seconds{user=\"u\"} NaN\n"));
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(1e21), "1000000000000000000000");
        assert_eq!(value(0.25), "0.25");
    }

    /// The file is replaced whole, 0644 whatever the umask, without its
    /// temporary; a link at the temporary's name is removed, not followed.
    #[test]
    fn the_file_is_replaced_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mezod.prom");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join(".mezod.prom.partial")).unwrap();
        // Written by a child with umask 077 (the umask is the process's:
        // changing this one's would race the other tests).
        // SAFETY: the child only sets its umask, writes and exits; glibc
        // makes malloc usable in the child of a threaded parent.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::umask(0o077) };
            let ok = write_file(&path, "mezod_up 1\n").is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mezod_up 1\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        write_file(&path, "mezod_up 0\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mezod_up 0\n");
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
        assert!(write_file(&tmp.path().join("no/such/folder.prom"), "").is_err());
    }
}
