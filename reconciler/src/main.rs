//! The `fleet` binary: parse arguments, set up logging, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // The daemon's own child that checks a guest's results bundle under limits
    // (`tasks::results::check_isolated`); not a command for people.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__check-bundle")
    {
        return fleet::tasks::results::check_bundle_command();
    }
    // git's credential helper while fleet fetches a task repository over https.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__credential")
    {
        return fleet::tasks::remote::credential_helper_command();
    }
    // A shell asking for completion candidates (`fleet completion`'s script).
    fleet::completion::answer_shell();
    let cli = fleet::cli::Cli::parse();
    fleet::cli::init_logging(&cli);
    fleet::cli::run(cli)
}
