//! The `patchbook` binary: parse, set up logging, run, map errors to exit codes.
use clap::Parser;
use patchbook::cli::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    // `patchbook … | head -1`: a closed pipe ends the program quietly, as it does
    // every Unix filter, instead of a panic in the middle of a print.
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_tracing(&cli.global);
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = e.exit_code();
            let text = format!("error: {:#}", anyhow::Error::from(e));
            eprintln!("{}", patchbook::journal::scrub(&text));
            code
        }
    }
}

fn init_tracing(g: &cli::Global) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // A playbook's own `log()`/`print()` lines and `watch`'s run starts and ends are what
    // the operator asked to see: shown by default, hidden by `-q`.
    let level = match (g.quiet, g.verbose) {
        (true, _) => "error",
        (false, 0) => "warn,patchbook::log=info,patchbook::watch=info",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_env("PATCHBOOK_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Colour codes only for a person at a terminal: a pipe, a file or a log
    // collector gets plain text, and NO_COLOR (no-color.org) turns them off anywhere.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(cli::progress::ScrubbedStderr { colour });
    if g.json {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}
