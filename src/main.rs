use clap::{Parser, Subcommand};

use kiln::operator::OperatorArgs;
use kiln::telemetry::{self, LogFormat};

/// Kiln runs Clay data enrichment on Kubernetes.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "KILN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Run the controllers (with leader election), health and metrics.
    Operator(OperatorArgs),
    /// Run a table's worker: source → de-dupe → credits → Clay.
    Worker(kiln::dataplane::worker::WorkerArgs),
    /// Run a table's receiver: row ingest and Clay callbacks → sink.
    Receiver(kiln::dataplane::receiver::ReceiverArgs),
    /// Re-enqueue a table's stale rows (what a RefreshSchedule's CronJob runs).
    Refresh(kiln::dataplane::refresh::RefreshArgs),
    /// Inspect or replay a table's dead letters.
    Dlq(kiln::dataplane::dlq::DlqArgs),
    /// Check a namespace's Kiln resources: tier fit, callbacks, budgets,
    /// refresh, dead letters; exit 1 when something needs attention.
    Doctor(kiln::doctor::DoctorArgs),
    /// Run Kiln end to end on this machine: control plane, Redis, clay-sim, operator, data plane.
    Demo(kiln::devenv::demo::DemoArgs),
    /// Run a local stand-in for Clay (webhook sources, callbacks, routines API).
    ClaySim(kiln::clay::sim::SimArgs),
}

/// Expected failures (a missing program, an unreachable API server) end
/// with one line saying what went wrong, never a backtrace; long-running
/// processes say it in their structured log.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let structured = matches!(
        cli.command,
        Command::Operator(_)
            | Command::Worker(_)
            | Command::Receiver(_)
            | Command::Refresh(_)
            | Command::ClaySim(_)
    );
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if structured => {
            tracing::error!(error = %format!("{error:#}"), "exiting");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crds => {
            print!("{}", kiln::api::crds_yaml());
            Ok(())
        }
        Command::Operator(args) => {
            kiln::operator::memory::limit_arenas();
            let _telemetry = telemetry::init(cli.log_format, "kiln-operator");
            runtime()?.block_on(kiln::operator::run(args))
        }
        Command::Worker(args) => {
            let _telemetry = telemetry::init(cli.log_format, "kiln-worker");
            args.common.clone().run(kiln::dataplane::worker::run(args))
        }
        Command::Receiver(args) => {
            let _telemetry = telemetry::init(cli.log_format, "kiln-receiver");
            args.common
                .clone()
                .run(kiln::dataplane::receiver::run(args))
        }
        Command::Refresh(args) => {
            let mut spans = telemetry::init(cli.log_format, "kiln-refresh");
            let report = runtime()?.block_on(kiln::dataplane::refresh::run(args))?;
            if report.outcome == kiln::api::refresh::RefreshOutcome::SkippedForBudget {
                eprintln!("{}", report.message);
                spans.flush();
                std::process::exit(kiln::contract::EXIT_SKIPPED_FOR_BUDGET);
            }
            Ok(())
        }
        Command::Dlq(args) => runtime()?.block_on(kiln::dataplane::dlq::run(args)),
        Command::Doctor(args) => {
            if !runtime()?.block_on(kiln::doctor::run(args))? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Demo(args) => runtime()?.block_on(kiln::devenv::demo::run(args)),
        Command::ClaySim(args) => {
            let _telemetry = telemetry::init(cli.log_format, "kiln-clay-sim");
            runtime()?.block_on(kiln::clay::sim::run(args))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
