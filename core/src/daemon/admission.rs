//! Admission control: which queued job starts now, where, and why the others wait.
//!
//! Every GPU (and the CPU) is a *pool* with free memory, as NVML (or
//! `MemAvailable`) reports it, and a number of job slots.  A job is admitted to
//! a pool when its estimate plus the safety margin fits in
//!
//! ```text
//! free now − Σ reservations of our jobs in that pool
//! reservation(job) = max(0, estimate − memory the job's process holds now)
//! ```
//!
//! so a job that has started but not yet allocated still counts in full, and a
//! job that has settled counts only through the free memory it took.
//!
//! **Order and backfill.** Jobs are considered by priority (higher first),
//! then fair share (the owner's recent usage, less first; see
//! [`fair_share`](super::fair_share)), owners' jobs in turn, then
//! submission order; a user at `running_per_user`, or whose jobs hold their
//! `gpu_share_per_user` of every GPU the job would fit, waits without holding
//! room.  The first job of a kind (GPU or CPU) that does not
//! fit becomes the *head*: it is given a target pool, the one that would have
//! the most room if all of our jobs there finished.  A later, smaller job may
//! still start (backfill), but in the head's target pool only if the head would
//! still fit there once the jobs running now finish, with every backfilled job
//! still running.  So backfill never delays the head and big jobs do not
//! starve.  A job larger than any pool's total memory fails at once.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::estimate::human_bytes;
use crate::gpu::GpuInfo;

/// Where a job runs.  Written as text in job records: `CPU`, or the GPU's
/// (or MIG instance's) UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Pool {
    Cpu,
    /// A GPU (or MIG instance) by UUID.
    Gpu(String),
}

/// `CPU` (`cpu` in records of older versions), else a GPU's UUID: NVML's
/// UUIDs begin `GPU-` or `MIG-`, so none is read as the CPU.
impl From<String> for Pool {
    fn from(s: String) -> Pool {
        if s.eq_ignore_ascii_case("cpu") {
            Pool::Cpu
        } else {
            Pool::Gpu(s)
        }
    }
}

impl From<&str> for Pool {
    fn from(s: &str) -> Pool {
        Pool::from(s.to_string())
    }
}

impl From<Pool> for String {
    fn from(p: Pool) -> String {
        match p {
            Pool::Cpu => "CPU".into(),
            Pool::Gpu(uuid) => uuid,
        }
    }
}

/// What the machine looks like now.
pub trait Probe {
    /// The GPUs and their memory, or why there are none to use.
    fn gpus(&mut self) -> Result<Vec<GpuInfo>, String>;
    /// (MemAvailable, MemTotal) in bytes.
    fn cpu_memory(&mut self) -> (u64, u64);
    /// Memory a process of ours holds now: GPU memory for GPU jobs, RSS for CPU jobs.
    fn process_memory(&mut self, pid: u32, pool: &Pool) -> u64;
}

/// The real machine: NVML and /proc.
pub struct SystemProbe;

impl Probe for SystemProbe {
    fn gpus(&mut self) -> Result<Vec<GpuInfo>, String> {
        crate::gpu::list()
    }

    fn cpu_memory(&mut self) -> (u64, u64) {
        let field = |name| crate::procfs::kb_field("/proc/meminfo", name);
        (field("MemAvailable"), field("MemTotal"))
    }

    fn process_memory(&mut self, pid: u32, pool: &Pool) -> u64 {
        match pool {
            Pool::Gpu(uuid) => crate::gpu::process_memory(pid, Some(uuid)).unwrap_or(0),
            Pool::Cpu => crate::procfs::kb_field(&format!("/proc/{pid}/status"), "VmRSS"),
        }
    }
}

/// A scripted machine for tests: GPUs, memory held by other users and by our
/// processes are whatever the test says.
#[derive(Debug, Clone, Default)]
pub struct ScriptedProbe {
    pub gpus: Vec<GpuInfo>,
    pub cpu_available: u64,
    pub cpu_total: u64,
    pub usage: HashMap<u32, u64>,
}

impl Probe for ScriptedProbe {
    fn gpus(&mut self) -> Result<Vec<GpuInfo>, String> {
        if self.gpus.is_empty() {
            Err("no GPUs in this script".into())
        } else {
            Ok(self.gpus.clone())
        }
    }
    fn cpu_memory(&mut self) -> (u64, u64) {
        (self.cpu_available, self.cpu_total)
    }
    fn process_memory(&mut self, pid: u32, _pool: &Pool) -> u64 {
        self.usage.get(&pid).copied().unwrap_or(0)
    }
}

/// A queued job as admission sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: u64,
    pub priority: i32,
    pub estimate: u64,
    pub wants_gpu: bool,
    pub owner: u32,
    /// Its owner's recent usage (fair share: at equal priority, less goes first).
    pub usage: f64,
    /// How many processes it may start as, preferred first: `[1]` for a job
    /// of one process; a replicated job's count (each replica needs a pool
    /// of its own: a GPU, or a CPU slot), then the fewer it may run with now.
    pub replicas: Vec<usize>,
}

/// A job of ours that holds (or is about to hold) memory in a pool.
#[derive(Debug, Clone)]
pub struct Placed {
    pub id: u64,
    pub owner: u32,
    pub priority: i32,
    /// Seconds its worker has run (this attempt).
    pub running_for_s: u64,
    /// Already being stopped (cancel, preemption, daemon stop).
    pub stopping: bool,
    pub pool: Pool,
    pub estimate: u64,
    /// What its process holds now.
    pub usage: u64,
}

