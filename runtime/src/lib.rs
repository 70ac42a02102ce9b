//! Process plumbing every rm-abstract binary shares, so that they all log and
//! stop the same way: `RM_LOG` / `RM_LOG_FORMAT=json` and SIGTERM/SIGINT.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable holding the log filter (same syntax as `RUST_LOG`).
pub const LOG_FILTER_ENV: &str = "RM_LOG";
/// Environment variable selecting the log format: `json` or text (default).
pub const LOG_FORMAT_ENV: &str = "RM_LOG_FORMAT";

/// Installs the global tracing subscriber, writing to stderr. `default_filter` applies when
/// `RM_LOG` is unset, e.g. `"info,kube=warn"`. A malformed `RM_LOG` is
/// reported on stderr and the default is used instead of failing start-up.
pub fn init_logging(default_filter: &str) {
    let filter = match std::env::var(LOG_FILTER_ENV) {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!(
                "{LOG_FILTER_ENV}={spec:?} is not a valid filter ({e}); using {default_filter:?}"
            );
            EnvFilter::new(default_filter)
        }),
        Err(_) => EnvFilter::new(default_filter),
    };
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    // try_init: tests may install a subscriber more than once.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(true)
                    // Colour only for a person at a terminal, not in files
                    // and pipes (kubectl logs, CI).
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
}

/// Resolves when the process is asked to stop (SIGTERM or SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        _ = term => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// Parses the agent socket's group, as `rm-agent --socket-group` and the
/// webhook's `--webhook-agent-socket-group` both take it (the two must name
/// the same GID). 0 is refused: root's group is what the socket has anyway,
/// and handing it to every injected pod would widen what its processes may
/// open; leaving the flag unset is the way to say "none".
pub fn parse_socket_group(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("0 (root) is not a socket group; leave the flag unset instead".into()),
        Ok(g) => Ok(g),
        Err(_) => Err(format!("{s:?} is not a group id (1 to 4294967295)")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_socket_group;

    #[test]
    fn socket_group_is_a_nonzero_gid() {
        assert_eq!(parse_socket_group(" 2026 "), Ok(2026));
        assert_eq!(parse_socket_group("4294967295"), Ok(u32::MAX));
        for bad in ["0", "-1", "staff", "4294967296", ""] {
            assert!(parse_socket_group(bad).is_err(), "{bad:?}");
        }
    }
}
