//! Where this process stands among its job's replicas, as the launcher says in
//! the environment: torchrun's contract first (what `torchrun --no-python` and
//! Kubeflow's PyTorchJob set), Slurm's `srun` variables failing that.
//!
//! Invariant: reading the environment never guesses a rendezvous address. A
//! launch that names ranks but no `MASTER_ADDR`/`MASTER_PORT` is an error
//! that says what to set, never a wait on some default port.

use anyhow::{bail, Result};

/// One replica's place in its launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// How many replica processes the job has.
    pub world: usize,
    /// The rank among the processes on this node (picks the local device).
    pub local_rank: usize,
    /// Where the rendezvous store listens (`MASTER_ADDR`, `MASTER_PORT`).
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already hosts the store on `master_port`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank, rank 0 included,
    /// connects as a client. Otherwise rank 0 hosts it.
    pub agent_store: bool,
    /// torchrun's run id (`TORCHELASTIC_RUN_ID`, "none" by default, as torchrun's).
    pub run_id: String,
    /// Which attempt of the run this is (`TORCHELASTIC_RESTART_COUNT`, 0 first).
    pub restart: u32,
}

impl LaunchEnv {
    /// The launch this process is part of, from its environment:
    /// - torchrun's variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default:
    ///   `RANK`), `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`,
    ///   `TORCHELASTIC_RUN_ID`, `TORCHELASTIC_RESTART_COUNT`;
    /// - when `RANK` and `WORLD_SIZE` are unset, Slurm's: `SLURM_PROCID`,
    ///   `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` and `MASTER_PORT`
    ///   still required. A Slurm step of one task is no replica launch (`srun`
    ///   runs single processes too).
    ///
    /// `None` when neither launcher's variables are set. Empty values count as
    /// unset; malformed ones (a rank not below the world size, a port that is
    /// not a number) are errors that name the variable.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// `from_env` over any lookup (the tests pass a table).
    fn from_vars(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Option<LaunchEnv>> {
        let var = |name: &str| -> Result<Option<String>> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) => Ok(Some(s)),
                    Err(v) => bail!("{name}={v:?} is not valid UTF-8"),
                },
            }
        };
        let (rank, world, local_rank, launcher) = match (var("RANK")?, var("WORLD_SIZE")?) {
            (Some(rank), Some(world)) => {
                let rank = number("RANK", &rank)?;
                let local = match var("LOCAL_RANK")? {
                    Some(v) => number("LOCAL_RANK", &v)?,
                    None => rank,
                };
                (
                    rank,
                    number("WORLD_SIZE", &world)?,
                    local,
                    Launcher::Torchrun,
                )
            }
            (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not (a launcher sets both)"),
            (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not (a launcher sets both)"),
            (None, None) => {
                let Some(procid) = var("SLURM_PROCID")? else {
                    return Ok(None);
                };
                let Some(ntasks) = var("SLURM_NTASKS")? else {
                    bail!("SLURM_PROCID is set but SLURM_NTASKS is not");
                };
                let rank = number("SLURM_PROCID", &procid)?;
                let world = number("SLURM_NTASKS", &ntasks)?;
                if world == 1 && rank == 0 {
                    return Ok(None);
                }
                let local = match var("SLURM_LOCALID")? {
                    Some(v) => number("SLURM_LOCALID", &v)?,
                    None => rank,
                };
                (rank, world, local, Launcher::Slurm)
            }
        };
        let (rank_var, world_var) = launcher.rank_vars();
        if world == 0 {
            bail!("{world_var}=0: a launch has at least one process");
        }
        // c10d takes ranks as C ints.
        if world > i32::MAX as usize {
            bail!("{world_var}={world} is more processes than c10d can address");
        }
        if rank >= world {
            bail!("{rank_var}={rank} is not below {world_var}={world} (ranks count from 0)");
        }
        if local_rank >= world {
            bail!("the local rank {local_rank} is not below the world size {world}");
        }
        let missing = |name: &str| match launcher {
            Launcher::Torchrun => anyhow::anyhow!(
                "RANK and WORLD_SIZE are set but {name} is not: set MASTER_ADDR and MASTER_PORT \
                 to where rank 0 (or torchrun's agent) listens"
            ),
            Launcher::Slurm => anyhow::anyhow!(
                "this is Slurm task {rank} of {world} (SLURM_PROCID, SLURM_NTASKS) but {name} is \
                 not set: export MASTER_ADDR (the first node's address) and MASTER_PORT (a free \
                 port) in the job script; mezod does not guess them"
            ),
        };
        let master_addr = var("MASTER_ADDR")?.ok_or_else(|| missing("MASTER_ADDR"))?;
        if master_addr.contains('\0') {
            bail!("MASTER_ADDR={master_addr:?} contains a NUL byte");
        }
        let master_port = var("MASTER_PORT")?.ok_or_else(|| missing("MASTER_PORT"))?;
        let master_port = match master_port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("MASTER_PORT={master_port:?} is not a port (1 to 65535)"),
        };
        // The rule of torch/distributed/rendezvous.py::_create_c10d_store.
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE")?.as_deref() == Some("True");
        let run_id = var("TORCHELASTIC_RUN_ID")?.unwrap_or_else(|| "none".into());
        if run_id.contains('\0') {
            bail!("TORCHELASTIC_RUN_ID={run_id:?} contains a NUL byte");
        }
        let restart = match var("TORCHELASTIC_RESTART_COUNT")? {
            Some(v) => v.trim().parse::<u32>().map_err(|_| {
                anyhow::anyhow!("TORCHELASTIC_RESTART_COUNT={v:?} is not a count (0, 1, 2, ...)")
            })?,
            None => 0,
        };
        Ok(Some(LaunchEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            agent_store,
            run_id,
            restart,
        }))
    }

    /// This process starts the store server: rank 0, unless torchrun's agent
    /// already hosts it (then rank 0 would fail with EADDRINUSE).
    pub fn hosts_store(&self) -> bool {
        !self.agent_store && self.rank == 0
    }

    /// The namespace of this attempt's keys in the store. torchrun's store
    /// outlives a worker restart and still holds the dead attempt's Gloo
    /// addresses; without the attempt in the prefix a restarted rank may
    /// connect to one of them (3 of 6 restarts failed so, 0 of 6 with it).
    pub fn store_prefix(&self) -> String {
        format!("mezod/{}/{}/", self.run_id, self.restart)
    }
}

