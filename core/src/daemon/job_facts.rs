//! What the root daemon reads from a job file itself, and what it then
//! expects of the job's worker.
//!
//! Why here and not from the intake check: the check and the worker run as
//! the job's owner, who can ptrace them, signal them or take their pipes with
//! `pidfd_getfd`, so whatever they say is the owner's word.  The facts that
//! order the queue or bound the database (priority, steps, GPU or CPU, name,
//! the jobs it waits for, the command run at its end, the shape of each step
//! record) come from the daemon's own parse of the
//! bytes it read from the spool.  The parse opens no file (`JobSpec::parse`
//! with no base folder checks the text alone), the text is at most 1 MiB and
//! its nesting is bounded before YAML sees it, so parsing as root costs
//! milliseconds and reveals nothing.  The check is still needed for what only
//! the owner may look at (the model and data files) and answers one number,
//! the memory estimate, which admission bounds and enforcement verifies.

use crate::estimator::{Estimator, RecordTrailer};
use crate::seedlog::{StepRecord, RECORD_BYTES};
use crate::spec::{JobRef, JobSpec};

/// The facts about a job the daemon trusts: its own parse of the job file.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFacts {
    pub name: Option<String>,
    pub priority: i32,
    pub wants_gpu: bool,
    /// MeZO steps the job's seed log holds at most.
    pub steps: u64,
    pub summary: String,
    pub records: RecordShape,
    /// Jobs it waits for (`after:`), as the file names them: intake
    /// resolves them to ids of the owner's jobs.
    pub after: Vec<JobRef>,
    /// The program and arguments run when it ends (`notify.command`).
    pub notify: Option<Vec<String>>,
    /// The replica counts it may run with, preferred first (see
    /// `JobSpec::replica_counts`); empty for a job of one process.
    pub replica_counts: Vec<usize>,
}

impl JobFacts {
    /// Parse `text` as the daemon's copy of a job file.  `Err` is the plain
    /// reason to reject it.
    pub fn read(text: &str) -> Result<Self, String> {
        let spec = JobSpec::parse_with_base(text, None).map_err(|e| format!("{e:#}"))?;
        if spec.model.device.is_split() && spec.model.device.is_gpu() {
            // It would run on the one GPU admission gives every job, not as
            // its file says.
            return Err(format!(
                "model.device {} splits the model over GPUs, and the daemon gives a job one \
                 GPU (or one per replica): name one device (or `auto`), or run the job with \
                 `mezod run`",
                spec.model.device
            ));
        }
        Ok(Self {
            wants_gpu: spec.model.device.is_gpu(),
            replica_counts: Some(spec.replica_counts())
                .filter(|c| c != &[1])
                .unwrap_or_default(),
            priority: spec.priority,
            steps: spec.mezo.steps,
            summary: spec.summary(),
            records: RecordShape {
                directions: spec.mezo.directions,
                trailer: spec.mezo.estimator().record_trailer(),
                estimator: spec.mezo.estimator(),
            },
            name: spec.name,
            after: spec.after,
            notify: spec.notify.map(|n| n.command),
        })
    }
}

/// What every step record of a job looks like: its number of directions and
/// its trailer are fixed by the job file, so a record of any other size is
/// not the worker's (and the job's database share is bounded: steps × size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordShape {
    pub directions: usize,
    pub trailer: RecordTrailer,
    estimator: Estimator,
}

impl RecordShape {
    /// Bytes of one record of this job.
    pub fn bytes(&self) -> usize {
        crate::seedlog::record_bytes(self.directions, self.trailer)
    }

    /// Is `rec` the record a worker of this job may send next, at `step`?
    /// `Err` says why not, for the job's failure reason.
    pub fn check(&self, rec: &StepRecord, step: u64, steps: u64) -> Result<(), String> {
        if rec.step != step {
            return Err(format!(
                "its worker sent a record for step {} where step {step} was due",
                rec.step
            ));
        }
        if step >= steps {
            return Err(format!(
                "its worker sent a record for step {step} of a job of {steps} steps"
            ));
        }
        if rec.more.len() + 1 != self.directions {
            return Err(format!(
                "its worker sent a record of {} direction(s) for a {} job of {} direction(s)",
                rec.more.len() + 1,
                self.estimator,
                self.directions,
            ));
        }
        if let Err(why) = self.estimator.check_trailer(rec.spread, rec.basis) {
            return Err(format!(
                "its worker sent a record that does not fit its job: {why}"
            ));
        }
        let values = [rec.projected_grad, rec.loss_plus, rec.loss_minus, rec.lr]
            .into_iter()
            .chain(rec.spread)
            .chain(
                rec.more
                    .iter()
                    .flat_map(|d| [d.projected_grad, d.loss_plus, d.loss_minus]),
            );
        if let Some(v) = values.into_iter().find(|v| !v.is_finite()) {
            return Err(format!(
                "its worker sent a record for step {step} holding {v} (a step's losses and \
                 gradients are finite: a worker stops on a non-finite loss)"
            ));
        }
        Ok(())
    }
}

