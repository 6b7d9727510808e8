//! Real database drivers for the client-matrix tests: a Python venv, node_modules and compiled
//! Java classes under the target directory, each made once and reused by later runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// Where the drivers are installed: target/tmp, kept between runs.
pub fn tmp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

pub fn must(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a driver script with `input` as JSON in the environment variable `var`, and parses the
/// one JSON value it prints.
pub fn json_output(
    mut cmd: Command,
    var: &str,
    input: &serde_json::Value,
    what: &str,
) -> serde_json::Value {
    let out = must(
        cmd.env(var, input.to_string())
            .output()
            .unwrap_or_else(|e| panic!("{what}: {e}")),
        what,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{text}"))
}

/// A venv `name` under target/tmp with `packages` from pip, made when `import` fails in it.
/// Returns its python.
pub fn python_venv(name: &str, packages: &[&str], import: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let venv = tmp_dir().join(name);
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", &format!("import {import}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready() {
        must(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv)
                .output()
                .expect("python3 (scripts/test installs it)"),
            "python3 -m venv",
        );
        must(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet"])
                .args(packages)
                .output()
                .expect("pip"),
            &format!("pip install {}", packages.join(" ")),
        );
    }
    python
}

/// node_modules of a directory `name` under target/tmp with `packages` from npm, installed
/// when `probe` (a package directory) is missing. Returns the node_modules path (NODE_PATH).
pub fn node_modules(name: &str, packages: &[&str], probe: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmp_dir().join(name);
    let modules = dir.join("node_modules");
    if !modules.join(probe).join("package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        must(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&dir)
                .args(packages)
                .output()
                .expect("npm (scripts/test installs node and npm)"),
            &format!("npm install {}", packages.join(" ")),
        );
    }
    modules
}

/// `source` compiled with javac against the jar `classpath` into target/tmp/`name`, once per
/// test process. Returns the class directory.
pub fn javac(name: &str, classpath: &str, source: &Path) -> PathBuf {
    static COMPILED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut done = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmp_dir().join(name);
    if !done.iter().any(|d| d == name) {
        assert!(
            Path::new(classpath).exists(),
            "{classpath} missing (scripts/test installs the Debian package that has it)"
        );
        std::fs::create_dir_all(&dir).unwrap();
        must(
            Command::new("javac")
                .args(["-nowarn", "-Xlint:none", "-cp", classpath, "-d"])
                .arg(&dir)
                .arg(source)
                .output()
                .expect("javac (scripts/test installs a JDK)"),
            &format!("javac {}", source.display()),
        );
        done.push(name.to_owned());
    }
    dir
}