/// Which launcher's variables named the ranks (for error messages).
#[derive(Clone, Copy)]
enum Launcher {
    Torchrun,
    Slurm,
}

impl Launcher {
    fn rank_vars(self) -> (&'static str, &'static str) {
        match self {
            Launcher::Torchrun => ("RANK", "WORLD_SIZE"),
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS"),
        }
    }
}

fn number(name: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{name}={value:?} is not a whole number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        LaunchEnv::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into()))
    }

    fn error(vars: &[(&str, &str)]) -> String {
        format!("{:#}", read(vars).expect_err("an error"))
    }

    const TORCHRUN: [(&str, &str); 8] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RUN_ID", "none"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ];

    #[test]
    fn torchrun_variables() {
        let env = read(&TORCHRUN).unwrap().unwrap();
        assert_eq!(
            env,
            LaunchEnv {
                rank: 1,
                world: 2,
                local_rank: 1,
                master_addr: "127.0.0.1".into(),
                master_port: 29500,
                agent_store: true,
                run_id: "none".into(),
                restart: 2,
            }
        );
        assert!(!env.hosts_store());
        assert_eq!(env.store_prefix(), "mezod/none/2/");
    }

    #[test]
    fn a_hand_launch_has_rank_0_host_the_store() {
        let env = read(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world, env.local_rank), (0, 4, 0));
        assert!(env.hosts_store());
        assert_eq!(env.store_prefix(), "mezod/none/0/");
        // Python's rule: only the exact string "True" means the agent's store.
        let other = read(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ])
        .unwrap()
        .unwrap();
        assert!(other.hosts_store());
    }

    #[test]
    fn slurm_variables_when_torchrun_is_silent() {
        let env = read(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world, env.local_rank), (3, 4, 1));
        assert!(!env.agent_store);
        // torchrun's variables win over Slurm's (torchrun under srun).
        let mut both = TORCHRUN.to_vec();
        both.extend([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]);
        assert_eq!(read(&both).unwrap().unwrap().rank, 1);
    }

    #[test]
    fn no_launcher_or_a_single_slurm_task_is_none() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(
            read(&[("MASTER_PORT", "29500"), ("RANK", "")]).unwrap(),
            None
        );
        assert_eq!(
            read(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("SLURM_LOCALID", "0")
            ])
            .unwrap(),
            None
        );
    }

    #[test]
    fn malformed_values_are_errors_that_name_the_variable() {
        let with = |k: &'static str, v: &'static str| {
            let mut vars: Vec<_> = TORCHRUN.iter().filter(|(n, _)| *n != k).copied().collect();
            vars.push((k, v));
            error(&vars)
        };
        for (k, v, words) in [
            ("RANK", "2", "RANK=2 is not below WORLD_SIZE=2"),
            ("RANK", "-1", "RANK=\"-1\" is not a whole number"),
            (
                "WORLD_SIZE",
                "two",
                "WORLD_SIZE=\"two\" is not a whole number",
            ),
            ("WORLD_SIZE", "0", "WORLD_SIZE=0"),
            (
                "LOCAL_RANK",
                "5",
                "local rank 5 is not below the world size 2",
            ),
            (
                "MASTER_PORT",
                "70000",
                "MASTER_PORT=\"70000\" is not a port",
            ),
            ("MASTER_PORT", "0", "MASTER_PORT=\"0\" is not a port"),
            (
                "TORCHELASTIC_RESTART_COUNT",
                "x",
                "TORCHELASTIC_RESTART_COUNT=\"x\"",
            ),
        ] {
            let e = with(k, v);
            assert!(e.contains(words), "{k}={v}: {e}");
        }
        let e = error(&[("RANK", "0")]);
        assert!(e.contains("WORLD_SIZE is not"), "{e}");
        let e = error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]);
        assert!(e.contains("MASTER_ADDR is not"), "{e}");
    }

    #[test]
    fn slurm_without_master_addr_says_what_to_export() {
        let e = error(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        assert!(e.contains("Slurm task 0 of 2"), "{e}");
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = error(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "a"),
        ]);
        assert!(
            e.contains("SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
            "{e}"
        );
        let e = error(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "a"),
        ]);
        assert!(e.contains("MASTER_PORT is not set"), "{e}");
    }
}
