//! The systemd unit shipped in `boot/erel-boot.service` parses cleanly and is hardened:
//! checked with `systemd-analyze` (systemd-analyze(1)), skipped where it is not
//! installed.

use std::path::Path;
use std::process::Command;

/// The unit before hardening scored this in `systemd-analyze security --offline=yes`
/// (0 is the most confined, 10 the least).
const EXPOSURE_BEFORE_HARDENING: f64 = 9.6;

/// The unit file, as shipped.
fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("erel-boot.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze ARGS.. erel-boot.service` on `text` in a temporary directory; `None`
/// when `systemd-analyze` is not installed.
fn analyze(args: &[&str], text: &str) -> Option<std::process::Output> {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("erel-boot.service");
    std::fs::write(&copy, text).expect("write the unit");
    match Command::new("systemd-analyze")
        .args(args)
        .arg(&copy)
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("systemd-analyze is not installed: skipped");
            None
        }
        Err(e) => panic!("run systemd-analyze: {e}"),
    }
}

#[test]
fn the_unit_file_parses_without_a_warning() {
    // `verify` also checks that ExecStart's program exists: point it at one that does.
    let text = unit().replace("/usr/local/bin/erel-boot", "/bin/true");
    let Some(out) = analyze(&["verify"], &text) else {
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // The check can fail: a misspelt setting is reported.
    let misspelt = text.replace("ProtectSystem=", "ProtectSystm=");
    let out = analyze(&["verify"], &misspelt).expect("ran once already");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectSystm"),
        "a misspelt key goes unnoticed"
    );
}

#[test]
fn the_unit_is_more_confined_than_before_hardening() {
    let Some(out) = analyze(&["security", "--offline=yes"], &unit()) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|line| line.split("erel-boot.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(score < EXPOSURE_BEFORE_HARDENING, "{score}\n{text}");
    for kept in ["Delegate=yes", "KillMode=process"] {
        assert!(unit().contains(kept), "{kept} must stay");
    }
    for refused in [
        "\nProtectControlGroups=",
        "\nNoNewPrivileges=",
        "\nPrivateTmp=",
    ] {
        assert!(!unit().contains(refused), "{refused} gets in releases' way");
    }
}
