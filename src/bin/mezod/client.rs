//! The client side of the daemon: `mezod submit | status | cancel | logs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use mezod_core::daemon::control::{default_socket, request, Lookup, Request, Response};
use mezod_core::daemon::spool::drop_job;
use mezod_core::estimate::human_bytes;
use mezod_core::spec::JobSpec;

fn socket_or_default(socket: Option<PathBuf>) -> PathBuf {
    socket.unwrap_or_else(default_socket)
}

fn expect_ok(r: Response) -> Result<Response> {
    match r {
        Response::Error(e) => bail!("{e}"),
        other => Ok(other),
    }
}

/// The job text as it goes into the spool: checked, with relative paths
/// pinned by a `workdir:` line (the spool is not where the data lives).
fn spool_text(job: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(job).with_context(|| format!("reading {}", job.display()))?;
    let spec = JobSpec::load(job)?;
    if spec.workdir.is_some() {
        return Ok(text);
    }
    let dir = std::fs::canonicalize(job)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let line = format!("workdir: {}\n", serde_json::to_string(&dir)?);
    Ok(match text.strip_prefix("---\n") {
        Some(rest) => format!("---\n{line}{rest}"),
        None => format!("{line}{text}"),
    })
}

pub fn submit(
    job: &Path,
    spool: Option<PathBuf>,
    socket: Option<PathBuf>,
    wait: f64,
) -> Result<ExitCode> {
    let text = spool_text(job)?;
    let socket = socket_or_default(socket);
    let spool = match spool {
        Some(s) => s,
        None => match expect_ok(request(&socket, &Request::Hello)?)? {
            Response::Hello { spool, .. } => spool,
            other => bail!("unexpected answer {other:?}"),
        },
    };
    let stem = job
        .file_stem()
        .map_or("job".into(), |s| s.to_string_lossy().to_string());
    let name = drop_job(&spool, &stem, &text)?;
    let deadline = Instant::now() + Duration::from_secs_f64(wait);
    loop {
        let answer = request(&socket, &Request::Lookup { name: name.clone() });
        match answer.and_then(expect_ok) {
            Ok(Response::Lookup(Lookup::Accepted { id })) => {
                eprintln!("submitted {} as job {id}", job.display());
                println!("{id}");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Lookup(Lookup::Rejected { reason })) => {
                eprint!("{reason}");
                return Ok(ExitCode::FAILURE);
            }
            Ok(_) | Err(_) if Instant::now() >= deadline => {
                eprintln!(
                    "spooled as {name} in {}; the daemon has not taken it yet (`mezod status` shows it once it has)",
                    spool.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

pub fn status(
    id: Option<u64>,
    finished: Option<usize>,
    json: bool,
    socket: Option<PathBuf>,
) -> Result<ExitCode> {
    let Response::Status(report) = expect_ok(request(
        &socket_or_default(socket),
        &Request::Status { id, finished },
    )?)?
    else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("mode: {}", report.mode);
    for p in &report.pools {
        println!(
            "  {}: {} free of {}, {} job(s) of ours",
            p.name,
            human_bytes(p.free_bytes),
            human_bytes(p.total_bytes),
            p.running
        );
    }
    println!(
        "{:>4}  {:<8} {:<10} {:>11} {:>8} {:>8} {:>10} {:>10} {:>8}  {}",
        "ID", "OWNER", "STATE", "STEP", "STEPS/S", "LOSS", "ESTIMATE", "PEAK", "ETA", "NAME / WHY"
    );
    for v in &report.jobs {
        let j = &v.job;
        println!(
            "{:>4}  {:<8} {:<10} {:>11} {:>8} {:>8} {:>10} {:>10} {:>8}  {} — {}",
            j.id,
            user_name(j.owner_uid),
            j.state.to_string(),
            format!("{}/{}", j.steps_done, j.steps_total),
            v.steps_per_s.map_or("-".into(), |r| format!("{r:.2}")),
            j.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            human_bytes(j.estimate_bytes),
            if j.peak_bytes > 0 {
                human_bytes(j.peak_bytes)
            } else {
                "-".into()
            },
            v.eta_s.map_or("-".into(), format_duration),
            j.name,
            j.reason
        );
    }
    if report.finished_not_shown > 0 {
        println!(
            "… and {} older ended job(s) (`mezod status --all`, or `--last N`)",
            report.finished_not_shown
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(id: u64, socket: Option<PathBuf>) -> Result<ExitCode> {
    match expect_ok(request(
        &socket_or_default(socket),
        &Request::Cancel { id },
    )?)? {
        Response::Cancelled { id, state } => println!("job {id}: {state}"),
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logs(id: u64, follow: bool, socket: Option<PathBuf>) -> Result<ExitCode> {
    let socket = socket_or_default(socket);
    let mut offset = 0;
    loop {
        match expect_ok(request(&socket, &Request::Logs { id, offset })?)? {
            Response::Logs {
                data,
                offset: next,
                finished,
            } => {
                print!("{data}");
                offset = next;
                if !follow || finished {
                    return Ok(ExitCode::SUCCESS);
                }
                if data.is_empty() {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| uid.to_string())
}
