//! `handoffctl` run as a process: its streams as text and the exit-code contract (a failure
//! says why in exactly one line on stderr). Also included by tests/handoffctl.rs on its own.
#![allow(dead_code)]

use std::process::Output;

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code `code` and, for failures, exactly one `handoffctl: ` line on stderr (returned).
#[track_caller]
pub fn expect(o: &Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    if code != 0 {
        assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
        assert!(err.starts_with("handoffctl: "), "{err}");
    }
    err
}
