//! `mezod daemon`: takes job files from a spool folder, admits them by free
//! memory, runs each in its own worker process, and keeps every step durable
//! so that nothing is lost to a crash, a kill or a reboot.
//!
//! One thread owns all state (the *main loop* in [`server`]); the spool
//! watcher, the signal handler, the control socket and one reader per worker
//! only send it [`server::Event`]s.  Module map:
//!
//! * [`config`]: the daemon's YAML config and its folders;
//! * [`spool`]: `new/ → cur/ | rejected/`, exactly once;
//! * [`checker`]: the intake check, as the file's owner, in a bounded child;
//! * [`job_facts`]: what the daemon reads from a job file itself (never from the check);
//! * [`jobs`]: the job table in sled;
//! * [`job_dir`]: a job's folder: what is the daemon's, what is its owner's;
//! * [`lifecycle`]: a job's states and the only legal moves between them;
//! * [`admission`]: which job starts where (pure, tested with a scripted probe);
//! * [`fair_share`]: each user's recent usage, decayed with a half-life;
//! * [`worker`]: the worker process and its step-record pipe;
//! * [`callback`]: a job's `notify:` command, run as its owner when it ends;
//! * [`cgroup`]: one cgroup v2 per job: its limits, its kill, its memory;
//! * [`handoff`]: the environment and descriptors an owner's process starts with;
//! * [`control`]: the Unix-socket protocol of `status`, `cancel`, `logs`, `submit`;
//! * [`disk`]: free space, the reserve, and what a full disk pauses;
//! * [`notify`]: systemd's READY / STATUS / WATCHDOG;
//! * [`metrics`]: the Prometheus text file for node-exporter (`metrics_file:`);
//! * [`server`]: the main loop that ties them together.

pub mod admission;
pub mod callback;
pub mod cgroup;
pub mod checker;
pub mod config;
pub mod control;
pub mod disk;
pub mod fair_share;
pub mod handoff;
pub mod job_dir;
pub mod job_facts;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod spool;
pub mod worker;
