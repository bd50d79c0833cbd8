//! The binaries the guests run, built on the host, and the tests each suite
//! holds (listed on the host, so a guest that dies part-way still has a plan to
//! report against).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use crate::exec;

/// The suites that are not integration-test binaries.
pub const PROBE: &str = "probe";
pub const BTF_OFFSETS: &str = "btf_offsets";

/// The suites asked for, in the order given, with `all` expanded later (once
/// the integration-test binaries are known).
pub fn suites(requested: &[String]) -> anyhow::Result<Vec<String>> {
    let mut suites: Vec<String> = Vec::new();
    for name in requested {
        let name = name.trim().to_string();
        if name.is_empty() {
            continue;
        }
        let (base, hook) = split_hook(&name);
        if base.is_empty()
            || !base
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            bail!("--kernel-suites: {name:?} is not a suite name");
        }
        if let Some(hook) = hook
            && !STATE_HOOKS.contains(&hook)
        {
            bail!(
                "--kernel-suites: {name:?}: the state hook after @ is one of {}",
                STATE_HOOKS.join(", ")
            );
        }
        if !suites.contains(&name) {
            suites.push(name);
        }
    }
    if suites.is_empty() {
        bail!("--kernel-suites: nothing to run");
    }
    Ok(suites)
}

/// State hooks a suite can be run with (`lifecycle@fentry`): the agent's
/// `--state-hook` values other than the default.
pub const STATE_HOOKS: &[&str] = &["fentry", "kprobe", "tracepoint"];

/// `lifecycle@fentry` → (`lifecycle`, `fentry`).
pub fn split_hook(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((base, hook)) => (base, Some(hook)),
        None => (name, None),
    }
}

/// What one suite runs.
#[derive(Clone, Debug)]
pub enum Runner {
    /// `tracer -v probe`.
    Probe,
    /// A libtest binary; each test runs alone: `<exe> --exact <name>`.
    Tests(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Suite {
    pub name: String,
    /// `TRACER_STATE_HOOK` for this suite's tests (the agent's and the tests'
    /// `auto` becomes it); they run only where `tracer probe` lists it available.
    pub state_hook: Option<String>,
    pub runner: Runner,
    /// Test names (for `Probe`, the single pseudo-test `probe`).
    pub tests: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Binaries {
    pub tracer: PathBuf,
    pub suites: Vec<Suite>,
}

/// Builds the agent, the tracer unit-test binary and (when asked for) the
/// integration-test binaries, in release mode: emulation is slow enough.
pub fn binaries(requested: &[String], filter: Option<&str>) -> anyhow::Result<Binaries> {
    let tracer = executables(&["build", "--release", "--package", "tracer"])?
        .remove(&("tracer".to_string(), false))
        .context("cargo build produced no tracer binary")?;
    let needs_unit = requested
        .iter()
        .any(|s| split_hook(s).0 == BTF_OFFSETS || s == "all");
    let needs_integration = requested
        .iter()
        .any(|s| ![PROBE, BTF_OFFSETS].contains(&split_hook(s).0));
    let unit = if needs_unit {
        Some(
            executables(&[
                "test",
                "--release",
                "--package",
                "tracer",
                "--lib",
                "--no-run",
            ])?
            .remove(&("tracer".to_string(), true))
            .context("cargo test --no-run produced no tracer unit-test binary")?,
        )
    } else {
        None
    };
    // Test targets of integration-tests, by name (lifecycle, keepalive, ...).
    let integration: BTreeMap<String, PathBuf> = if needs_integration {
        executables(&[
            "test",
            "--release",
            "--package",
            "integration-tests",
            "--tests",
            "--no-run",
        ])?
        .into_iter()
        .filter(|((name, test), _)| *test && name != "integration_tests")
        .map(|((name, _), path)| (name, path))
        .collect()
    } else {
        BTreeMap::new()
    };

    let mut names: Vec<String> = Vec::new();
    for name in requested {
        if name == "all" {
            names.push(PROBE.into());
            names.push(BTF_OFFSETS.into());
            names.extend(integration.keys().cloned());
        } else {
            names.push(name.clone());
        }
    }
    let mut suites = Vec::new();
    for name in names {
        if suites.iter().any(|s: &Suite| s.name == name) {
            continue;
        }
        let (base, hook) = split_hook(&name);
        let state_hook = hook.map(str::to_string);
        let suite = match base {
            PROBE => Suite {
                runner: Runner::Probe,
                tests: vec![PROBE.into()],
                name,
                state_hook,
            },
            BTF_OFFSETS => {
                let exe = unit.clone().context("unit-test binary not built")?;
                Suite {
                    tests: list_tests(&exe, Some(BTF_OFFSETS))?,
                    runner: Runner::Tests(exe),
                    name,
                    state_hook,
                }
            }
            _ => {
                let Some(exe) = integration.get(base) else {
                    bail!(
                        "--kernel-suites: no suite {name:?}; there are {PROBE}, {BTF_OFFSETS}, \
                         all, and the integration-test binaries {}",
                        integration.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                };
                Suite {
                    tests: list_tests(exe, filter)?,
                    runner: Runner::Tests(exe.clone()),
                    name,
                    state_hook,
                }
            }
        };
        suites.push(suite);
    }
    Ok(Binaries { tracer, suites })
}

/// Runs cargo with JSON messages and returns its executables by (target name,
/// whether it is a test build). Diagnostics still reach the terminal.
fn executables(args: &[&str]) -> anyhow::Result<BTreeMap<(String, bool), PathBuf>> {
    let mut cargo = exec::cargo();
    cargo
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = cargo
        .output()
        .with_context(|| format!("cannot start {cargo:?}"))?;
    if !out.status.success() {
        bail!("{cargo:?} failed: {}", out.status);
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        let test = message["profile"]["test"].as_bool().unwrap_or(false);
        found.insert((name.to_string(), test), PathBuf::from(executable));
    }
    Ok(found)
}

/// The tests a libtest binary holds (matching `filter`), as `--list` names them.
fn list_tests(exe: &Path, filter: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut list = std::process::Command::new(exe);
    list.args(["--list", "--format", "terse"]);
    if let Some(filter) = filter {
        list.arg(filter);
    }
    let out = exec::output(&mut list)?;
    if !out.status.success() {
        bail!("{list:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}
