//! The client side of the daemon: `mezod submit | status | cancel | restart |
//! clean | logs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use mezod_core::daemon::control::{
    default_socket, request, JobDetail, JobView, Lookup, Request, Response,
};
use mezod_core::daemon::jobs::JobState;
use mezod_core::daemon::spool::drop_job;
use mezod_core::estimate::human_bytes;
use mezod_core::printable::{printable, printable_line};
use mezod_core::spec::{as_job_name, JobRef, JobSpec};

fn socket_or_default(socket: Option<PathBuf>) -> PathBuf {
    socket.unwrap_or_else(default_socket)
}

/// The daemon's error as ours (printed escaped, as every error line is).
fn expect_ok(r: Response) -> Result<Response> {
    match r {
        Response::Error(e) => bail!("{e}"),
        other => Ok(other),
    }
}

/// The job text as it goes into the spool: with relative paths pinned by a
/// `workdir:` line (the spool is not where the data lives), unless it has
/// one, a `name:` from the file's name (the spool's is a temporary one), the
/// jobs of `--after` added to its `after:`, and a model named by its Hugging
/// Face id pinned to the snapshot found here (`model.snapshot`: the daemon
/// reads a spooled job without looking anything up, and its workers do not
/// have the submitter's cache variables).
fn spool_text(job: &Path, after: &[JobRef]) -> Result<String> {
    let mut text =
        std::fs::read_to_string(job).with_context(|| format!("reading {}", job.display()))?;
    let spec = JobSpec::load(job)?;
    let mut lines = String::new();
    if !after.is_empty() {
        let mut all = spec.after.clone();
        all.extend(after.iter().filter(|r| !spec.after.contains(r)).cloned());
        let list = serde_json::to_string(&all)?;
        if spec.after.is_empty() {
            lines.push_str(&format!("after: {list}\n"));
        } else {
            // The file has its own `after:`: the merged list replaces it
            // (the text is written anew, without its comments).
            let mut doc: serde_yaml::Mapping = serde_yaml::from_str(&text)
                .with_context(|| format!("reading {}", job.display()))?;
            doc.insert("after".into(), serde_yaml::to_value(&all)?);
            text = serde_yaml::to_string(&doc)?;
        }
    }
    if let Some(snapshot) = &spec.model.snapshot {
        let mut doc: serde_yaml::Mapping =
            serde_yaml::from_str(&text).with_context(|| format!("reading {}", job.display()))?;
        if let Some(serde_yaml::Value::Mapping(model)) = doc.get_mut("model") {
            model.insert("snapshot".into(), serde_yaml::to_value(snapshot)?);
        }
        text = serde_yaml::to_string(&doc)?;
    }
    if spec.workdir.is_none() {
        let dir = std::fs::canonicalize(job)?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        lines.push_str(&format!("workdir: {}\n", serde_json::to_string(&dir)?));
    }
    if spec.name.is_none() {
        let stem = job
            .file_stem()
            .map_or("job".into(), |s| s.to_string_lossy());
        lines.push_str(&format!(
            "name: {}\n",
            serde_json::to_string(&as_job_name(&stem))?
        ));
    }
    Ok(match text.strip_prefix("---\n") {
        Some(rest) => format!("---\n{lines}{rest}"),
        None => format!("{lines}{text}"),
    })
}

