//! What every HTTP listener Kiln runs shares (receiver, lease API,
//! health/metrics, clay-sim): slow clients are timed out, connections are
//! capped, and shutdown stops accepting, lets in-flight requests finish up
//! to a deadline, then returns. Also the one Bearer-token reader.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, header};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// A client must send a request's headers within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and its body within this.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for in-flight requests (under the pods'
/// 30 s termination grace period).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(listener, app, None, shutdown).await
}

/// [`serve`] over TLS, each new connection with the latest configuration
/// `tls` holds (so a re-issued certificate applies without a restart). The
/// handshake must finish within the header-read timeout.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(listener, app, Some(tls), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let app = app.layer(RequestBodyTimeoutLayer::new(BODY_READ_TIMEOUT));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause, don't spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "connection limit reached; closing a new connection"
            );
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let http = || {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
        };
        // A client hanging up mid-request (or mid-handshake) is its business.
        match &tls {
            None => {
                let connection =
                    graceful.watch(http().serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream));
                    if let Ok(Ok(stream)) = handshake.await {
                        let _ = watcher
                            .watch(http().serve_connection(TokioIo::new(stream), service))
                            .await;
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_DEADLINE) => {
            tracing::warn!(deadline = ?SHUTDOWN_DEADLINE, "requests still in flight at the shutdown deadline; closing them");
        }
    }
    Ok(())
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive); None when absent, another scheme, or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_not_empty() {
        assert_eq!(bearer_token(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("BEARER  abc ")), Some("abc"));
        assert_eq!(bearer_token(&with("Bearer ")), None);
        assert_eq!(bearer_token(&with("Bearer    ")), None);
        assert_eq!(bearer_token(&with("Basic abc")), None);
        assert_eq!(bearer_token(&with("Bearerabc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