/// The pools and limits to plan against.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Usable GPUs (already filtered by the config); empty without NVML.
    pub gpus: Vec<GpuInfo>,
    /// Why there are no GPUs, when there are none.
    pub no_gpu_reason: Option<String>,
    pub cpu_available: u64,
    pub cpu_total: u64,
    pub cpu_slots: usize,
    pub jobs_per_gpu: usize,
    pub margin: u64,
    /// Jobs one user (not root) may have running at once.
    pub running_per_user: Option<usize>,
    /// The fraction of each GPU's memory one user's jobs (not root's) may
    /// reserve together.
    pub gpu_share_per_user: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start it: one process per pool listed (the leader's first).
    Admit {
        id: u64,
        pools: Vec<Pool>,
    },
    Wait {
        id: u64,
        reason: String,
    },
    /// The job can never fit here; fail it.
    Never {
        id: u64,
        reason: String,
    },
}

/// One pool's state while planning.
#[derive(Debug)]
struct PoolState {
    pool: Pool,
    label: String,
    total: u64,
    /// Room for new jobs now: free − reservations − margin.
    room: i128,
    /// Room if all our jobs now running here finished.
    room_if_ours_finish: i128,
    slots: usize,
    /// Its slots when none is taken.
    slots_in_all: usize,
}

fn pools(res: &Resources, placed: &[Placed]) -> Vec<PoolState> {
    let mut out: Vec<PoolState> = res
        .gpus
        .iter()
        .map(|g| PoolState {
            pool: Pool::Gpu(g.uuid.clone()),
            label: g.label(),
            total: g.total_bytes,
            room: g.free_bytes as i128 - res.margin as i128,
            room_if_ours_finish: g.free_bytes as i128 - res.margin as i128,
            slots: res.jobs_per_gpu,
            slots_in_all: res.jobs_per_gpu,
        })
        .collect();
    out.push(PoolState {
        pool: Pool::Cpu,
        label: "CPU".into(),
        total: res.cpu_total,
        room: res.cpu_available as i128 - res.margin as i128,
        room_if_ours_finish: res.cpu_available as i128 - res.margin as i128,
        slots: res.cpu_slots,
        slots_in_all: res.cpu_slots,
    });
    for p in placed {
        if let Some(s) = out.iter_mut().find(|s| s.pool == p.pool) {
            s.room -= p.estimate.saturating_sub(p.usage) as i128;
            s.room_if_ours_finish += p.usage as i128;
            s.slots = s.slots.saturating_sub(1);
        }
    }
    out
}

/// `gpu_share_per_user`: what each user's jobs reserve on each GPU, against
/// the share of it one user may hold.
struct GpuShares {
    share: Option<f64>,
    held: HashMap<(u32, Pool), u64>,
}

impl GpuShares {
    fn new(res: &Resources, placed: &[Placed]) -> Self {
        let mut shares = GpuShares {
            share: res.gpu_share_per_user,
            held: HashMap::new(),
        };
        for p in placed {
            shares.add(p.owner, &p.pool, p.estimate);
        }
        shares
    }

    fn add(&mut self, owner: u32, pool: &Pool, estimate: u64) {
        *self.held.entry((owner, pool.clone())).or_default() += estimate;
    }

    fn held(&self, owner: u32, pool: &Pool) -> u64 {
        self.held.get(&(owner, pool.clone())).copied().unwrap_or(0)
    }

    /// The most `owner`'s jobs may reserve in `p`; None where there is no
    /// limit (root, the CPU, no share configured).
    fn cap(&self, owner: u32, p: &PoolState) -> Option<u64> {
        let share = self
            .share
            .filter(|_| owner != 0 && matches!(p.pool, Pool::Gpu(_)))?;
        Some((share * p.total as f64) as u64)
    }

    fn allows(&self, owner: u32, p: &PoolState, estimate: u64) -> bool {
        self.cap(owner, p)
            .is_none_or(|cap| self.held(owner, &p.pool).saturating_add(estimate) <= cap)
    }

    /// Why `c` may not go to any of `kind`'s pools: a Never when the job
    /// alone is over every cap, else a Wait for its owner's other jobs.
    fn refusal(&self, c: &Candidate, kind: &[usize], pools: &[PoolState]) -> Decision {
        let share = self.share.unwrap_or(1.0);
        let (id, percent) = (c.id, 100.0 * share);
        let roomiest = kind
            .iter()
            .map(|&i| &pools[i])
            .max_by_key(|p| self.cap(c.owner, p).unwrap_or(u64::MAX))
            .expect("kind is not empty");
        let cap = self.cap(c.owner, roomiest).unwrap_or(u64::MAX);
        if c.estimate > cap {
            return Decision::Never {
                id,
                reason: format!(
                    "this job needs about {} but one user may reserve at most {percent:.0} % of \
                     a GPU's memory, {} of the largest (gpu_share_per_user: {share})",
                    human_bytes(c.estimate),
                    human_bytes(cap)
                ),
            };
        }
        let least_held = kind
            .iter()
            .map(|&i| &pools[i])
            .filter(|p| self.cap(c.owner, p).is_some_and(|cap| c.estimate <= cap))
            .min_by_key(|p| self.held(c.owner, &p.pool))
            .unwrap_or(roomiest);
        Decision::Wait {
            id,
            reason: format!(
                "its owner's jobs reserve {} of {} already, and one user may reserve at most \
                 {percent:.0} % of each GPU, {} there (gpu_share_per_user: {share})",
                human_bytes(self.held(c.owner, &least_held.pool)),
                least_held.label,
                human_bytes(self.cap(c.owner, least_held).unwrap_or(0))
            ),
        }
    }
}

