//! The daemon's configuration file (YAML; every field optional).
//!
//! ```yaml
//! spool: /var/lib/mezod/spool      # new/ tmp/ cur/ rejected/ live here
//! state: /var/lib/mezod            # sled database and one folder per job
//! runtime: /run/mezod              # the control socket
//! gpus: all                        # or a list of indices / UUIDs (GPU-… or MIG-…)
//! memory_margin_mib: 1024          # kept free on every GPU (and in RAM)
//! jobs_per_gpu: 8                  # jobs sharing one GPU (or MIG instance), memory permitting
//! cpu_slots: 1                     # concurrent CPU jobs
//! cpu_threads_per_job: null        # default: cores / cpu_slots
//! rescan_interval_s: 10            # spool rescan besides inotify
//! watch: auto                      # auto | inotify | poll
//! snapshot_every: 100              # for jobs that do not set it
//! retry_limit: 3                   # worker crashes retried before `failed`
//! retry_backoff_s: 2               # doubled on each retry
//! disk_reserve_mib: 64             # free space kept on the state and spool disks
//! jobs_per_user: 1000              # a user's jobs waiting or running (root: no limit)
//! user_priority_max: 0             # the highest priority a user may ask for
//! admin_group: null                # members may ask for more (root always may)
//! pids_per_job: 4096               # processes and threads of one job (cgroup pids.max)
//! running_per_user: null           # a user's jobs running at once (root: no limit)
//! gpu_share_per_user: null         # e.g. 0.5: of each GPU's memory, what one user's jobs may reserve
//! fair_share_half_life_h: 24       # usage decays by half in this time
//! metrics_file: null               # e.g. /var/lib/node_exporter/textfile_collector/mezod.prom
//! preemption: false                # stop lower-priority jobs for a waiting one
//! preemption_gap: 1                # by at least this much priority
//! preemption_min_run_s: 300        # a job runs this long before it can be preempted
//! elastic_wait_s: 600              # a job with parallel.elastic: true waits this long
//!                                  # for all its replicas' pools, then starts with fewer
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub spool: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub runtime: Option<PathBuf>,
    pub gpus: GpuSelection,
    pub memory_margin_mib: u64,
    /// Jobs that may share one GPU (or MIG instance) at once.  Memory
    /// decides first (every job's estimate must fit in what NVML says is
    /// free); this only caps how many small jobs pile onto one device,
    /// since each has its own CUDA context and they share the device's time.
    pub jobs_per_gpu: usize,
    pub cpu_slots: usize,
    pub cpu_threads_per_job: Option<i32>,
    pub rescan_interval_s: f64,
    pub watch: WatchMode,
    pub snapshot_every: u64,
    pub retry_limit: u32,
    pub retry_backoff_s: f64,
    /// Free space the daemon keeps on its state and spool disks: below it,
    /// intake and new starts pause until there is twice as much.
    pub disk_reserve_mib: u64,
    /// Jobs one user may have waiting or running at once (root has no
    /// limit): a file past it is rejected, so one user's backlog cannot
    /// fill the daemon's database and queue.
    pub jobs_per_user: usize,
    /// The highest `priority` a user's job may ask for; root and members
    /// of `admin_group` may ask for more.
    pub user_priority_max: i32,
    /// A group (name) whose members may set priorities above
    /// `user_priority_max`.
    pub admin_group: Option<String>,
    /// Processes and threads one job may have (its cgroup's `pids.max`,
    /// where the pids controller is there): a job cannot use up the
    /// service's tasks so that no check or worker can start.
    pub pids_per_job: u64,
    /// Jobs one user may have running at once (none: no limit; root is
    /// never limited).
    pub running_per_user: Option<usize>,
    /// The fraction of each GPU's (or MIG instance's) memory that one
    /// user's running jobs may reserve together, by their estimates (None:
    /// no limit; root is never limited): with 0.5, no user holds more than
    /// half of any GPU, however long their queue.
    pub gpu_share_per_user: Option<f64>,
    /// Fair share: a user's usage halves in this many hours.
    pub fair_share_half_life_h: f64,
    /// A Prometheus text-format file the daemon rewrites every 15 s (and at
    /// start), for node-exporter's textfile collector: an absolute path,
    /// ending in `.prom`, in a folder the daemon may write (see
    /// [`metrics`](super::metrics)).  None: no file.
    pub metrics_file: Option<PathBuf>,
    /// Stop running jobs (at a step boundary; they resume bit-identically)
    /// to make room for a waiting job that outranks them.
    pub preemption: bool,
    /// How much higher a waiting job's priority must be than a running
    /// job's for it to preempt that job.
    pub preemption_gap: i32,
    /// A job runs at least this long before it can be preempted (again), so
    /// that jobs do not thrash.
    pub preemption_min_run_s: u64,
    /// How long a job with `parallel: {elastic: true}` waits for a pool per
    /// replica before it may start with fewer (it computes the same bits,
    /// more slowly).
    pub elastic_wait_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GpuSelection {
    /// `all`
    All(AllGpus),
    /// Indices (as NVML numbers them) or UUIDs.
    Listed(Vec<GpuId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllGpus {
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GpuId {
    Index(u32),
    Uuid(String),
}

impl GpuSelection {
    /// Whether the daemon may use this GPU or MIG instance: a GPU's index
    /// or UUID selects it and all its MIG instances, a `MIG-…` UUID one
    /// instance.
    pub fn allows(&self, gpu: &crate::gpu::GpuInfo) -> bool {
        match self {
            GpuSelection::All(_) => true,
            GpuSelection::Listed(ids) => ids.iter().any(|id| match id {
                GpuId::Index(i) => *i == gpu.index,
                GpuId::Uuid(u) => gpu.is_named_by(u),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// inotify, falling back to polling where it cannot be set up.
    Auto,
    Inotify,
    /// Polling (network filesystems, where inotify sees no remote changes).
    Poll,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            spool: None,
            state: None,
            runtime: None,
            gpus: GpuSelection::All(AllGpus::All),
            memory_margin_mib: 1024,
            jobs_per_gpu: 8,
            cpu_slots: 1,
            cpu_threads_per_job: None,
            rescan_interval_s: 10.0,
            watch: WatchMode::Auto,
            snapshot_every: 100,
            retry_limit: 3,
            retry_backoff_s: 2.0,
            disk_reserve_mib: 64,
            jobs_per_user: 1000,
            user_priority_max: 0,
            admin_group: None,
            pids_per_job: 4096,
            running_per_user: None,
            gpu_share_per_user: None,
            fair_share_half_life_h: 24.0,
            metrics_file: None,
            preemption: false,
            preemption_gap: 1,
            preemption_min_run_s: 300,
            elastic_wait_s: 600,
        }
    }
}

/// Where the daemon keeps things, resolved once at start.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub spool: PathBuf,
    pub state: PathBuf,
    pub runtime: PathBuf,
}

impl Dirs {
    pub fn socket(&self) -> PathBuf {
        self.runtime.join("mezod.sock")
    }
    pub fn jobs(&self) -> PathBuf {
        self.state.join("jobs")
    }
    pub fn job(&self, id: u64) -> PathBuf {
        self.jobs().join(id.to_string())
    }
    pub fn db(&self) -> PathBuf {
        self.state.join("db")
    }
}

impl DaemonConfig {
    /// The fair-share half-life in seconds.
    pub(crate) fn half_life_s(&self) -> f64 {
        self.fair_share_half_life_h * 3600.0
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading daemon config {}", path.display()))?;
        let cfg: Self = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid daemon config {}: {e}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.jobs_per_gpu == 0 {
            bail!("jobs_per_gpu must be at least 1");
        }
        if !(self.rescan_interval_s > 0.0) {
            bail!("rescan_interval_s must be positive");
        }
        if !(self.retry_backoff_s >= 0.0) {
            bail!("retry_backoff_s must not be negative");
        }
        if !(self.fair_share_half_life_h.is_finite() && self.fair_share_half_life_h > 0.0) {
            bail!("fair_share_half_life_h must be a positive number of hours (Slurm's default is a week: 168)");
        }
        if self.running_per_user == Some(0) || self.jobs_per_user == 0 {
            bail!("running_per_user and jobs_per_user must be at least 1 (leave running_per_user out for no limit)");
        }
        if let Some(share) = self.gpu_share_per_user {
            if !(share > 0.0 && share <= 1.0) {
                bail!("gpu_share_per_user must be a fraction above 0 and at most 1 (0.5: half of each GPU), not {share}");
            }
        }
        if self.preemption_gap < 1 {
            bail!("preemption_gap must be at least 1 (a job never preempts one of equal priority)");
        }
        if let Some(p) = &self.metrics_file {
            if !p.is_absolute() || p.file_name().is_none() {
                bail!(
                    "metrics_file must be the absolute path of a file (e.g. /var/lib/node_exporter/textfile_collector/mezod.prom), not {}",
                    p.display()
                );
            }
        }
        if self.pids_per_job < 16 {
            bail!("pids_per_job must be at least 16 (a worker's threads count)");
        }
        Ok(())
    }

    pub(crate) fn margin_bytes(&self) -> u64 {
        self.memory_margin_mib << 20
    }

    pub(crate) fn rescan_interval(&self) -> Duration {
        Duration::from_secs_f64(self.rescan_interval_s)
    }

    /// Threads for a CPU job that does not set its own.
    pub(crate) fn cpu_threads(&self) -> i32 {
        self.cpu_threads_per_job.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.cpu_slots.max(1)).max(1) as i32
        })
    }

    /// Command-line paths win over the file; then systemd's directories
    /// (`StateDirectory=`, `RuntimeDirectory=`); then `./var/`.
    pub(crate) fn dirs(
        &self,
        spool: Option<PathBuf>,
        state: Option<PathBuf>,
        runtime: Option<PathBuf>,
    ) -> Dirs {
        let env_dir = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        let state = state
            .or(self.state.clone())
            .or_else(|| env_dir("STATE_DIRECTORY"))
            .unwrap_or_else(|| PathBuf::from("var/state"));
        let spool = spool
            .or(self.spool.clone())
            .or_else(|| env_dir("STATE_DIRECTORY").map(|d| d.join("spool")))
            .unwrap_or_else(|| PathBuf::from("var/spool"));
        let runtime = runtime
            .or(self.runtime.clone())
            .or_else(|| env_dir("RUNTIME_DIRECTORY"))
            .unwrap_or_else(|| PathBuf::from("var/run"));
        let abs = |p: PathBuf| {
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir().map(|c| c.join(&p)).unwrap_or(p)
            }
        };
        Dirs {
            spool: abs(spool),
            state: abs(state),
            runtime: abs(runtime),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_full_file_parse() {
        let cfg: DaemonConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(cfg, DaemonConfig::default());
        let cfg: DaemonConfig =
            serde_yaml::from_str("gpus: [0, GPU-abc]\ncpu_slots: 2\nwatch: poll\nretry_limit: 1\n")
                .unwrap();
        assert!(
            cfg.gpus.allows(&gpu(0, "GPU-x", None)) && cfg.gpus.allows(&gpu(3, "GPU-abc", None))
        );
        assert!(!cfg.gpus.allows(&gpu(1, "GPU-def", None)));
        assert_eq!(cfg.watch, WatchMode::Poll);
        for share in ["0", "1.5", "-0.5", ".nan"] {
            let cfg: DaemonConfig =
                serde_yaml::from_str(&format!("gpu_share_per_user: {share}\n")).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(
                e.contains("gpu_share_per_user must be a fraction"),
                "{share}: {e}"
            );
        }
        let cfg: DaemonConfig = serde_yaml::from_str("gpu_share_per_user: 0.5\n").unwrap();
        cfg.validate().unwrap();
        let e = serde_yaml::from_str::<DaemonConfig>("cpu_slot: 2\n").unwrap_err();
        assert!(e.to_string().contains("cpu_slot"), "{e}");
    }

    fn gpu(index: u32, uuid: &str, mig: Option<(u32, &str)>) -> crate::gpu::GpuInfo {
        crate::gpu::GpuInfo {
            index,
            mig: mig.map(|(slot, parent)| crate::gpu::MigSlot {
                slot,
                parent_uuid: parent.into(),
            }),
            uuid: uuid.into(),
            name: "Test GPU".into(),
            total_bytes: 1,
            free_bytes: 1,
            processes: vec![],
        }
    }

    /// A GPU's index or UUID selects its MIG instances; a MIG UUID one of them.
    #[test]
    fn gpus_selects_mig_instances_by_their_gpu_or_their_own_uuid() {
        let select = |text: &str| serde_yaml::from_str::<DaemonConfig>(text).unwrap().gpus;
        let a = gpu(0, "MIG-a", Some((0, "GPU-p")));
        let b = gpu(0, "MIG-b", Some((1, "GPU-p")));
        let other = gpu(1, "MIG-c", Some((0, "GPU-q")));
        for by_parent in ["gpus: [0]\n", "gpus: [GPU-p]\n"] {
            let s = select(by_parent);
            assert!(
                s.allows(&a) && s.allows(&b) && !s.allows(&other),
                "{by_parent}"
            );
        }
        let s = select("gpus: [MIG-b]\n");
        assert!(!s.allows(&a) && s.allows(&b) && !s.allows(&other));
    }

    #[test]
    fn a_metrics_file_is_an_absolute_path() {
        let cfg = |text: &str| {
            serde_yaml::from_str::<DaemonConfig>(text)
                .unwrap()
                .validate()
        };
        cfg("metrics_file: /var/lib/node_exporter/textfile_collector/mezod.prom\n").unwrap();
        let e = cfg("metrics_file: mezod.prom\n").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }
}