/// The longest record any job can log (64 directions and a trailer): the
/// bound on a line read from a worker.
pub const MAX_RECORD_BYTES: usize = RECORD_BYTES + 63 * 32 + 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seedlog::Direction;

    const JOB: &str = "model: {path: /m}\ndata: {train: /d.jsonl}\ntask: {kind: causal_lm}\n\
                       mezo: {steps: 3, lr: 1.0e-3, eps: 1.0e-3, directions: 2}\n";

    fn rec(step: u64) -> StepRecord {
        StepRecord {
            step,
            seed: 1,
            projected_grad: 0.5,
            loss_plus: 1.0,
            loss_minus: 2.0,
            lr: 1e-3,
            more: vec![Direction {
                seed: 2,
                projected_grad: 0.25,
                loss_plus: 1.0,
                loss_minus: 1.5,
            }],
            spread: None,
            basis: None,
        }
    }

    #[test]
    fn the_facts_are_the_daemons_own_parse() {
        let f = JobFacts::read(&format!("priority: 7\nname: mine\n{JOB}")).unwrap();
        assert_eq!((f.priority, f.steps, f.wants_gpu), (7, 3, false));
        assert_eq!(f.name.as_deref(), Some("mine"));
        assert_eq!(f.records.bytes(), rec(0).to_bytes().len());
        // A relative path needs a workdir the spool does not have; no file is opened.
        let why = JobFacts::read(&JOB.replace("/d.jsonl", "d.jsonl")).unwrap_err();
        assert!(why.contains("relative"), "{why}");
        assert!(JobFacts::read("priority: [1]\n").is_err());
    }

    /// A model split over GPUs is refused with the way out; one split over
    /// the CPU alone runs (the worker keeps its devices).
    #[test]
    fn a_model_split_over_gpus_is_refused_and_over_the_cpu_taken() {
        let with = |device: &str| {
            JobFacts::read(&JOB.replace("{path: /m}", &format!("{{path: /m, device: {device}}}")))
        };
        let why = with("[cuda:0, cuda:1]").unwrap_err();
        assert!(why.contains("splits the model over GPUs"), "{why}");
        assert!(with("[cuda:0, cpu]").is_err());
        assert!(!with("[cpu, cpu]").unwrap().wants_gpu);
        assert!(with("auto").unwrap().wants_gpu);
    }

    /// `after:` and `notify:` are read by the daemon itself, as written
    /// (names are resolved at intake, against the owner's jobs).
    #[test]
    fn after_and_notify_are_the_daemons_own_reading() {
        let f = JobFacts::read(&format!(
            "after: [4, prep]\nnotify: {{command: [logger, \"$HOME\"]}}\n{JOB}"
        ))
        .unwrap();
        assert_eq!(f.after, vec![JobRef::Id(4), JobRef::Name("prep".into())]);
        assert_eq!(f.notify, Some(vec!["logger".to_string(), "$HOME".into()]));
        let plain = JobFacts::read(JOB).unwrap();
        assert!(plain.after.is_empty() && plain.notify.is_none());
        let why = JobFacts::read(&format!("after: [0]\n{JOB}")).unwrap_err();
        assert!(why.contains("ids start at 1"), "{why}");
    }

    #[test]
    fn only_the_next_finite_record_of_the_jobs_shape_is_taken() {
        let shape = JobFacts::read(JOB).unwrap().records;
        assert_eq!(shape.check(&rec(0), 0, 3), Ok(()));
        assert!(shape
            .check(&rec(1), 0, 3)
            .unwrap_err()
            .contains("step 0 was due"));
        assert!(shape
            .check(&rec(3), 3, 3)
            .unwrap_err()
            .contains("of 3 steps"));
        let mut one = rec(0);
        one.more.clear();
        assert!(shape
            .check(&one, 0, 3)
            .unwrap_err()
            .contains("1 direction(s)"));
        let mut spread = rec(0);
        spread.spread = Some(1.0);
        assert!(shape.check(&spread, 0, 3).is_err());
        for bad in [f64::NAN, f64::INFINITY] {
            let mut r = rec(0);
            r.more[0].loss_minus = bad;
            assert!(shape.check(&r, 0, 3).unwrap_err().contains("finite"));
            let mut r = rec(0);
            r.lr = bad;
            assert!(shape.check(&r, 0, 3).is_err());
        }
        assert!(rec(0).to_bytes().len() <= MAX_RECORD_BYTES);
    }
}
