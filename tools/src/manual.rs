//! `nyx completions SHELL` and `nyx man`: shell completion scripts and
//! roff man pages generated from the clap definitions of the command line,
//! so that they can never disagree with what `nyx` accepts.

use std::io::Write;
use std::path::Path;

use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    // Generated into memory first: the generator panics on a failed write
    // (a closed pipe), and nyx must not.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes the man page of `cmd` (section 1) to `out`.
pub fn man(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd).render(out)?;
    out.flush()
}

/// Success for an output error that only means the reader went away early
/// (`nyx man | head`): it had all it wanted.
pub fn quiet_on_closed_pipe(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Writes `nyx.1` and one page per subcommand (`nyx-record.1`,
/// `nyx-trace-dump.1`, ...) into `dir`; returns how many pages it wrote.
pub fn man_pages(mut cmd: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    // Building names every subcommand for its page (display name
    // `nyx-trace-dump`, usage `nyx trace dump`).
    cmd.build();
    write_pages(&cmd, dir)
}

fn write_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<usize> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut file = std::fs::File::create(dir.join(man.get_filename()))?;
    man.render(&mut file)?;
    let mut n = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += write_pages(sub, dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> clap::Command {
        clap::Command::new("nyx")
            .about("a test")
            .subcommand(clap::Command::new("record").arg(clap::Arg::new("out").long("out")))
            .subcommand(
                clap::Command::new("trace")
                    .subcommand(clap::Command::new("info"))
                    .subcommand(clap::Command::new("dump")),
            )
    }

    #[test]
    fn completions_name_every_subcommand_in_each_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(cmd(), shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            for word in ["record", "trace", "dump", "out"] {
                assert!(text.contains(word), "{shell}: no {word} in\n{text}");
            }
        }
    }

    #[test]
    fn man_page_lists_the_subcommands() {
        let mut out = Vec::new();
        man(cmd(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
        assert!(text.contains("record") && text.contains("trace"), "{text}");
    }

    #[test]
    fn a_closed_pipe_is_not_an_error() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(quiet_on_closed_pipe(completions(cmd(), Shell::Bash, &mut Closed)).is_ok());
        assert!(quiet_on_closed_pipe(man(cmd(), &mut Closed)).is_ok());
        let other = Err(std::io::ErrorKind::PermissionDenied.into());
        assert!(quiet_on_closed_pipe(other).is_err());
    }

    #[test]
    fn one_page_per_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let n = man_pages(cmd(), dir.path()).unwrap();
        assert_eq!(n, 5, "nyx, record, trace, trace info, trace dump");
        let dump = std::fs::read_to_string(dir.path().join("nyx-trace-dump.1")).unwrap();
        assert!(
            dump.contains("nyx\\-trace\\-dump") || dump.contains("nyx-trace-dump"),
            "{dump}"
        );
    }
}
