//! The shared libraries a dynamically linked program needs, so that a `process` workload can be
//! copied into a guest image with everything it loads.
//!
//! Resolution runs the host's `ldd` (the dynamic loader's own answer, including its search path
//! and `RUNPATH`s) and parses its output with [`parse_ldd`], which is pure and tested on captured
//! output. A library `ldd` cannot find is an error naming it: a guest that fails at its first
//! `exec` is worse than a start that fails with a clear reason.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DepsError {
    #[error("{program}: shared library {library} is not found on this host")]
    Missing { program: String, library: String },
    #[error("cannot run ldd on {program}: {reason}")]
    Ldd { program: String, reason: String },
    #[error("unexpected ldd output for {program}: {line:?}")]
    Unparsable { program: String, line: String },
}

/// The absolute paths of the files the loader maps for a program (the loader itself included),
/// from `ldd`'s output. An empty list for a static program.
pub fn parse_ldd(program: &str, output: &str) -> Result<Vec<PathBuf>, DepsError> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in output.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line == "statically linked" || line == "not a dynamic executable" {
            continue;
        }
        let (name, rest) = match line.split_once(" => ") {
            Some((name, rest)) => (name.trim(), rest.trim()),
            None => ("", line),
        };
        if rest.starts_with("not found") {
            return Err(DepsError::Missing { program: program.to_owned(), library: name.to_owned() });
        }
        // `path (0xADDRESS)`, or just `name (0xADDRESS)` for the vDSO, which has no file.
        let path = rest.rsplit_once(" (0x").map_or(rest, |(path, _)| path).trim();
        if path.is_empty() {
            continue;
        }
        if !path.starts_with('/') {
            if name.is_empty() && (path.starts_with("linux-vdso") || path.starts_with("linux-gate")) {
                continue;
            }
            return Err(DepsError::Unparsable { program: program.to_owned(), line: line.to_owned() });
        }
        let path = PathBuf::from(path);
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    Ok(paths)
}

/// Runs `ldd` on `program` and answers the libraries it needs (see [`parse_ldd`]).
pub async fn resolve(program: &Path) -> Result<Vec<PathBuf>, DepsError> {
    let name = program.display().to_string();
    let output = tokio::process::Command::new("ldd")
        .arg(program)
        .env_clear()
        .env("LC_ALL", "C")
        .output()
        .await
        .map_err(|error| DepsError::Ldd { program: name.clone(), reason: error.to_string() })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // `ldd` exits 1 for a static program and says so on either stream.
    if !output.status.success() {
        let said = format!("{stdout}{stderr}");
        if said.contains("not a dynamic executable") || said.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(DepsError::Ldd { program: name, reason: said.trim().to_owned() });
    }
    parse_ldd(&name, &stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL: &str = "\tlinux-vdso.so.1 (0x00007ffc5a1e5000)
\tlibcurl.so.4 => /lib/x86_64-linux-gnu/libcurl.so.4 (0x00007f0b8c4f0000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f0b8c4d0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b8c2ef000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f0b8c4d0000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0b8c5d2000)
";

    #[test]
    fn captured_output_gives_every_file_once_without_the_vdso() {
        let paths = parse_ldd("/usr/bin/curl", CURL).unwrap();
        let paths: Vec<&str> = paths.iter().map(|path| path.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libcurl.so.4",
                "/lib/x86_64-linux-gnu/libz.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn static_programs_need_nothing() {
        assert_eq!(parse_ldd("/bin/busybox", "\tnot a dynamic executable\n").unwrap(), Vec::<PathBuf>::new());
        assert_eq!(parse_ldd("/bin/x", "\tstatically linked\n").unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_missing_library_is_named() {
        let output = "\tlinux-vdso.so.1 (0x00007ffc5a1e5000)\n\tlibgone.so.3 => not found\n";
        assert_eq!(
            parse_ldd("/opt/app", output),
            Err(DepsError::Missing { program: "/opt/app".into(), library: "libgone.so.3".into() })
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse_ldd("/opt/app", "\tsomething odd\n"), Err(DepsError::Unparsable { .. })));
    }

    #[tokio::test]
    async fn the_hosts_ldd_resolves_a_real_dynamic_program() {
        // `ldd` is part of libc-bin on every Debian system the tests run on.
        let paths = resolve(Path::new("/bin/ls")).await.unwrap();
        assert!(paths.iter().any(|path| path.to_string_lossy().contains("libc.so")), "{paths:?}");
        assert!(paths.iter().all(|path| path.is_absolute() && path.exists()), "{paths:?}");
    }
}
