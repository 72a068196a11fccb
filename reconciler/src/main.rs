//! The `fleet` binary: parse arguments, set up logging, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = fleet::cli::Cli::parse();
    fleet::cli::init_logging(&cli);
    fleet::cli::run(cli)
}
