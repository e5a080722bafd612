//! The systemd unit is checked by systemd itself (`systemd-analyze verify`),
//! with ExecStart pointed at the binary under test.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// `systemd-analyze verify` on `unit_text`; returns what it said about the unit.
fn verify(dir: &Path, unit_text: &str) -> Option<String> {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if probe.is_err() {
        assert!(
            std::env::var_os("MEZOD_REQUIRE_SYSTEMD_ANALYZE").is_none(),
            "systemd-analyze is required here but missing (install systemd)"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return None;
    }
    let unit = dir.join("mezod.service");
    let text = unit_text
        .replace("/usr/local/bin/mezod", env!("CARGO_BIN_EXE_mezod"))
        .replace(
            "/etc/mezod/daemon.yaml",
            &root().join("systemd/daemon.yaml").display().to_string(),
        );
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Only what concerns our unit (verify also reports on system units it loads).
    Some(
        said.lines()
            .filter(|l| l.contains("mezod.service") || !out.status.success())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(root().join("systemd/mezod.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "KillMode=mixed",
        "TimeoutStopSec=",
        "Restart=on-failure",
        "StateDirectory=mezod",
        "RuntimeDirectory=mezod",
        "DeviceAllow=char-nvidia* rw",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    assert!(
        !unit
            .lines()
            .any(|l| l.trim_start().starts_with("PrivateDevices=yes")),
        "would hide /dev/nvidia*"
    );
    let tmp = tempfile::tempdir().unwrap();
    if let Some(said) = verify(tmp.path(), &unit) {
        assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");
        // The check bites: a misspelt key is reported.
        let said = verify(tmp.path(), &unit.replace("KillMode=", "KilMode=")).unwrap();
        assert!(said.contains("KilMode"), "{said}");
    }
}

#[test]
fn the_shipped_daemon_config_parses() {
    let cfg =
        mezod::daemon::config::DaemonConfig::load(&root().join("systemd/daemon.yaml")).unwrap();
    // It is a commented copy of the defaults: what it sets is what a daemon
    // without a config does (so the README's table and the copy agree).
    assert_eq!(cfg, mezod::daemon::config::DaemonConfig::default());
}
