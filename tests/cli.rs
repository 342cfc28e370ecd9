//! The `stickylb` binary's command line.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn stickylb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stickylb"))
        .args(args)
        .env_remove("STICKYLB_SECRET")
        .output()
        .unwrap()
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stickylb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = "[listener]\naddress = \"127.0.0.1:8080\"\n\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n";

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let out = stickylb(&[
        "check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    for needle in [
        "OK",
        "listener  127.0.0.1:8080",
        "cookie    stickylb",
        "round_robin",
        "GET /healthz",
        "127.0.0.1:9002",
    ] {
        assert!(text.contains(needle), "summary lacks {needle:?}:\n{text}");
    }
}

#[test]
fn check_warns_about_a_missing_secret() {
    let path = write("nosecret.toml", GOOD);
    let out = stickylb(&["check", "-c", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("NOT SET"));
}

#[test]
fn check_rejects_bad_configs_naming_file_line_key_and_valid_values() {
    let cases = [
        (
            "algo.toml",
            format!("{GOOD}\n[balancer]\nalgorithm = \"random\"\n"),
            ":9: key `balancer.algorithm`",
            "expected `round_robin` or `least_connections`",
        ),
        (
            "unknown.toml",
            format!("{GOOD}weigth = 2\n"),
            ":7: key `backends[0].weigth`",
            "expected one of `id`, `address`, `weight`",
        ),
        (
            "dup.toml",
            format!("{GOOD}\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9002\"\n"),
            ":9: key `backends[1].id`",
            "duplicate id",
        ),
        (
            "addr.toml",
            GOOD.replace("127.0.0.1:9001", "no-port"),
            ":6: key `backends[0].address`",
            "host:port",
        ),
        (
            "dur.toml",
            format!("{GOOD}\n[health]\ninterval = \"soon\"\n"),
            ":9: key `health.interval`",
            "500ms",
        ),
    ];
    for (name, text, location, valid) in cases {
        let path = write(name, &text);
        let out = stickylb(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{name} must be rejected");
        assert!(
            err.contains(&format!("{}{location}", path.display())),
            "{name}: {err}"
        );
        assert!(err.contains(valid), "{name}: {err}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = stickylb(&["check", "--config", "/nonexistent/stickylb.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent/stickylb.toml: cannot read file"));
}

#[test]
fn help_and_version() {
    let help = stickylb(&["--help"]);
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(help.status.success() && text.contains("check") && text.contains("--config"));
    let version = stickylb(&["--version"]);
    assert!(String::from_utf8(version.stdout)
        .unwrap()
        .starts_with("stickylb "));
}
