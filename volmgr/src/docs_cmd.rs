//! `volmgr completions SHELL` and `volmgr manpages DIR`: generated from the command definition,
//! so they never disagree with `--help`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManpagesArgs {
    /// Directory to write volmgr.8 and one page per subcommand into (created if needed).
    dir: PathBuf,
}

/// Prints the completion script for a shell.
pub fn completions(a: CompletionsArgs) -> Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "volmgr", &mut std::io::stdout());
    Ok(())
}

/// Writes `volmgr.8`, `volmgr-dev.8`, `volmgr-dev-create.8`, ... into a directory.
pub fn manpages(a: ManpagesArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let cmd = crate::Cli::command().name("volmgr");
    let n = write_pages(&cmd, "volmgr", &a.dir)?;
    println!("{n} manual pages in {}", a.dir.display());
    Ok(())
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = dir.join(format!("{name}.8"));
    let cmd = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut out)
        .with_context(|| format!("rendering {name}"))?;
    std::fs::write(&page, out).with_context(|| format!("writing {}", page.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        n += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
