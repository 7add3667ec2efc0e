//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs bitlora with its files limited to `kib` KiB (RLIMIT_FSIZE, bash's `ulimit -f`) and
/// SIGXFSZ ignored: a write past the limit fails with EFBIG, as a full disk fails with ENOSPC,
/// through the same write calls.
#[cfg(target_os = "linux")]
pub fn bitlora_with_file_limit<S: AsRef<std::ffi::OsStr>>(kib: u64, args: &[S]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_bitlora"))
        .args(args)
        .output()
        .expect("run bash")
}

/// Every file in `dir` with its bytes.
#[cfg(target_os = "linux")]
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// `o` failed on a write, and says so: "cannot write" with the reason, not "cannot read".
/// Prints `what` with the error.
#[cfg(target_os = "linux")]
pub fn assert_write_failed(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{what}: exit {:?}: {}", o.status.code(), err.trim());
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("File too large"),
        "{err}"
    );
    assert!(!err.contains("cannot read"), "{err}");
}
