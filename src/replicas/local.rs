//! `mezod run` of a job with `parallel: {replicas: K}` and no launcher
//! around it: start the K replicas on this machine as torchrun would (its
//! environment variables, a free port on loopback, the cores divided among
//! them) and wait for them.
//!
//! The replicas get a process group of their own, so that a Ctrl-C reaches
//! them once, through this process, which passes SIGINT and SIGTERM on: the
//! first stops them all after the same step, a second ends them at once.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

/// Start replica processes running `mezod run JOB --out OUT` (with `flags`,
/// `--restart` for the leader alone), and end as the leader ends.
pub fn run_local(
    job: &Path,
    out: &Path,
    flags: &[&str],
    restart: bool,
    replicas: usize,
    threads: Option<i32>,
) -> Result<ExitCode> {
    let port = free_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads.unwrap_or((cores / replicas).max(1) as i32);
    let engine = std::env::current_exe().context("finding the engine binary")?;
    let pending = Arc::new(AtomicI32::new(0));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let pending = Arc::clone(&pending);
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                pending.store(signal, Ordering::SeqCst)
            })
        }?;
    }
    let mut children = Vec::with_capacity(replicas);
    for rank in 0..replicas {
        let mut args: Vec<OsString> = vec!["run".into(), job.into(), "--out".into(), out.into()];
        args.extend(flags.iter().map(OsString::from));
        if restart && rank == 0 {
            args.push("--restart".into());
        }
        args.extend(["--threads".into(), threads.to_string().into()]);
        let mut command = Command::new(&engine);
        command
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", replicas.to_string())
            .env("LOCAL_WORLD_SIZE", replicas.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .process_group(0);
        if rank > 0 {
            // The leader speaks for the run; the others say only what goes wrong.
            command.stdout(Stdio::null());
            if std::env::var_os("MEZOD_LOG").is_none() {
                command.env("MEZOD_LOG", "warn");
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting replica {rank} ({})", engine.display()))?;
        children.push(child);
    }
    tracing::info!(
        "{replicas} replicas started, {threads} threads each, exchanging on port {port}"
    );
    let statuses = wait_all(&mut children, &pending)?;
    Ok(exit_code(statuses[0]))
}

/// Wait for every replica, passing each signal this process gets on to them.
fn wait_all(children: &mut [Child], pending: &AtomicI32) -> Result<Vec<ExitStatus>> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        let signal = pending.swap(0, Ordering::SeqCst);
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                if signal != 0 {
                    // SAFETY: kill(2) on a child this process started and has not reaped.
                    unsafe { libc::kill(child.id() as i32, signal) };
                }
                *status = child.try_wait()?;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(statuses
        .into_iter()
        .map(|s| s.expect("every replica ended"))
        .collect())
}

/// The leader's status as this process's: its code, or 128 + its signal.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal) as u8),
        (None, None) => ExitCode::FAILURE,
    }
}

/// A port on loopback that nothing listens on now (the leader's store takes it).
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on loopback")?;
    Ok(listener.local_addr()?.port())
}
