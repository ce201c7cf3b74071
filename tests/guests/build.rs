//! Assembles every `*.S` test guest of this crate (through the C compiler, so
//! that the C preprocessor runs and `common.h` can be included) and links each
//! one with `ld` and `link.ld` into a Multiboot v1 ELF32 (i386) image with
//! debug information, written to `OUT_DIR/NAME.elf`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// Why the guests could not be built.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    /// A Cargo-provided environment variable is missing.
    #[error("environment variable {0} is not set; build this crate with cargo")]
    Env(&'static str),
    /// A binutils tool is not installed.
    #[error(
        "`{tool}` (GNU binutils) is needed to build the Nyx test guests but could not be run: \
         {source}; install binutils (for example `apt-get install binutils`)"
    )]
    MissingTool { tool: String, source: std::io::Error },
    /// The guest directory could not be listed.
    #[error("cannot list the guest sources in {dir}: {source}")]
    ListSources { dir: PathBuf, source: std::io::Error },
    /// A command ran but failed.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
}

fn main() {
    if let Err(e) = build() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), BuildError> {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|_| BuildError::Env("CARGO_MANIFEST_DIR"))?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|_| BuildError::Env("OUT_DIR"))?);
    let linker = env::var("NYX_GUEST_LD").unwrap_or_else(|_| "ld".to_string());
    check_tool("as")?;
    check_tool(&linker)?;
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let script = dir.join("link.ld");

    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed={}", dir.join("common.h").display());
    println!("cargo:rerun-if-env-changed=NYX_GUEST_LD");

    for source in sources(&dir)? {
        println!("cargo:rerun-if-changed={}", source.display());
        let Some(name) = source.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let object = out.join(format!("{name}.o"));
        let image = out.join(format!("{name}.elf"));
        let mut assemble = Command::new(compiler.path());
        assemble
            .args(["-m32", "-c", "-g", "-nostdinc", "-Wa,--noexecstack"])
            .arg("-I")
            .arg(&dir)
            .arg("-o")
            .arg(&object)
            .arg(&source);
        run(&mut assemble)?;
        let mut link = Command::new(&linker);
        link.args(["-m", "elf_i386", "-nostdlib", "--build-id=none"])
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&image)
            .arg(&object);
        run(&mut link)?;
    }
    Ok(())
}

/// The `*.S` files of `dir`, sorted by name.
fn sources(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let list = |source| BuildError::ListSources {
        dir: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(list)? {
        let path = entry.map_err(list)?.path();
        if path.extension().is_some_and(|e| e == "S") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn check_tool(tool: &str) -> Result<(), BuildError> {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|_| ())
        .map_err(|source| BuildError::MissingTool {
            tool: tool.to_string(),
            source,
        })
}

fn run(command: &mut Command) -> Result<(), BuildError> {
    let text = format!("{command:?}");
    let output = command.output().map_err(|source| BuildError::Spawn {
        command: text.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(BuildError::Command {
            command: text,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
