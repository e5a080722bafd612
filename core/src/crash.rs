//! Crash points: places where a test can make the process die on the spot
//! (`abort`, no destructors, no flushes — as a power cut or a SIGKILL would),
//! to prove that a restart loses and duplicates nothing.
//!
//! Built only with the `failpoints` feature (`make test` has it), through the
//! `fail` crate: `FAILPOINTS="record-before-move=return"` arms a point for the
//! process.  Without the feature every point is a no-op.  Points:
//!
//! * daemon intake: `intake-before-record` (checked, nothing recorded),
//!   `record-before-move` (record and claim durable, file still in `new/`),
//!   `record-after-move` (file in `cur/`, claim not yet removed);
//! * daemon workers: `worker-record-before-flush` (a step record received and
//!   inserted, not yet flushed);
//! * engine snapshots: `snapshot-before-hash` (weights written, hash sidecar not).

/// Arm the points named in `FAILPOINTS` for this process's lifetime; says so
/// on stderr, so that a test can tell a build without crash points.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    if let Ok(points) = std::env::var("FAILPOINTS") {
        eprintln!("crash points armed: {points}");
        std::mem::forget(fail::FailScenario::setup());
    }
}

/// Die here if the point `name` is armed.
pub fn point(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("crash point {name}: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
