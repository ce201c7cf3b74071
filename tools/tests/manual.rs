//! `nyx completions SHELL` and `nyx man` on the real command line: every
//! shell's script and the man page name the subcommands and their options,
//! and `nyx man --out-dir` writes one page per subcommand.

use std::process::Command;

fn nyx(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nyx"))
        .args(args)
        .output()
        .expect("run nyx");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SUBCOMMANDS: &[&str] = &[
    "run", "record", "replay", "trace", "restore", "ctl", "report", "check", "demo",
];

#[test]
fn completions_name_the_subcommands_in_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = nyx(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        for sub in SUBCOMMANDS {
            assert!(out.contains(sub), "{shell}: no {sub} in the script");
        }
        assert!(out.contains("gdb-wait"), "{shell}: options are completed too");
    }
}

#[test]
fn an_unknown_shell_is_refused_with_the_known_ones() {
    let (code, _, err) = nyx(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bash") && err.contains("zsh") && err.contains("fish"),
        "{err}"
    );
}

#[test]
fn man_page_names_the_subcommands() {
    let (code, out, err) = nyx(&["man"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(".TH"), "a roff page: {out}");
    for sub in SUBCOMMANDS {
        assert!(out.contains(sub), "no {sub} in the man page");
    }
}

#[test]
fn man_out_dir_writes_a_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = nyx(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    for page in ["nyx.1", "nyx-record.1", "nyx-trace-dump.1", "nyx-check.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let record = std::fs::read_to_string(dir.path().join("nyx-record.1")).unwrap();
    assert!(record.contains("landings"), "the record page lists its options");
}
