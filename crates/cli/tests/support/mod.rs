//! Running the `medcoder` binary in tests.
#![allow(dead_code)] // each test binary uses a subset of these helpers

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use medcoder_assets::MedcoderHome;
use medcoder_icd::IcdSources;

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The home folder the tests' code sets live in (`$MEDCODER_HOME`, else `~/.cache/medcoder`),
/// or `None`, after a line on stderr saying why, when the ICD assets are not installed there.
pub fn icd_home() -> Option<MedcoderHome> {
    let home = match MedcoderHome::from_env() {
        Ok(home) => home,
        Err(error) => {
            eprintln!("skipping: no medcoder home ({error})");
            return None;
        }
    };
    if let Err(error) = IcdSources::from_home(&home) {
        eprintln!("skipping: ICD assets not installed: {error}");
        return None;
    }
    Some(home)
}

/// The medcoder home when the model asset `alias` is installed in it, else `None` (saying
/// why, for the test that skips).
pub fn home_with_model(alias: &str) -> Option<MedcoderHome> {
    let Ok(home) = MedcoderHome::from_env() else {
        eprintln!("skipping: no medcoder home");
        return None;
    };
    if let Err(error) = alias
        .parse::<medcoder_assets::ModelRef>()
        .and_then(|r| r.resolve(&home))
    {
        eprintln!("skipping: {alias} not installed ({error})");
        return None;
    }
    Some(home)
}

/// `medcoder ARGS` with `home` as its MEDCODER_HOME, fed `stdin` when given.
pub fn medcoder(home: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    medcoder_with_env(home, args, stdin, &[])
}

/// [`medcoder`] with extra environment variables.
pub fn medcoder_with_env(
    home: &Path,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_medcoder"));
    command
        .args(args)
        .envs(env.iter().copied())
        .env(MedcoderHome::ENV, home)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the medcoder binary");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin of medcoder");
        pipe.write_all(input.as_bytes()).expect("write to medcoder");
    }
    let output = child.wait_with_output().expect("wait for medcoder");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `medcoder ARGS` whose reader stops after the first line of stdout, as `| head -1` does;
/// `stdout` is that line.
pub fn first_line_then_hang_up(home: &MedcoderHome, args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medcoder"))
        .args(args)
        .env(MedcoderHome::ENV, home.root())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the medcoder binary");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout of medcoder"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("read from medcoder");
    drop(reader);
    let output = child.wait_with_output().expect("wait for medcoder");
    Run {
        code: output.status.code(),
        stdout: first,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `medcoder ARGS` against the installed code sets.
pub fn icd(home: &MedcoderHome, args: &[&str]) -> Run {
    medcoder(home.root(), args, None)
}

/// Parse stdout as JSON, saying what the binary printed when it is not.
/// The run exited 0; otherwise fail showing its output.
pub fn assert_ok(run: &Run) {
    assert_eq!(
        run.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

pub fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}):\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        )
    })
}

/// `medcoder ARGS` started in the background (stdout and stderr discarded), to be killed.
pub fn spawn_medcoder(home: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_medcoder"))
        .args(args)
        .env(MedcoderHome::ENV, home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the medcoder binary")
}
