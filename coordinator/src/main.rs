//! `rekey`, the operator CLI. Parses arguments, sets up logging and hands over to
//! [`rekey_coordinator::commands::run`]; everything else is library code that tests drive.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes away, as
    // other command-line tools do, instead of panicking on the broken pipe.
    sigpipe::reset();
    let cli = rekey_coordinator::cli::Cli::parse();
    // Every command that takes `--json` writes its result to stdout as JSON; so does its
    // failure: `{"error": {"message": "…"}}` on stdout (and the usual line on stderr).
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let telemetry = rekey_common::telemetry::init_for(cli.log_format, "rekey");
    rekey_common::failpoint::setup();
    let code = match rekey_coordinator::commands::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            // The one place a command's error is reported: its causes, each said once.
            let text = rekey_common::report_error::error_text(&err);
            eprintln!("error: {text}");
            if json {
                println!("{}", serde_json::json!({ "error": { "message": text } }));
            }
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