/// The head of a kind: the first job that had to wait, and the pool kept for it.
struct Head {
    id: u64,
    estimate: u64,
    pool: usize,
    /// Room the head will have in its pool once the jobs running now finish.
    protected_room: i128,
}

/// Decide for every queued job: start it (where), let it wait (why), or fail it.
pub(crate) fn plan(queue: &[Candidate], placed: &[Placed], res: &Resources) -> Vec<Decision> {
    let order = in_order(queue);
    let mut pools = pools(res, placed);
    let mut shares = GpuShares::new(res, placed);
    let mut heads: [Option<Head>; 2] = [None, None]; // [cpu, gpu]
    let mut running: HashMap<u32, usize> = HashMap::new();
    let mut counted = std::collections::HashSet::new();
    for p in placed {
        // A replicated job is one job, however many pools it holds.
        if counted.insert(p.id) {
            *running.entry(p.owner).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for c in order {
        let theirs = running.get(&c.owner).copied().unwrap_or(0);
        if let Some(max) = res
            .running_per_user
            .filter(|&m| c.owner != 0 && theirs >= m)
        {
            // Not a head either: a user at their limit holds no room for later.
            out.push(Decision::Wait {
                id: c.id,
                reason: format!(
                    "its owner has {theirs} jobs running, the most one user may \
                     (running_per_user: {max})"
                ),
            });
            continue;
        }
        let kind: Vec<usize> = (0..pools.len())
            .filter(|&i| matches!(pools[i].pool, Pool::Gpu(_)) == c.wants_gpu)
            .collect();
        let need = c.estimate as i128;
        if kind.is_empty() {
            out.push(Decision::Never {
                id: c.id,
                reason: format!(
                    "this job asks for a GPU but the daemon has none to use ({})",
                    res.no_gpu_reason.as_deref().unwrap_or("no GPUs selected")
                ),
            });
            continue;
        }
        if let Some(never) = too_few_pools(c, &kind, &pools) {
            out.push(never);
            continue;
        }
        let biggest = kind.iter().map(|&i| pools[i].total).max().unwrap_or(0);
        if c.estimate.saturating_add(res.margin) > biggest {
            out.push(Decision::Never {
                id: c.id,
                reason: format!(
                    "this job needs about {} (plus a {} safety margin) but the largest {} has {} in all; \
                     use a smaller batch, max_length or dtype",
                    human_bytes(c.estimate),
                    human_bytes(res.margin),
                    if c.wants_gpu { "GPU" } else { "machine" },
                    human_bytes(biggest)
                ),
            });
            continue;
        }
        // Only the GPUs where its owner's share has room for it; none: it
        // waits without holding room, like a user at their running limit.
        let kind: Vec<usize> = kind
            .into_iter()
            .filter(|&i| shares.allows(c.owner, &pools[i], c.estimate))
            .collect();
        if kind.is_empty() {
            let all: Vec<usize> = (0..pools.len())
                .filter(|&i| matches!(pools[i].pool, Pool::Gpu(_)) == c.wants_gpu)
                .collect();
            out.push(shares.refusal(c, &all, &pools));
            continue;
        }
        let head = &mut heads[c.wants_gpu as usize];
        // The head's pool takes `need` more only if the head keeps its room.
        let fits_head = |i: usize, need: i128, head: &Option<Head>| {
            head.as_ref()
                .is_none_or(|h| h.pool != i || h.protected_room - need >= h.estimate as i128)
        };
        let seats = c
            .replicas
            .iter()
            .find_map(|&k| seats_for(k, &kind, &pools, need, &|i, need| fits_head(i, need, head)));
        if let Some(seats) = seats {
            for &i in &seats {
                pools[i].room -= need;
                pools[i].slots -= 1;
                shares.add(c.owner, &pools[i].pool, c.estimate);
                if let Some(h) = head.as_mut().filter(|h| h.pool == i) {
                    h.protected_room -= need;
                }
            }
            *running.entry(c.owner).or_default() += 1;
            out.push(Decision::Admit {
                id: c.id,
                pools: seats.iter().map(|&i| pools[i].pool.clone()).collect(),
            });
            continue;
        }
        let best = *kind
            .iter()
            .max_by_key(|&&i| (pools[i].room, pools[i].slots))
            .expect("kind is not empty");
        let why = match c.replicas.as_slice() {
            [1] => why_not(&pools[best], need),
            counts => why_not_replicas(counts, &kind, &pools, need),
        };
        let reason = match head {
            Some(h) => format!(
                "waiting behind job {} (first in line; {} stays reserved for it); {why}",
                h.id, pools[h.pool].label,
            ),
            None => why,
        };
        if head.is_none() {
            let target = *kind
                .iter()
                .max_by_key(|&&i| pools[i].room_if_ours_finish)
                .expect("kind is not empty");
            *head = Some(Head {
                id: c.id,
                estimate: c.estimate,
                pool: target,
                protected_room: pools[target].room_if_ours_finish,
            });
        }
        out.push(Decision::Wait { id: c.id, reason });
    }
    out
}

/// Where `k` processes of a job needing `need` each would go now, the
/// roomiest first (among pools where `head_allows` the room taken): `k`
/// GPUs of their own, or `k` slots of the CPU.  None if they do not fit.
fn seats_for(
    k: usize,
    kind: &[usize],
    pools: &[PoolState],
    need: i128,
    head_allows: &dyn Fn(usize, i128) -> bool,
) -> Option<Vec<usize>> {
    let mut fitting: Vec<usize> = kind
        .iter()
        .copied()
        .filter(|&i| pools[i].slots > 0 && pools[i].room >= need && head_allows(i, need))
        .collect();
    fitting.sort_by_key(|&i| std::cmp::Reverse(pools[i].room));
    if fitting.len() >= k {
        return Some(fitting[..k].to_vec());
    }
    // The CPU is one pool of several slots: the replicas share its memory.
    let cpu = kind.iter().copied().find(|&i| pools[i].pool == Pool::Cpu)?;
    let all = need * k as i128;
    (k > 1 && pools[cpu].slots >= k && pools[cpu].room >= all && head_allows(cpu, all))
        .then(|| vec![cpu; k])
}

/// A replicated job that no number of its pools could ever take: more
/// replicas than GPUs, or than CPU slots.
fn too_few_pools(c: &Candidate, kind: &[usize], pools: &[PoolState]) -> Option<Decision> {
    let fewest = c.replicas.iter().copied().min().unwrap_or(1);
    if fewest <= 1 {
        return None;
    }
    let (have, what) = match kind {
        [i] if pools[*i].pool == Pool::Cpu => (pools[*i].slots_in_all, "CPU slots (cpu_slots)"),
        _ => (kind.len(), "GPUs to use"),
    };
    (have < fewest).then(|| Decision::Never {
        id: c.id,
        reason: format!(
            "its {fewest} replicas need a pool each, and the daemon has {have} {what}; \
             lower parallel.replicas{}",
            if c.replicas.len() > 1 {
                ""
            } else {
                " or set parallel.elastic: true"
            }
        ),
    })
}

/// Why a replicated job waits: how many pools it needs with how much room,
/// and how many have it now.
fn why_not_replicas(counts: &[usize], kind: &[usize], pools: &[PoolState], need: i128) -> String {
    let ready = kind
        .iter()
        .filter(|&&i| pools[i].slots > 0 && pools[i].room >= need)
        .count();
    let wanted = match counts {
        [k] => k.to_string(),
        [k, .., least] => format!("{k} (or at least {least})"),
        [] => "1".into(),
    };
    match kind {
        [i] if pools[*i].pool == Pool::Cpu => format!(
            "its {wanted} replicas need a CPU slot and {} each; the CPU has {} free slot(s) and {} \
             free after reservations and margin",
            human_bytes(need as u64),
            pools[*i].slots,
            human_bytes(pools[*i].room.max(0) as u64)
        ),
        _ => format!(
            "its {wanted} replicas need a GPU each with {} free; {ready} GPU(s) have that now",
            human_bytes(need as u64)
        ),
    }
}

/// When a waiting job may stop running ones to make room.
#[derive(Debug, Clone, Copy)]
pub struct PreemptPolicy {
    /// The waiting job's priority must exceed a victim's by at least this.
    pub gap: i32,
    /// A job runs at least this long (this attempt) before it can be preempted.
    pub min_run_s: u64,
}

/// The one preemption to make now, if any: for the first waiting job (in
/// [`in_order`]) that `decisions` left waiting, and that cannot fit unless
/// jobs it outranks by `policy.gap` stop, the fewest such running jobs of one
/// pool whose estimates make room for it (the lowest priority first, then
/// the most recently started: MeZO loses at most a step either way).  None
/// while any job is still stopping, so one turn's victims are not joined by
/// more before they have made their room.
pub fn preemption(
    queue: &[Candidate],
    placed: &[Placed],
    res: &Resources,
    decisions: &[Decision],
    policy: PreemptPolicy,
) -> Option<(u64, Vec<u64>)> {
    if placed.iter().any(|p| p.stopping) {
        return None;
    }
    let waiting: std::collections::HashSet<u64> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Wait { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let mut pools = pools(res, placed);
    let mut shares = GpuShares::new(res, placed);
    // What this turn admits is no longer room.
    for d in decisions {
        let Decision::Admit { id, pools: seats } = d else {
            continue;
        };
        let c = queue.iter().find(|c| c.id == *id);
        let est = c.map_or(0, |c| c.estimate);
        for pool in seats {
            if let Some(c) = c {
                shares.add(c.owner, pool, est);
            }
            if let Some(s) = pools.iter_mut().find(|s| &s.pool == pool) {
                s.room -= est as i128;
                s.slots = s.slots.saturating_sub(1);
            }
        }
    }
    // A replicated job waits for its pools without stopping others: which
    // set of jobs to stop across several pools is not planned here.
    for c in in_order(queue)
        .into_iter()
        .filter(|c| waiting.contains(&c.id) && c.replicas == [1])
    {
        let mut best: Option<Vec<&Placed>> = None;
        for s in pools.iter().filter(|s| {
            matches!(s.pool, Pool::Gpu(_)) == c.wants_gpu && shares.allows(c.owner, s, c.estimate)
        }) {
            let mut victims: Vec<&Placed> = placed
                .iter()
                .filter(|p| {
                    p.pool == s.pool
                        && p.priority.saturating_add(policy.gap) <= c.priority
                        && p.running_for_s >= policy.min_run_s
                })
                .collect();
            victims.sort_by_key(|p| (p.priority, p.running_for_s, std::cmp::Reverse(p.id)));
            let (mut room, mut slots, mut taken) = (s.room, s.slots, Vec::new());
            for v in victims {
                if room >= c.estimate as i128 && slots > 0 {
                    break;
                }
                room += v.estimate as i128;
                slots += 1;
                taken.push(v);
            }
            let enough = room >= c.estimate as i128 && slots > 0 && !taken.is_empty();
            if enough && best.as_ref().is_none_or(|b| taken.len() < b.len()) {
                best = Some(taken);
            }
        }
        if let Some(victims) = best {
            // A replicated victim holds a slot in each of its pools.
            let mut seen = std::collections::HashSet::new();
            let ids: Vec<u64> = victims
                .iter()
                .map(|p| p.id)
                .filter(|id| seen.insert(*id))
                .collect();
            return Some((c.id, ids));
        }
    }
    None
}

/// The order jobs are considered in: priority (higher first); then fair
/// share, the owner's recent usage (less first); then each owner's jobs
/// taken in turn (an owner's first waiting job, then every other owner's
/// first, …), so equal users interleave; then submission order.
pub(crate) fn in_order(queue: &[Candidate]) -> Vec<&Candidate> {
    let mut by_id: Vec<&Candidate> = queue.iter().collect();
    by_id.sort_by_key(|c| c.id);
    let mut turn: HashMap<(u32, i32), usize> = HashMap::new();
    let mut keyed: Vec<(usize, &Candidate)> = by_id
        .into_iter()
        .map(|c| {
            let k = turn.entry((c.owner, c.priority)).or_default();
            *k += 1;
            (*k, c)
        })
        .collect();
    keyed.sort_by(|(ka, a), (kb, b)| {
        b.priority
            .cmp(&a.priority)
            .then(a.usage.total_cmp(&b.usage))
            .then(ka.cmp(kb))
            .then(a.id.cmp(&b.id))
    });
    keyed.into_iter().map(|(_, c)| c).collect()
}

fn why_not(p: &PoolState, need: i128) -> String {
    if p.slots == 0 {
        format!("all job slots of {} are busy", p.label)
    } else {
        format!(
            "needs {} but {} has {} free after reservations and margin",
            human_bytes(need as u64),
            p.label,
            human_bytes(p.room.max(0) as u64)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu(index: u32, total_gib: u64, free_gib: u64) -> GpuInfo {
        GpuInfo {
            index,
            mig: None,
            uuid: format!("GPU-{index}"),
            name: "Test GPU".into(),
            total_bytes: total_gib * GIB,
            free_bytes: free_gib * GIB,
            processes: vec![],
        }
    }

    fn res(gpus: Vec<GpuInfo>) -> Resources {
        Resources {
            gpus,
            no_gpu_reason: None,
            cpu_available: 16 * GIB,
            cpu_total: 24 * GIB,
            cpu_slots: 1,
            jobs_per_gpu: 4,
            margin: GIB,
            running_per_user: None,
            gpu_share_per_user: None,
        }
    }

    fn job(id: u64, gib_: u64) -> Candidate {
        Candidate {
            id,
            priority: 0,
            estimate: gib_ * GIB,
            wants_gpu: true,
            owner: 1000,
            usage: 0.0,
            replicas: vec![1],
        }
    }

    fn admitted(d: &[Decision]) -> Vec<(u64, Pool)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Admit { id, pools } => {
                    assert_eq!(pools.len(), 1, "a job of one process takes one pool");
                    Some((*id, pools[0].clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn jobs_spread_over_gpus_by_room() {
        let d = plan(
            &[job(1, 30), job(2, 30), job(3, 30)],
            &[],
            &res(vec![gpu(0, 80, 80), gpu(1, 80, 80)]),
        );
        let a = admitted(&d);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0].1, a[1].1, "the second job goes to the emptier GPU");
    }

    /// An estimate is the owner's word (their check can be rewritten): the
    /// largest figure fails the job at once, never wraps into a small one,
    /// and never holds the line for the jobs behind it.
    #[test]
    fn an_estimate_past_every_pool_fails_at_once_and_blocks_no_one() {
        let mut huge = job(1, 0);
        huge.estimate = u64::MAX;
        huge.priority = i32::MAX;
        let d = plan(&[huge, job(2, 10)], &[], &res(vec![gpu(0, 80, 80)]));
        assert!(
            matches!(&d[0], Decision::Never { id: 1, reason } if reason.contains("largest GPU")),
            "{d:?}"
        );
        assert_eq!(admitted(&d), vec![(2, Pool::Gpu("GPU-0".into()))]);
    }

    #[test]
    fn memory_held_by_other_users_is_respected() {
        // GPU 0 has 80 GB but another user holds 70.
        let d = plan(
            &[job(1, 20)],
            &[],
            &res(vec![gpu(0, 80, 10), gpu(1, 40, 30)]),
        );
        assert_eq!(admitted(&d), vec![(1, Pool::Gpu("GPU-1".into()))]);
        let d = plan(&[job(2, 20)], &[], &res(vec![gpu(0, 80, 10)]));
        match &d[0] {
            Decision::Wait { reason, .. } => assert!(reason.contains("9.00 GiB free"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsettled_jobs_keep_their_reservation() {
        // Job A was admitted with 30 GB but has allocated only 5 so far:
        // NVML free still shows 75, yet only 75 − 25 − 1 = 49 may be handed out.
        let placed = [Placed {
            id: 90,
            owner: 1000,
            priority: 0,
            running_for_s: 0,
            stopping: false,
            pool: Pool::Gpu("GPU-0".into()),
            estimate: 30 * GIB,
            usage: 5 * GIB,
        }];
        let d = plan(&[job(2, 50)], &placed, &res(vec![gpu(0, 80, 75)]));
        assert!(matches!(d[0], Decision::Wait { .. }), "{d:?}");
        let d = plan(&[job(2, 48)], &placed, &res(vec![gpu(0, 80, 75)]));
        assert_eq!(admitted(&d).len(), 1);
    }

    #[test]
    fn a_big_job_is_not_starved_by_small_ones() {
        // One GPU, a small job of ours running with 30 GB; a big job needs 60.
        let placed = [Placed {
            id: 90,
            owner: 1000,
            priority: 0,
            running_for_s: 0,
            stopping: false,
            pool: Pool::Gpu("GPU-0".into()),
            estimate: 30 * GIB,
            usage: 30 * GIB,
        }];
        let r = res(vec![gpu(0, 80, 50)]);
        // Small job 3 would fit now (49 GB room) but would leave the big job
        // 79 − 25 = 54 < 60 once job A finishes: it must wait.
        let d = plan(&[job(2, 60), job(3, 25)], &placed, &r);
        assert!(admitted(&d).is_empty(), "{d:?}");
        match &d[1] {
            Decision::Wait { reason, .. } => assert!(reason.contains("behind job 2"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A tiny job leaves the big one its room (79 − 10 ≥ 60): backfilled.
        let d = plan(&[job(2, 60), job(4, 10)], &placed, &r);
        assert_eq!(admitted(&d), vec![(4, Pool::Gpu("GPU-0".into()))]);
        // Two tiny ones do not, together: only the first backfills.
        let d = plan(&[job(2, 60), job(4, 10), job(5, 10)], &placed, &r);
        assert_eq!(admitted(&d).len(), 1);
    }

    #[test]
    fn priority_goes_first_then_submission_order() {
        let mut hi = job(9, 50);
        hi.priority = 5;
        let d = plan(&[job(1, 50), hi], &[], &res(vec![gpu(0, 80, 80)]));
        assert_eq!(admitted(&d), vec![(9, Pool::Gpu("GPU-0".into()))]);
    }

    #[test]
    fn impossible_jobs_fail_at_once_with_sizes() {
        let d = plan(&[job(1, 100)], &[], &res(vec![gpu(0, 80, 80)]));
        match &d[0] {
            Decision::Never { reason, .. } => {
                assert!(
                    reason.contains("100.00 GiB") && reason.contains("80.00 GiB"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut r = res(vec![]);
        r.no_gpu_reason = Some("NVML unavailable: driver not loaded".into());
        let d = plan(&[job(2, 1)], &[], &r);
        assert!(matches!(&d[0], Decision::Never { reason, .. } if reason.contains("NVML")));
    }

    #[test]
    fn cpu_jobs_use_cpu_slots_and_memory() {
        let cpu = |id, g| Candidate {
            wants_gpu: false,
            ..job(id, g)
        };
        let mut r = res(vec![]);
        r.cpu_slots = 2;
        let d = plan(&[cpu(1, 4), cpu(2, 4), cpu(3, 4)], &[], &r);
        assert_eq!(admitted(&d).len(), 2);
        match &d[2] {
            Decision::Wait { reason, .. } => assert!(reason.contains("slots"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Memory, not slots, limits here: 16 − 1 margin = 15 GB.
        let d = plan(&[cpu(1, 10), cpu(2, 10)], &[], &r);
        assert_eq!(admitted(&d).len(), 1);
    }

    /// A replicated job's pools: `k` GPUs of their own (the roomiest), or
    /// `k` CPU slots with room for all; fewer pools than replicas is never.
    #[test]
    fn replicas_take_a_pool_each_or_wait_for_enough() {
        let two = |id, g| Candidate {
            replicas: vec![2],
            ..job(id, g)
        };
        let pools_of = |d: &Decision| match d {
            Decision::Admit { pools, .. } => pools.clone(),
            other => panic!("{other:?}"),
        };
        let three_gpus = res(vec![gpu(0, 80, 30), gpu(1, 80, 70), gpu(2, 80, 50)]);
        let d = plan(&[two(1, 20)], &[], &three_gpus);
        assert_eq!(
            pools_of(&d[0]),
            vec![Pool::Gpu("GPU-1".into()), Pool::Gpu("GPU-2".into())],
            "the two roomiest, the leader on the roomiest"
        );
        // Only one GPU has room for a replica of 50 (and the margin): it
        // waits, and says why.
        let d = plan(&[two(1, 50)], &[], &three_gpus);
        match &d[0] {
            Decision::Wait { reason, .. } => assert!(
                reason.contains("its 2 replicas need a GPU each with 50.00 GiB free; 1 GPU(s)"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // Four replicas on three GPUs can never start.
        let four = Candidate {
            replicas: vec![4],
            ..job(1, 1)
        };
        match &plan(&[four.clone()], &[], &three_gpus)[0] {
            Decision::Never { reason, .. } => {
                assert!(reason.contains("the daemon has 3 GPUs to use"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Elastic: it may start with fewer when the daemon offers them.
        let fewer = Candidate {
            replicas: vec![4, 2, 1],
            ..four
        };
        assert_eq!(pools_of(&plan(&[fewer], &[], &three_gpus)[0]).len(), 2);

        // The CPU: a slot and the memory of one replica each.
        let cpu = |id, g, k| Candidate {
            wants_gpu: false,
            replicas: vec![k],
            ..job(id, g)
        };
        let mut r = res(vec![]);
        r.cpu_slots = 2;
        assert_eq!(
            pools_of(&plan(&[cpu(1, 4, 2)], &[], &r)[0]),
            vec![Pool::Cpu; 2]
        );
        // 2 × 10 GiB does not fit in 15 GiB of room.
        assert!(matches!(
            plan(&[cpu(1, 10, 2)], &[], &r)[0],
            Decision::Wait { .. }
        ));
        // One slot taken: the second replica has none.
        let busy = [Placed {
            id: 7,
            owner: 5,
            priority: 0,
            running_for_s: 0,
            stopping: false,
            pool: Pool::Cpu,
            estimate: GIB,
            usage: GIB,
        }];
        match &plan(&[cpu(1, 1, 2)], &busy, &r)[0] {
            Decision::Wait { reason, .. } => {
                assert!(reason.contains("the CPU has 1 free slot(s)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match &plan(&[cpu(1, 1, 3)], &[], &r)[0] {
            Decision::Never { reason, .. } => {
                assert!(reason.contains("2 CPU slots (cpu_slots)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A replicated job is one job against `running_per_user`, however many
    /// pools it holds.
    #[test]
    fn a_replicated_job_counts_once_against_the_running_limit() {
        let mut r = res(vec![gpu(0, 80, 80), gpu(1, 80, 80)]);
        r.running_per_user = Some(2);
        let replica = |pool: &str| Placed {
            id: 1,
            owner: 1000,
            priority: 0,
            running_for_s: 0,
            stopping: false,
            pool: Pool::Gpu(pool.into()),
            estimate: GIB,
            usage: GIB,
        };
        let placed = [replica("GPU-0"), replica("GPU-1")];
        assert_eq!(admitted(&plan(&[job(2, 1)], &placed, &r)).len(), 1);
        let placed = [
            replica("GPU-0"),
            replica("GPU-1"),
            Placed {
                id: 3,
                ..replica("GPU-0")
            },
        ];
        assert!(admitted(&plan(&[job(2, 1)], &placed, &r)).is_empty());
    }

    /// A pool is text in a job record, as it was when records held strings.
    #[test]
    fn a_pool_is_written_as_text_and_older_records_read() {
        let json = |p: &Pool| serde_json::to_string(p).unwrap();
        assert_eq!(json(&Pool::Cpu), "\"CPU\"");
        assert_eq!(json(&Pool::Gpu("MIG-a".into())), "\"MIG-a\"");
        for (text, pool) in [
            ("\"cpu\"", Pool::Cpu),
            ("\"CPU\"", Pool::Cpu),
            ("\"GPU-1\"", Pool::Gpu("GPU-1".into())),
        ] {
            assert_eq!(serde_json::from_str::<Pool>(text).unwrap(), pool);
        }
    }

    #[test]
    fn the_scripted_probe_reports_what_the_test_says() {
        let mut p = ScriptedProbe {
            gpus: vec![gpu(0, 80, 12)],
            usage: HashMap::from([(42, 7 * GIB)]),
            ..Default::default()
        };
        assert_eq!(p.gpus().unwrap()[0].free_bytes, 12 * GIB);
        assert_eq!(p.process_memory(42, &Pool::Gpu("GPU-0".into())), 7 * GIB);
        assert_eq!(p.process_memory(43, &Pool::Cpu), 0);
        let mut sys = SystemProbe;
        let (avail, total) = sys.cpu_memory();
        assert!(avail > 0 && total >= avail);
        assert!(sys.process_memory(std::process::id(), &Pool::Cpu) > 0);
    }

    fn of(owner: u32, id: u64, usage: f64) -> Candidate {
        Candidate {
            owner,
            usage,
            wants_gpu: false,
            ..job(id, 1)
        }
    }

    /// Fair share: at equal priority the user who used less goes first, and
    /// users of equal usage take turns; priority still comes first.
    #[test]
    fn fair_share_orders_users_by_recent_usage_then_in_turn() {
        let ids = |q: &[Candidate]| in_order(q).iter().map(|c| c.id).collect::<Vec<_>>();
        // A (used 2 h) queued 1, 2, 3; B (used nothing) queued 4: B first.
        let q = [
            of(1, 1, 7200.0),
            of(1, 2, 7200.0),
            of(1, 3, 7200.0),
            of(2, 4, 0.0),
        ];
        assert_eq!(ids(&q), vec![4, 1, 2, 3]);
        // Equal usage: turns, not A's whole backlog first.
        let q = [
            of(1, 1, 0.0),
            of(1, 2, 0.0),
            of(1, 3, 0.0),
            of(2, 4, 0.0),
            of(2, 5, 0.0),
        ];
        assert_eq!(ids(&q), vec![1, 4, 2, 5, 3]);
        // A raised priority goes first whatever its owner used.
        let mut urgent = of(1, 6, 1e9);
        urgent.priority = 5;
        assert_eq!(ids(&[of(2, 4, 0.0), urgent])[0], 6);
    }

    /// Job `id` of `owner`, running on the CPU with 1 GiB it holds in full.
    fn settled(id: u64, owner: u32) -> Placed {
        Placed {
            id,
            owner,
            priority: 0,
            running_for_s: 0,
            stopping: false,
            pool: Pool::Cpu,
            estimate: GIB,
            usage: GIB,
        }
    }

    #[test]
    fn a_user_at_the_running_limit_waits_without_holding_room() {
        let mut r = res(vec![]);
        r.cpu_slots = 3;
        r.running_per_user = Some(1);
        let placed = [settled(90, 1)];
        let d = plan(
            &[of(1, 1, 0.0), of(2, 2, 0.0), of(2, 3, 0.0), of(0, 4, 0.0)],
            &placed,
            &r,
        );
        let admitted: Vec<u64> = admitted(&d).iter().map(|(id, _)| *id).collect();
        assert_eq!(admitted, vec![2, 4], "{d:?}");
        assert!(d.iter().any(|x| matches!(x, Decision::Wait { id: 1, reason } if reason.contains("running_per_user: 1"))), "{d:?}");
        assert!(d.iter().any(|x| matches!(x, Decision::Wait { id: 3, reason } if reason.contains("running_per_user"))), "{d:?}");
    }

    /// `gpu_share_per_user`: a user's jobs together reserve at most that
    /// share of each GPU; past it their next job waits without holding room
    /// (another user's smaller job still starts), a job over the share by
    /// itself fails at once, and root is not limited.
    #[test]
    fn a_user_reserves_at_most_their_share_of_each_gpu() {
        let mut r = res(vec![gpu(0, 80, 80), gpu(1, 40, 40)]);
        r.gpu_share_per_user = Some(0.5);
        r.jobs_per_gpu = 8;
        let user = |owner, id, gib_| Candidate {
            owner,
            ..job(id, gib_)
        };
        // User 1: 30 GiB on GPU 0 (room 40 − 30 = 10 left of its 40 there),
        // then 15 fits GPU 1's 20, then another 15 fits neither share.
        let d = plan(
            &[
                user(1, 1, 30),
                user(1, 2, 15),
                user(1, 3, 15),
                user(2, 4, 10),
            ],
            &[],
            &r,
        );
        let mut placed: Vec<(u64, Pool)> = admitted(&d);
        placed.sort_by_key(|(id, _)| *id);
        assert_eq!(
            placed,
            vec![
                (1, Pool::Gpu("GPU-0".into())),
                (2, Pool::Gpu("GPU-1".into())),
                (4, Pool::Gpu("GPU-0".into()))
            ],
            "{d:?}"
        );
        match d.iter().find(|x| matches!(x, Decision::Wait { id: 3, .. })) {
            Some(Decision::Wait { reason, .. }) => assert!(
                reason.contains("reserve 15.00 GiB of GPU 1 (Test GPU) already")
                    && reason.contains("20.00 GiB there (gpu_share_per_user: 0.5)"),
                "{reason}"
            ),
            other => panic!("{other:?} in {d:?}"),
        }
        // Over half of the largest GPU by itself: never.
        let d = plan(&[user(1, 5, 41)], &[], &r);
        assert!(
            matches!(&d[0], Decision::Never { reason, .. } if reason.contains("at most 50 % of a GPU's memory, 40.00 GiB")),
            "{d:?}"
        );
        // Root is never limited.
        let d = plan(&[user(0, 6, 70)], &[], &r);
        assert_eq!(admitted(&d), vec![(6, Pool::Gpu("GPU-0".into()))]);
        // What a user already runs counts: 35 of GPU 0 leaves room for 5 there.
        let placed = [Placed {
            pool: Pool::Gpu("GPU-0".into()),
            estimate: 35 * GIB,
            usage: 35 * GIB,
            ..settled(90, 1)
        }];
        let d = plan(&[user(1, 7, 20), user(1, 8, 5)], &placed, &r);
        assert_eq!(
            admitted(&d),
            vec![
                (7, Pool::Gpu("GPU-1".into())),
                (8, Pool::Gpu("GPU-0".into()))
            ],
            "{d:?}"
        );
    }

    /// Preemption: the fewest lowest-ranked running jobs that make room,
    /// only jobs outranked by the gap and past their minimum run time, and
    /// none while earlier victims are still stopping.
    #[test]
    fn a_waiting_job_preempts_the_fewest_lowest_ranked_jobs_that_make_room() {
        let running = |id, priority, gib_, running_for_s| Placed {
            id,
            owner: 1,
            priority,
            running_for_s,
            stopping: false,
            pool: Pool::Gpu("GPU-0".into()),
            estimate: gib_ * GIB,
            usage: gib_ * GIB,
        };
        let r = res(vec![gpu(0, 80, 10)]);
        let placed = [
            running(1, 0, 30, 900),
            running(2, -1, 20, 900),
            running(3, 0, 20, 10),
        ];
        let mut urgent = job(9, 40);
        urgent.priority = 5;
        let policy = PreemptPolicy {
            gap: 1,
            min_run_s: 300,
        };
        let d = plan(std::slice::from_ref(&urgent), &placed, &r);
        // 9 GiB of room; job 2 (lowest priority, 20) then job 1 (30) make 59.
        assert_eq!(
            preemption(std::slice::from_ref(&urgent), &placed, &r, &d, policy),
            Some((9, vec![2, 1]))
        );
        // Job 3 ran too briefly; with job 1 out of reach too, no room can be made.
        let short = [
            running(1, 5, 30, 900),
            running(2, -1, 20, 900),
            running(3, 0, 20, 10),
        ];
        assert_eq!(
            preemption(std::slice::from_ref(&urgent), &short, &r, &d, policy),
            None
        );
        // Within the gap: nothing.
        let mut close = urgent.clone();
        close.priority = 0;
        let d = plan(std::slice::from_ref(&close), &placed, &r);
        assert_eq!(
            preemption(std::slice::from_ref(&close), &placed, &r, &d, policy),
            None
        );
        // While a victim is still stopping: nothing more.
        let mut stopping = placed.clone();
        stopping[0].stopping = true;
        let d = plan(std::slice::from_ref(&urgent), &stopping, &r);
        assert_eq!(
            preemption(std::slice::from_ref(&urgent), &stopping, &r, &d, policy),
            None
        );
    }
}
