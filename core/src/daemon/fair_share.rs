//! Fair share: each user's recent use of the server, decayed with a
//! half-life, as Slurm's multifactor priority counts it.  At equal priority
//! the user who used the least goes next, so one user's backlog does not
//! hold everyone else off the machine.
//!
//! Usage is counted in *device-seconds*: a running job adds one per second
//! for each pool it holds (a GPU, or a CPU slot).  Every update multiplies
//! what was there by 2^(−elapsed / half-life) first, so a day-old hour
//! counts half an hour with a one-day half-life.  The figures live in the
//! daemon's database (one tree, uid → usage and when it was last decayed),
//! so a restart does not reset anyone's share.

use std::collections::HashMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One user's decayed usage as of `at` (Unix seconds, fractional).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub device_seconds: f64,
    pub at: f64,
}

impl Usage {
    /// The usage as of `now`, decayed with `half_life` seconds.
    pub fn at(self, now: f64, half_life: f64) -> f64 {
        let elapsed = (now - self.at).max(0.0);
        self.device_seconds * 0.5f64.powf(elapsed / half_life.max(1.0))
    }
}

/// Every user's usage, kept in memory and mirrored in a sled tree.
pub struct Ledger {
    tree: sled::Tree,
    users: HashMap<u32, Usage>,
    half_life: f64,
}

impl Ledger {
    /// Open the ledger in `tree`; `half_life` in seconds.
    pub fn open(tree: sled::Tree, half_life: f64) -> Result<Self> {
        let mut users = HashMap::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let (Ok(uid), Ok(u)) = (
                <[u8; 4]>::try_from(k.as_ref()).map(u32::from_be_bytes),
                serde_json::from_slice::<Usage>(&v),
            ) else {
                continue;
            };
            users.insert(uid, u);
        }
        Ok(Self {
            tree,
            users,
            half_life,
        })
    }

    /// Keep the figures in `tree` from now on (the daemon reopened its
    /// database): what is in memory is written there.
    pub(crate) fn rebind(&mut self, tree: sled::Tree) -> Result<()> {
        for (uid, u) in &self.users {
            tree.insert(uid.to_be_bytes(), serde_json::to_vec(u)?)?;
        }
        self.tree = tree;
        Ok(())
    }

    pub(crate) fn set_half_life(&mut self, half_life: f64) {
        self.half_life = half_life;
    }

    pub fn half_life(&self) -> f64 {
        self.half_life
    }

    /// Charge `devices` devices held by `uid` since the last charge, as of
    /// `now`: the usage decays to `now`, then grows by the time each device
    /// was held.  Charged every admission turn for every user with running
    /// jobs (`devices` 0 for the others is not needed: reads decay).
    pub(crate) fn charge(&mut self, uid: u32, devices: f64, now: f64) -> Result<()> {
        let u = self.users.entry(uid).or_insert(Usage {
            device_seconds: 0.0,
            at: now,
        });
        let elapsed = (now - u.at).max(0.0);
        let held = devices * elapsed;
        u.device_seconds = u.at(now, self.half_life) + held;
        u.at = now;
        let bytes = serde_json::to_vec(&*u)?;
        self.tree.insert(uid.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// Start the clock of `uid` at `now` without charging (a user whose
    /// first job just started: its time counts from now).
    pub(crate) fn touch(&mut self, uid: u32, now: f64) {
        let half_life = self.half_life;
        let u = self.users.entry(uid).or_insert(Usage {
            device_seconds: 0.0,
            at: now,
        });
        u.device_seconds = u.at(now, half_life);
        u.at = now;
    }

    /// The usage of `uid` as of `now` (0 for a user never seen).
    pub fn usage(&self, uid: u32, now: f64) -> f64 {
        self.users
            .get(&uid)
            .map_or(0.0, |u| u.at(now, self.half_life))
    }

    /// Every user's usage as of `now`, largest first.
    pub fn all(&self, now: f64) -> Vec<(u32, f64)> {
        let mut v: Vec<(u32, f64)> = self
            .users
            .iter()
            .map(|(&uid, u)| (uid, u.at(now, self.half_life)))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// Usage in words: "2.1 device-hours", "12 device-minutes".  Coarse on
/// purpose: a waiting job's reason quotes it, and a reason that changed every
/// second would rewrite every waiting job's record every turn.
pub fn describe(device_seconds: f64) -> String {
    let h = device_seconds / 3600.0;
    if h >= 1.0 {
        format!("{h:.1} device-hours")
    } else {
        format!("{:.0} device-minutes", (device_seconds / 60.0).floor())
    }
}

/// The half-life in words: "1 day", "7 days", "12 h".
pub fn describe_half_life(secs: f64) -> String {
    let days = secs / 86_400.0;
    if days >= 1.0 && (days - days.round()).abs() < 1e-9 {
        let d = days.round();
        format!("{d} day{}", if d == 1.0 { "" } else { "s" })
    } else {
        format!("{} h", (secs / 360.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(half_life: f64) -> Ledger {
        let db = sled::Config::new().temporary(true).open().unwrap();
        Ledger::open(db.open_tree("usage").unwrap(), half_life).unwrap()
    }

    #[test]
    fn usage_grows_with_devices_held_and_halves_each_half_life() {
        let mut l = ledger(100.0);
        l.touch(7, 0.0);
        l.charge(7, 2.0, 10.0).unwrap();
        assert!((l.usage(7, 10.0) - 20.0).abs() < 1e-9);
        // One half-life later, half.
        assert!((l.usage(7, 110.0) - 10.0).abs() < 1e-9);
        // Charged again: decay first, then what was held since.
        l.charge(7, 1.0, 110.0).unwrap();
        assert!(
            (l.usage(7, 110.0) - 110.0).abs() < 1e-9,
            "{}",
            l.usage(7, 110.0)
        );
        assert_eq!(l.usage(8, 110.0), 0.0);
        assert_eq!(l.all(110.0)[0].0, 7);
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let mut l = Ledger::open(db.open_tree("usage").unwrap(), 3600.0).unwrap();
        l.touch(5, 0.0);
        l.charge(5, 1.0, 60.0).unwrap();
        let again = Ledger::open(db.open_tree("usage").unwrap(), 3600.0).unwrap();
        assert_eq!(again.usage(5, 60.0), l.usage(5, 60.0));
    }

    #[test]
    fn figures_read_as_words() {
        assert_eq!(describe(7560.0), "2.1 device-hours");
        assert_eq!(describe(42.0), "0 device-minutes");
        assert_eq!(describe(750.0), "12 device-minutes");
        assert_eq!(describe_half_life(86_400.0), "1 day");
        assert_eq!(describe_half_life(7.0 * 86_400.0), "7 days");
        assert_eq!(describe_half_life(43_200.0), "12 h");
    }
}
