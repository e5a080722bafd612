//! A job's lifecycle: its states, each with the data that belongs to it, and
//! the one function that moves a job from state to state, refusing every move
//! the daemon must never make (a finished job started again, a cancelled one
//! resurrected by a late worker exit).
//!
//! ```text
//!            admit            start
//!  queued ─────────▶ admitted ───────▶ running ──finish──▶ done
//!    ▲  ▲               │  │             │ │ │
//!    │  └──── retry ────┘  └─ preempt ─┐ │ │ └──fail──▶ failed
//!    │  └──────────── retry ───────────┼─┘ │
//!    │                                 ▼   ▼ preempt
//!    └──────────── requeue ────────── preempted
//!
//!  cancel: queued | admitted | running | preempted ──▶ cancelled
//!  fail:   queued (never fits; a job it waits for failed or was cancelled)
//!          | admitted (cannot start) | running ──▶ failed
//!  requeue (daemon start): admitted | running | preempted ──▶ queued
//!  restart (`mezod restart`): failed | cancelled ──▶ queued
//! ```
//!
//! A restarted job keeps its id, folder and seed log: it resumes where it
//! stopped.  A done job is not restarted (its result stands; submit the
//! job again for another run).

use serde::{Deserialize, Serialize};

use super::admission::Pool;

/// Where a job is in its life, with what that state knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for memory or a slot; after a crash, not before `not_before`
    /// (Unix seconds: the retry backoff).
    Queued {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<u64>,
    },
    /// Chosen by admission for `pool`; its worker is starting.
    Admitted {
        pool: Pool,
    },
    /// Its worker runs on `pool` since `since` (Unix seconds).
    Running {
        pool: Pool,
        since: u64,
    },
    /// Stopped at a step boundary by a daemon stop; queued again at the next start.
    Preempted,
    Done {
        finished_at: u64,
        /// The dev-metric summary of its result.json.
        #[serde(default)]
        result: Option<serde_json::Value>,
    },
    /// The job record's `reason` says why.
    Failed {
        finished_at: u64,
    },
    Cancelled {
        finished_at: u64,
        by_uid: u32,
    },
}

/// A move between states.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Admission placed it on `pool`.
    Admit { pool: Pool },
    /// Its worker process started.
    Start { since: u64 },
    /// A daemon stop halted its worker at a step boundary (or before it started).
    Preempt,
    /// The daemon (re)started: whatever was under way waits in the queue again.
    Requeue,
    /// Its worker crashed; try again, not before `not_before`.
    Retry { not_before: u64 },
    /// Its worker finished every step.
    Finish {
        at: u64,
        result: Option<serde_json::Value>,
    },
    /// It cannot succeed (never fits, retries used up, a worker that cannot start).
    Fail { at: u64 },
    /// Its owner or root cancelled it.
    Cancel { at: u64, by_uid: u32 },
    /// Its owner or root queued a failed or cancelled job again.
    Restart,
}

/// A move the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("a {from} job cannot {transition}")]
pub struct IllegalTransition {
    pub from: &'static str,
    pub transition: &'static str,
}

impl JobState {
    /// The name users see (`mezod status`, JSON `state`).
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued { .. } => "queued",
            JobState::Admitted { .. } => "admitted",
            JobState::Running { .. } => "running",
            JobState::Preempted => "preempted",
            JobState::Done { .. } => "done",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled { .. } => "cancelled",
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Done { .. } | JobState::Failed { .. } | JobState::Cancelled { .. }
        )
    }

    /// Queued and free to be admitted at `now`.
    pub(crate) fn is_admissible(&self, now: u64) -> bool {
        matches!(self, JobState::Queued { not_before } if not_before.is_none_or(|t| t <= now))
    }

    /// When it ended, if it has.
    pub fn finished_at(&self) -> Option<u64> {
        match self {
            JobState::Done { finished_at, .. }
            | JobState::Failed { finished_at }
            | JobState::Cancelled { finished_at, .. } => Some(*finished_at),
            _ => None,
        }
    }

    /// The state after `t`, or why `t` is not allowed from here.
    pub fn next(&self, t: Transition) -> Result<JobState, IllegalTransition> {
        use JobState as S;
        use Transition as T;
        Ok(match (self, t) {
            (S::Queued { .. }, T::Admit { pool }) => S::Admitted { pool },
            (S::Admitted { pool }, T::Start { since }) => S::Running {
                pool: pool.clone(),
                since,
            },
            (S::Admitted { .. } | S::Running { .. }, T::Preempt) => S::Preempted,
            (S::Admitted { .. } | S::Running { .. } | S::Preempted, T::Requeue) => {
                S::Queued { not_before: None }
            }
            (S::Admitted { .. } | S::Running { .. }, T::Retry { not_before }) => S::Queued {
                not_before: Some(not_before),
            },
            (S::Running { .. }, T::Finish { at, result }) => S::Done {
                finished_at: at,
                result,
            },
            (S::Queued { .. } | S::Admitted { .. } | S::Running { .. }, T::Fail { at }) => {
                S::Failed { finished_at: at }
            }
            (
                S::Queued { .. } | S::Admitted { .. } | S::Running { .. } | S::Preempted,
                T::Cancel { at, by_uid },
            ) => S::Cancelled {
                finished_at: at,
                by_uid,
            },
            (S::Failed { .. } | S::Cancelled { .. }, T::Restart) => S::Queued { not_before: None },
            (from, t) => {
                return Err(IllegalTransition {
                    from: from.name(),
                    transition: t.name(),
                })
            }
        })
    }
}

