//! Real Erlang/OTP releases, built in the test with rebar3.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Longest `epmd` may take to answer once started.
const EPMD_PATIENCE: Duration = Duration::from_secs(10);

/// Builds a release `name` with `rebar3 new release` and `rebar3 as prod tar` under
/// `dir`, with `vm_args_src` as `config/vm.args.src` when given (relx substitutes
/// `${VAR}` from the environment at start). Returns the tarball.
pub fn build_release(dir: &Path, name: &str, vm_args_src: Option<&str>) -> PathBuf {
    build_release_with(dir, name, vm_args_src, &[])
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Makes sure an `epmd` runs on the host, started here (outside any release) when none
/// does. An OTP node that finds none starts its own, which then belongs to the node's
/// release (its cgroup) and is stopped with it, under the feet of the nodes of tests that
/// run at the same time. Hosts run it as a system service for the same reason.
pub fn ensure_epmd() {
    let epmd = which("epmd").unwrap_or_else(|| {
        panic!("epmd is not on PATH: scripts/test.sh installs it with Erlang/OTP (apt-get install erlang-base)")
    });
    let run = |arg: &str| {
        Command::new(&epmd)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    // A second `epmd -daemon` finds the port taken and leaves the first one be.
    assert!(run("-daemon"), "{} -daemon failed", epmd.display());
    assert!(
        super::wait_until_blocking(EPMD_PATIENCE, || run("-names")),
        "epmd does not answer {}s after it was started",
        EPMD_PATIENCE.as_secs()
    );
}

/// The version `rebar3 new release` gives a release.
const TEMPLATE_VERSION: &str = "0.1.0";

/// Like [`build_release`], but also writes `files` (paths relative to the project, for
/// example `apps/<name>/src/<name>_app.erl`) after `rebar3 new release` and before
/// `rebar3 as prod tar`.
pub fn build_release_with(
    dir: &Path,
    name: &str,
    vm_args_src: Option<&str>,
    files: &[(String, String)],
) -> PathBuf {
    build_release_version(dir, name, TEMPLATE_VERSION, vm_args_src, files)
}

/// Like [`build_release_with`], but the release is `version` (relx's release version in
/// `rebar.config`, so the tarball holds `releases/<version>/` and is named
/// `<name>-<version>.tar.gz`); the application keeps the template's version.
pub fn build_release_version(
    dir: &Path,
    name: &str,
    version: &str,
    vm_args_src: Option<&str>,
    files: &[(String, String)],
) -> PathBuf {
    let rebar3 = which("rebar3").unwrap_or_else(|| {
        panic!("rebar3 is not on PATH: scripts/test.sh installs it (apt-get install rebar3)")
    });
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let run = |args: &[&str], cwd: &Path| {
        let out = Command::new(&rebar3)
            .args(args)
            .current_dir(cwd)
            .env("HOME", &home)
            .env("REBAR_CACHE_DIR", home.join("rebar3-cache"))
            .output()
            .expect("run rebar3");
        assert!(
            out.status.success(),
            "rebar3 {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["new", "release", name], dir);
    let project = dir.join(name);
    if let Some(vm_args) = vm_args_src {
        let config = project.join("config");
        let _ = std::fs::remove_file(config.join("vm.args"));
        std::fs::write(config.join("vm.args.src"), vm_args).expect("write vm.args.src");
    }
    if vm_args_src.is_some() {
        // relx reads the template only when rebar.config names it as vm_args_src.
        let config = project.join("rebar.config");
        let text = std::fs::read_to_string(&config).expect("read rebar.config");
        let text = text.replace(
            "{vm_args, \"./config/vm.args\"}",
            "{vm_args_src, \"./config/vm.args.src\"}",
        );
        std::fs::write(&config, text).expect("write rebar.config");
    }
    if version != TEMPLATE_VERSION {
        let config = project.join("rebar.config");
        let text = std::fs::read_to_string(&config).expect("read rebar.config");
        let template = format!("{{release, {{{name}, \"{TEMPLATE_VERSION}\"}}");
        assert!(
            text.contains(&template),
            "rebar.config has no {template}:\n{text}"
        );
        let text = text.replace(&template, &format!("{{release, {{{name}, \"{version}\"}}"));
        std::fs::write(&config, text).expect("write rebar.config");
    }
    for (path, content) in files {
        std::fs::write(project.join(path), content).expect("write project file");
    }
    run(&["as", "prod", "tar"], &project);
    // Every OTP release of the tests is built here before it starts.
    ensure_epmd();
    let tarball = project
        .join("_build/prod/rel")
        .join(name)
        .join(format!("{name}-{version}.tar.gz"));
    assert!(tarball.exists(), "{} was not built", tarball.display());
    tarball
}