pub fn submit(
    job: &Path,
    after: &[JobRef],
    spool: Option<PathBuf>,
    socket: Option<PathBuf>,
    wait: f64,
) -> Result<ExitCode> {
    let text = spool_text(job, after)?;
    // Everything the daemon's intake would refuse it for, found here, as
    // you, before anything is queued.
    mezod_core::daemon::checker::check_text(&text)
        .with_context(|| format!("{} cannot run", job.display()))?;
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
    // The file is in the spool now, and will become a job: whatever happens
    // from here on is said in those terms (taken with its id, rejected with
    // why, or not taken yet), never as a failure that would make the user
    // submit it again and get a second job.  Nothing below drops it again.
    let deadline = Instant::now() + Duration::from_secs_f64(wait);
    loop {
        let answer = request(&socket, &Request::Lookup { name: name.clone() });
        let asking = match answer.and_then(expect_ok) {
            Ok(Response::Lookup(Lookup::Accepted { id })) => {
                eprintln!(
                    "submitted {} as job {id}",
                    printable_line(&job.display().to_string())
                );
                println!("{id}");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Lookup(Lookup::Rejected { reason })) => {
                eprint!("{}", printable(&reason));
                return Ok(ExitCode::FAILURE);
            }
            Ok(_) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            let asking = asking.map_or(String::new(), |e| format!(" (asking it: {e:#})"));
            eprintln!(
                "{}",
                printable(&format!(
                    "spooled as {name} in {}; the daemon has not taken it yet{asking}. It will \
                     take it as it is: do not submit it again (`mezod status` shows the job once \
                     it has)",
                    spool.display()
                ))
            );
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Which jobs `mezod status` lists.
pub struct Listing {
    /// Ended jobs shown, newest first.
    pub finished: usize,
    pub states: Vec<String>,
    /// A user name or uid.
    pub user: Option<String>,
}

pub fn status(listing: Listing, json: bool, socket: Option<PathBuf>) -> Result<ExitCode> {
    let owner = listing.user.as_deref().map(uid_of).transpose()?;
    let Response::Status(report) = expect_ok(request(
        &socket_or_default(socket),
        &Request::Status {
            id: None,
            finished: Some(listing.finished),
            states: listing.states,
            owner,
        },
    )?)?
    else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("mode: {}", printable_line(&report.mode));
    for p in &report.pools {
        println!(
            "  {}: {} free of {}, {} job(s) of ours",
            printable_line(&p.name),
            human_bytes(p.free_bytes),
            human_bytes(p.total_bytes),
            p.running
        );
    }
    let mut names = UserNames::default();
    if !report.users.is_empty() {
        // Fair share: who used the server lately (less goes first at equal priority).
        let shares: Vec<String> = report
            .users
            .iter()
            .map(|u| {
                format!(
                    "{} {} ({:.0} %)",
                    names.of(u.uid),
                    mezod_core::daemon::fair_share::describe(u.device_seconds),
                    100.0 * u.share
                )
            })
            .collect();
        println!(
            "fair share (usage halves every {}): {}",
            mezod_core::daemon::fair_share::describe_half_life(report.half_life_h * 3600.0),
            printable_line(&shares.join(", "))
        );
    }
    println!(
        "{:>4}  {:<8} {:<10} {:>11} {:>8} {:>8} {:>10} {:>10} {:>8}  {}",
        "ID", "OWNER", "STATE", "STEP", "STEPS/S", "LOSS", "ESTIMATE", "PEAK", "ETA", "NAME — WHY"
    );
    for v in &report.jobs {
        let j = &v.job;
        println!(
            "{:>4}  {:<8} {:<10} {:>11} {:>8} {:>8} {:>10} {:>10} {:>8}  {} — {}",
            j.id,
            names.of(j.owner_uid),
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
            printable_line(&j.name),
            printable_line(&one_line(&j.reason, 100))
        );
    }
    if report.finished_not_shown > 0 {
        println!(
            "… and {} older ended job(s) (`mezod status --all`, `--last N`; `mezod clean` forgets them)",
            report.finished_not_shown
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text`'s first line, cut to `max` characters: a table row stays one row
/// (`mezod status ID` shows all of it).
fn one_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    let mut out: String = first.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// `mezod status ID`: one job in detail.
pub fn show(id: u64, json: bool, socket: Option<PathBuf>) -> Result<ExitCode> {
    let Response::Job(detail) =
        expect_ok(request(&socket_or_default(socket), &Request::Show { id })?)?
    else {
        bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", describe(&detail, now()));
    Ok(ExitCode::SUCCESS)
}

fn now() -> u64 {
    mezod_core::daemon::jobs::now()
}

/// The detail view, as text.
/// result.json's `exported` in words: which step's weights the run handed
/// back and why (a run from before `export:` handed back its best step).
fn exported_words(exported: Option<&serde_json::Value>) -> String {
    match exported {
        Some(e) => format!(
            "step {}: {}",
            e["step"],
            e["why"].as_str().unwrap_or("(no reason recorded)")
        ),
        None => "no model (a baselines-only job, or a run from before `export:`, \
                 which handed back its best_step)"
            .into(),
    }
}

/// result.json's `test_paired` in words: the fine-tuned model against the
/// base one on the same test examples, with the interval on the difference.
fn paired_words(p: &serde_json::Value) -> String {
    let num = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "test vs base {:+.1} points ({:.0}% CI {:+.1} to {:+.1}, n {})",
        100.0 * num("difference"),
        100.0 * num("confidence"),
        100.0 * num("ci_low"),
        100.0 * num("ci_high"),
        p["n"]
    )
}

fn describe(d: &JobDetail, now: u64) -> String {
    let JobView {
        job: j,
        steps_per_s,
        eta_s,
    } = &d.view;
    // Every value here comes from a user (names, paths, reasons, results):
    // each is escaped on its own line.
    let mut out = format!("job {}: {}\n", j.id, printable_line(&j.name));
    let mut row = |label: &str, value: String| {
        out.push_str(&format!("  {label:<11}{value}\n"));
    };
    row(
        "owner",
        format!(
            "{} (uid {})",
            UserNames::default().of(j.owner_uid),
            j.owner_uid
        ),
    );
    let mut reason = j.reason.lines();
    row(
        "state",
        format!(
            "{}: {}",
            j.state,
            printable_line(reason.next().unwrap_or(""))
        ),
    );
    for more in reason {
        row("", printable_line(more).into_owned());
    }
    if !j.after.is_empty() {
        let ids: Vec<String> = j.after.iter().map(u64::to_string).collect();
        row("waits for", format!("job(s) {} (after:)", ids.join(", ")));
    }
    let mut steps = format!("{}/{}", j.steps_done, j.steps_total);
    if let Some(l) = j.last_loss {
        steps.push_str(&format!(", last loss {l:.4}"));
    }
    if let Some(r) = steps_per_s {
        steps.push_str(&format!(", {r:.2} steps/s"));
    }
    if let Some(e) = eta_s {
        steps.push_str(&format!(", {} to go", format_duration(*e)));
    }
    row("steps", steps);
    row(
        "attempts",
        match j.preemptions {
            0 => format!("{} ({} failed)", j.attempts, j.failures),
            n => format!(
                "{} ({} failed; preempted {n} time{}, resumed where it stopped)",
                j.attempts,
                j.failures,
                if n == 1 { "" } else { "s" }
            ),
        },
    );
    row("submitted", when(j.submitted_at, now));
    if let Some(t) = j.started_at {
        row("started", when(t, now));
    }
    if let Some(t) = j.state.finished_at() {
        row("ended", when(t, now));
    }
    row(
        "memory",
        format!(
            "estimate {}, peak {}",
            human_bytes(j.estimate_bytes),
            if j.peak_bytes > 0 {
                human_bytes(j.peak_bytes)
            } else {
                "-".into()
            }
        ),
    );
    if !j.gpus.is_empty() {
        // "GPU 0 (NVIDIA H100 …) GPU-…": records of older versions have no labels.
        let gpus: Vec<String> = j
            .gpus
            .iter()
            .enumerate()
            .map(|(i, uuid)| match j.gpu_labels.get(i) {
                Some(label) => format!("{label} {uuid}"),
                None => uuid.clone(),
            })
            .collect();
        row("gpu", printable_line(&gpus.join(", ")).into_owned());
    }
    if j.replicas > 1 {
        row(
            "replicas",
            format!(
                "{} processes, each measuring its share of every step's directions",
                j.replicas
            ),
        );
    }
    if !j.summary.is_empty() {
        row("runs", printable_line(&j.summary).into_owned());
    }
    if let Some(p) = &d.job_file {
        row(
            "job file",
            printable_line(&p.display().to_string()).into_owned(),
        );
    }
    if let Some(p) = &d.run_dir {
        row(
            "run folder",
            printable_line(&p.display().to_string()).into_owned(),
        );
    }
    if let JobState::Done {
        result: Some(serde_json::Value::Object(r)),
        ..
    } = &j.state
    {
        let shown: Vec<String> = r
            .iter()
            .filter(|(k, _)| *k != "exported")
            .map(|(k, v)| match v.as_f64() {
                _ if k == "test_paired" => paired_words(v),
                Some(x) if v.is_f64() => format!("{k} {x:.4}"),
                _ => format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_string)),
            })
            .collect();
        row("result", printable_line(&shown.join(", ")).into_owned());
        row(
            "exported",
            printable_line(&exported_words(r.get("exported"))).into_owned(),
        );
    }
    if !d.error_tail.is_empty() {
        out.push_str("  error:\n");
        for l in &d.error_tail {
            out.push_str(&format!("    {}\n", printable_line(l)));
        }
    }
    out
}

/// A time as UTC and how long ago.
fn when(t: u64, now: u64) -> String {
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC ({} ago)",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        format_duration(now.saturating_sub(t) as f64)
    )
}

/// `mezod why FILE`: what became of a file dropped into the spool by hand,
/// as the daemon answers its owner (the same question `submit` asks).
pub fn why(file: &Path, socket: Option<PathBuf>) -> Result<ExitCode> {
    let Some(name) = file.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        bail!("{} names no file", file.display());
    };
    let answer = request(
        &socket_or_default(socket),
        &Request::Lookup { name: name.clone() },
    )?;
    Ok(match expect_ok(answer)? {
        Response::Lookup(Lookup::Accepted { id }) => {
            println!(
                "{} became job {id} (`mezod status {id}`)",
                printable_line(&name)
            );
            ExitCode::SUCCESS
        }
        Response::Lookup(Lookup::Rejected { reason }) => {
            print!("{}", printable(&reason));
            ExitCode::FAILURE
        }
        Response::Lookup(Lookup::Pending) => {
            eprintln!(
                "{}",
                printable(&format!(
                    "the daemon has no verdict on {name} for you: it has not taken it yet, or \
                     it is not a file you dropped (`mezod status` lists your jobs)"
                ))
            );
            ExitCode::from(2)
        }
        other => bail!("unexpected answer {other:?}"),
    })
}

/// The daemon's answer about job `id`, named once: its own words when they
/// already say which job ("job 9 has already ended", "no job 9"), else
/// with "job 9: " before them.
fn about_job(id: u64, said: &str) -> String {
    let names_it = |s: &str| {
        s.strip_prefix(&id.to_string())
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    if said.strip_prefix("job ").is_some_and(names_it)
        || said.strip_prefix("no job ").is_some_and(names_it)
    {
        said.to_string()
    } else {
        format!("job {id}: {said}")
    }
}

/// Cancel each job; every one is tried, and the exit status says whether all were.
pub fn cancel(ids: &[u64], socket: Option<PathBuf>) -> Result<ExitCode> {
    let socket = socket_or_default(socket);
    let mut code = ExitCode::SUCCESS;
    for &id in ids {
        match request(&socket, &Request::Cancel { id }).and_then(expect_ok) {
            Ok(Response::Cancelled { id, state }) => {
                println!("job {id}: {}", printable_line(&state))
            }
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(e) => {
                eprintln!("error: {}", printable(&about_job(id, &format!("{e:#}"))));
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

pub fn restart(id: u64, socket: Option<PathBuf>) -> Result<ExitCode> {
    match expect_ok(request(
        &socket_or_default(socket),
        &Request::Restart { id },
    )?)? {
        Response::Restarted { id, from_step } => {
            println!("job {id}: queued again; resumes from step {from_step}")
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn priority(id: u64, priority: i32, socket: Option<PathBuf>) -> Result<ExitCode> {
    match expect_ok(request(
        &socket_or_default(socket),
        &Request::Priority { id, priority },
    )?)? {
        Response::Prioritized { id, priority } => println!("job {id}: priority {priority}"),
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clean(ids: Vec<u64>, purge: bool, socket: Option<PathBuf>) -> Result<ExitCode> {
    match expect_ok(request(
        &socket_or_default(socket),
        &Request::Clean { ids, purge },
    )?)? {
        Response::Cleaned { ids, purged } => {
            let what = if purged {
                "forgotten, folders deleted"
            } else {
                "forgotten, folders kept"
            };
            match ids.len() {
                0 => println!("no ended jobs to clean"),
                n => {
                    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
                    println!("{n} job(s) {what}: {}", list.join(" "));
                }
            }
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logs(
    id: u64,
    lines: Option<usize>,
    follow: bool,
    socket: Option<PathBuf>,
) -> Result<ExitCode> {
    let socket = socket_or_default(socket);
    let mut offset = 0;
    let mut tail = lines;
    // A carriage return at the end of one piece is held back until the next
    // says whether it ends a line (kept) or stands alone (escaped).
    let mut held_cr = false;
    loop {
        let ask = Request::Logs {
            id,
            offset,
            tail: tail.take(),
        };
        match expect_ok(request(&socket, &ask)?)? {
            Response::Logs {
                data,
                offset: next,
                finished,
            } => {
                let mut text = String::new();
                if std::mem::take(&mut held_cr) {
                    text.push('\r');
                }
                text.push_str(&data);
                let more = follow && !finished;
                if more && text.ends_with('\r') {
                    text.pop();
                    held_cr = true;
                }
                print!("{}", printable(&text));
                offset = next;
                if !more {
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

/// Exit status of `mezod wait` when its `--timeout` passed (as timeout(1)'s).
const TIMED_OUT: u8 = 124;
/// Exit status of `mezod wait` for an id the daemon does not know, or a
/// daemon it cannot ask (as clap's for a usage error).
const CANNOT_WAIT: u8 = 2;

/// `mezod wait ID…`: ask the daemon every half second until every job has
/// ended, printing a line for each as it ends.  0 if all ended `done`, 1
/// if one did not, [`CANNOT_WAIT`] for an unknown id, [`TIMED_OUT`] past
/// `timeout` seconds.  A daemon that goes away for a while (a restart) is
/// waited for too.
pub fn wait(ids: &[u64], timeout: Option<f64>, socket: Option<PathBuf>) -> Result<ExitCode> {
    let socket = socket_or_default(socket);
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    let mut left: Vec<u64> = Vec::new();
    for &id in ids {
        if !left.contains(&id) {
            left.push(id);
        }
    }
    let mut all_done = true;
    let mut first = true;
    let mut lost_daemon = false;
    // What each job was doing when last asked (for the timeout's message).
    let mut last_state: std::collections::HashMap<u64, String> = Default::default();
    loop {
        let mut answers = Vec::new();
        for &id in &left {
            match request(&socket, &Request::Show { id }) {
                Ok(r) => answers.push((id, r)),
                Err(e) if first => {
                    eprintln!("error: {}", printable(&format!("{e:#}")));
                    return Ok(ExitCode::from(CANNOT_WAIT));
                }
                Err(e) => {
                    if !lost_daemon {
                        eprintln!(
                            "{}",
                            printable(&format!("lost the daemon ({e:#}); still waiting"))
                        );
                        lost_daemon = true;
                    }
                    answers.clear();
                    break;
                }
            }
        }
        if first {
            // Every id must be a job before anything is waited for.
            let unknown: Vec<String> = answers
                .iter()
                .filter_map(|(id, r)| match r {
                    Response::Error(e) => Some(about_job(*id, e)),
                    _ => None,
                })
                .collect();
            if !unknown.is_empty() {
                for u in unknown {
                    eprintln!("error: {}", printable(&u));
                }
                return Ok(ExitCode::from(CANNOT_WAIT));
            }
            first = false;
        }
        if !answers.is_empty() {
            lost_daemon = false;
        }
        // Jobs seen ended in one round are told in the order they ended
        // (then by id: a job ends no sooner than the older ones it waits for).
        let ended_at = |r: &Response| match r {
            Response::Job(d) => d.view.job.state.finished_at().unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        answers.sort_by_key(|(id, r)| (ended_at(r), *id));
        for (id, r) in answers {
            let ended = match r {
                Response::Job(d) => {
                    let j = &d.view.job;
                    if !j.state.is_final() {
                        last_state.insert(id, j.state.to_string());
                        continue;
                    }
                    let done = matches!(j.state, JobState::Done { .. });
                    let how = if done {
                        String::new()
                    } else {
                        format!(": {}", one_line(&j.reason, 200))
                    };
                    println!(
                        "job {id} ({}): {}{}",
                        printable_line(&j.name),
                        j.state,
                        printable_line(&how)
                    );
                    done
                }
                // Gone since the first answer: only an ended job is
                // cleaned, and how it ended is not known.
                Response::Error(e) => {
                    println!(
                        "job {id}: {}",
                        printable_line(&format!("forgotten before its end was seen ({e})"))
                    );
                    false
                }
                other => bail!("unexpected answer {other:?}"),
            };
            all_done &= ended;
            left.retain(|&l| l != id);
        }
        if left.is_empty() {
            return Ok(if all_done {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let still: Vec<String> = left
                .iter()
                .map(|id| match last_state.get(id) {
                    Some(s) => format!("job {id} ({s})"),
                    None => format!("job {id}"),
                })
                .collect();
            eprintln!(
                "timed out after {}s; still waiting for {}",
                timeout.unwrap_or(0.0),
                still.join(", ")
            );
            return Ok(ExitCode::from(TIMED_OUT));
        }
        let pause = Duration::from_millis(500);
        std::thread::sleep(deadline.map_or(pause, |d| {
            pause.min(d.saturating_duration_since(Instant::now()))
        }));
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

/// User names from the system's user database (NSS), each looked up once
/// per command.
#[derive(Default)]
struct UserNames(std::collections::HashMap<u32, String>);

impl UserNames {
    fn of(&mut self, uid: u32) -> String {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                mezod_core::identity::name_of(uid).unwrap_or_else(|| uid.to_string())
            })
            .clone()
    }
}

/// The uid of a user name, or a uid as given.
fn uid_of(user: &str) -> Result<u32> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    mezod_core::identity::uid_named(user)
        .with_context(|| format!("no user {user:?} (give a user name or a uid)"))
}

#[cfg(test)]
mod tests {
    /// A message names its job once: "job 9: job 9 has already ended" was
    /// the daemon's words with the client's prefix before them.
    #[test]
    fn an_answer_about_a_job_names_it_once() {
        use super::about_job;
        assert_eq!(
            about_job(9, "job 9 has already ended (done)"),
            "job 9 has already ended (done)"
        );
        assert_eq!(about_job(9, "no job 9"), "no job 9");
        assert_eq!(
            about_job(9, "job 91 is running"),
            "job 9: job 91 is running"
        );
        assert_eq!(
            about_job(9, "permission denied"),
            "job 9: permission denied"
        );
    }

    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(when(0, 90), "1970-01-01 00:00:00 UTC (1m30s ago)");
        assert_eq!(
            when(1_796_070_228, 1_796_070_228 + 7200),
            "2026-11-30 20:23:48 UTC (2h00m ago)"
        );
    }

    /// `submit --after` adds to the job's `after:` (a list of its own
    /// merged, without repeats); the text spooled parses to the same job.
    #[test]
    fn submit_after_adds_to_the_jobs_after_list() {
        let tmp = tempfile::tempdir().unwrap();
        let body = "model: {path: m}\ntask: {kind: causal_lm}\ndata: {train: d.jsonl}\n\
                    mezo: {steps: 3, lr: 1.0e-3}\n";
        let plain = tmp.path().join("plain.yaml");
        std::fs::write(&plain, body).unwrap();
        let own = tmp.path().join("own.yaml");
        std::fs::write(&own, format!("# mine\nafter: [3, prep]\n{body}")).unwrap();
        let spooled = |job: &Path, after: &[&str]| {
            let after: Vec<JobRef> = after.iter().map(|a| JobRef::from_arg(a)).collect();
            let text = spool_text(job, &after).unwrap();
            JobSpec::parse_with_base(&text, None).unwrap()
        };
        let name = |n: &str| JobRef::Name(n.into());
        assert!(spooled(&plain, &[]).after.is_empty());
        let s = spooled(&plain, &["7", "prep"]);
        assert_eq!(s.after, vec![JobRef::Id(7), name("prep")]);
        assert_eq!(s.name.as_deref(), Some("plain"));
        assert_eq!(spooled(&own, &[]).after, vec![JobRef::Id(3), name("prep")]);
        let s = spooled(&own, &["prep", "9"]);
        assert_eq!(s.after, vec![JobRef::Id(3), name("prep"), JobRef::Id(9)]);
        assert_eq!((s.name.as_deref(), s.mezo.steps), (Some("own"), 3));
        assert!(s.workdir.is_some());
    }

    #[test]
    fn a_table_row_stays_one_line() {
        assert_eq!(one_line("a\nb", 10), "a…");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("abc", 3), "abc");
    }
}