impl Transition {
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Admit { .. } => "be admitted",
            Transition::Start { .. } => "start",
            Transition::Preempt => "be preempted",
            Transition::Requeue => "be queued again",
            Transition::Retry { .. } => "be retried",
            Transition::Finish { .. } => "finish",
            Transition::Fail { .. } => "fail",
            Transition::Cancel { .. } => "be cancelled",
            Transition::Restart => "be restarted",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<JobState> {
        vec![
            JobState::Queued { not_before: None },
            JobState::Admitted { pool: "cpu".into() },
            JobState::Running {
                pool: "cpu".into(),
                since: 5,
            },
            JobState::Preempted,
            JobState::Done {
                finished_at: 9,
                result: None,
            },
            JobState::Failed { finished_at: 9 },
            JobState::Cancelled {
                finished_at: 9,
                by_uid: 0,
            },
        ]
    }

    fn transitions() -> Vec<Transition> {
        vec![
            Transition::Admit {
                pool: "GPU-a".into(),
            },
            Transition::Start { since: 7 },
            Transition::Preempt,
            Transition::Requeue,
            Transition::Retry { not_before: 70 },
            Transition::Finish {
                at: 8,
                result: None,
            },
            Transition::Fail { at: 8 },
            Transition::Cancel {
                at: 8,
                by_uid: 1000,
            },
            Transition::Restart,
        ]
    }

    /// Every (state, transition) pair: the expected next state, or `-` where
    /// the move is illegal.  Rows are states, columns the transitions above.
    #[test]
    fn every_edge_of_the_lifecycle_is_legal_or_refused_as_the_table_says() {
        #[rustfmt::skip]
        let table: [[&str; 9]; 7] = [
            //  admit       start      preempt      requeue   retry     finish  fail      cancel       restart
            ["admitted", "-",       "-",         "-",      "-",      "-",    "failed", "cancelled", "-"     ], // queued
            ["-",        "running", "preempted", "queued", "queued", "-",    "failed", "cancelled", "-"     ], // admitted
            ["-",        "-",       "preempted", "queued", "queued", "done", "failed", "cancelled", "-"     ], // running
            ["-",        "-",       "-",         "queued", "-",      "-",    "-",      "cancelled", "-"     ], // preempted
            ["-",        "-",       "-",         "-",      "-",      "-",    "-",      "-",         "-"     ], // done
            ["-",        "-",       "-",         "-",      "-",      "-",    "-",      "-",         "queued"], // failed
            ["-",        "-",       "-",         "-",      "-",      "-",    "-",      "-",         "queued"], // cancelled
        ];
        for (state, row) in states().into_iter().zip(table) {
            for (t, expected) in transitions().into_iter().zip(row) {
                let got = state.next(t.clone());
                match (expected, &got) {
                    ("-", Err(e)) => assert_eq!(e.from, state.name()),
                    ("-", Ok(s)) => panic!("{state} may not {}, yet became {s}", t.name()),
                    (want, Ok(s)) => assert_eq!(s.name(), want, "{state} + {}", t.name()),
                    (want, Err(e)) => panic!("{state} should {} (→ {want}): {e}", t.name()),
                }
            }
        }
    }

    #[test]
    fn states_carry_their_data() {
        let running = JobState::Admitted {
            pool: "GPU-a".into(),
        }
        .next(Transition::Start { since: 42 })
        .unwrap();
        assert_eq!(
            running,
            JobState::Running {
                pool: "GPU-a".into(),
                since: 42
            }
        );
        let retry = running.next(Transition::Retry { not_before: 100 }).unwrap();
        assert!(!retry.is_admissible(99) && retry.is_admissible(100));
        let err = JobState::Done {
            finished_at: 1,
            result: None,
        }
        .next(Transition::Start { since: 2 })
        .unwrap_err();
        assert_eq!(err.to_string(), "a done job cannot start");
    }

    #[test]
    fn the_state_serializes_as_a_tag_with_its_fields() {
        let s = JobState::Cancelled {
            finished_at: 9,
            by_uid: 1000,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "cancelled", "finished_at": 9, "by_uid": 1000})
        );
        assert_eq!(serde_json::from_value::<JobState>(v).unwrap(), s);
    }
}
