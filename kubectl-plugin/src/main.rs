//! `kubectl-inference`: the kubectl plugin of rm-abstract. Wiring only:
//! parse the command line, connect, run the subcommand, map the outcome to
//! an exit code (0 ok, 1 error, 2 usage).

mod cache;
mod cli;
mod connect;
mod devices;
mod error;
mod explain;
mod output;
mod status;
mod table;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;

use crate::cli::{Cli, Command};
use crate::error::Result;
use crate::table::Paint;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap prints help and usage errors itself and exits 0 or 2.
    let cli = Cli::parse();
    let paint = Paint::detect(
        std::io::stdout().is_terminal(),
        std::env::var("NO_COLOR").ok().as_deref(),
    );
    match run(cli, paint).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let err_paint = Paint::detect(
                std::io::stderr().is_terminal(),
                std::env::var("NO_COLOR").ok().as_deref(),
            );
            eprintln!("{} {e}", err_paint.paint(crate::table::Tone::Bad, "error:"));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli, paint: Paint) -> Result<()> {
    let conn = connect::connect(&cli.global).await?;
    match &cli.command {
        Command::Status(args) => status::run(conn.client, &conn.scope, args, paint).await,
        Command::Devices(args) => devices::run(conn.client, args, paint).await,
        Command::Explain(args) => explain::run(conn.client, &conn.scope, args, paint).await,
        Command::Cache(args) => cache::run(&conn, args, paint).await,
    }
}
