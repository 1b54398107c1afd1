//! The connection every store command goes through: it counts failures by
//! kind and records whether Redis answered, so a store only the pods cannot
//! reach shows in the table's RedisReachable condition.

use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

use crate::contact::{self, Peer};
use crate::metrics::dataplane;

#[derive(Clone)]
pub struct WatchedConnection {
    inner: ConnectionManager,
    /// `host:port` of the store (never its password), for reports.
    host: Arc<str>,
}

impl WatchedConnection {
    pub fn new(inner: ConnectionManager, url: &str) -> Self {
        Self {
            inner,
            host: contact::host_of(url, "Redis").into(),
        }
    }

    /// Another connection to the same store.
    pub fn to_the_same_store(&self, inner: ConnectionManager) -> Self {
        Self {
            inner,
            host: self.host.clone(),
        }
    }

    fn record<T>(&self, outcome: &RedisResult<T>) {
        match outcome {
            Ok(_) => contact::answered(Peer::Store),
            Err(error) => {
                let Some(kind) = failure_kind(error) else {
                    return;
                };
                dataplane().store_error(kind);
                if kind != "reply" {
                    contact::unreachable(Peer::Store, &self.host, &error.to_string());
                } else {
                    contact::answered(Peer::Store);
                }
            }
        }
    }
}

/// What kind of failure an error is, for the error counter (None: not a
/// failure, e.g. a script the server has not cached yet, which is sent again).
fn failure_kind(error: &RedisError) -> Option<&'static str> {
    Some(match error.kind() {
        ErrorKind::Server(ServerErrorKind::NoScript) => return None,
        ErrorKind::AuthenticationFailed => "auth",
        _ if error.is_timeout() => "timeout",
        _ if error.is_connection_refusal()
            || error.is_connection_dropped()
            || error.is_io_error() =>
        {
            "connection"
        }
        // Redis answered, with an error.
        _ => "reply",
    })
}

impl ConnectionLike for WatchedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let outcome = self.inner.req_packed_command(cmd).await;
            self.record(&outcome);
            outcome
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let outcome = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.record(&outcome);
            outcome
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_apart_from_answers() {
        let refused: RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert_eq!(failure_kind(&refused), Some("connection"));
        let timeout: RedisError = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow").into();
        assert_eq!(failure_kind(&timeout), Some("timeout"));
        let auth: RedisError = (ErrorKind::AuthenticationFailed, "bad password").into();
        assert_eq!(failure_kind(&auth), Some("auth"));
        let reply: RedisError = (ErrorKind::UnexpectedReturnType, "not a number").into();
        assert_eq!(failure_kind(&reply), Some("reply"));
    }
}
