//! The `pymedic` binary: parses the command line and hands over to
//! [`pymedic::cli`]. Errors are printed with their causes and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = pymedic::cli::Cli::parse();
    pymedic::cli::init_logging(cli.verbose);
    if !matches!(cli.command, pymedic::cli::Command::Agent(_)) {
        pymedic::cli::die_quietly_on_closed_stdout();
    }
    match pymedic::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pymedic: error: {err:#}");
            ExitCode::from(pymedic::cli::exit_code(&err))
        }
    }
}
