//! Staying small at rest. After a burst (a thousand tables provisioned, a
//! relist) the operator's live data is a fraction of what it allocated, but
//! glibc keeps freed pages mapped; and kube's event recorder keeps every
//! event it published until it publishes again. Both are let go here, on a
//! timer, so resident memory follows the live caches.

use std::sync::Arc;
use std::time::Duration;

use super::context::Context;

/// How often freed memory is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// How long the event recorder remembers events (kube counts a repeat
/// within 6 minutes as a series of the first).
const FORGET_EVENTS_EVERY: Duration = Duration::from_secs(6 * 60);

/// Runs until `shutdown` resolves.
pub async fn keep_small(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    let mut forget = tokio::time::interval(FORGET_EVENTS_EVERY);
    // Both fire at once first; nothing is worth freeing yet.
    trim.tick().await;
    forget.tick().await;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = trim.tick() => release_freed_memory(),
            _ = forget.tick() => ctx.forget_recent_events(),
        }
    }
}

/// Caps glibc's malloc arenas at two. By default threads get arenas of
/// their own (up to eight per core), each keeping its own free pages and
/// fragments; the operator is not bound by allocation speed. Called before
/// the runtime starts its threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no thread other than
    // the caller exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns free pages of every malloc arena to the system (glibc keeps
/// them mapped otherwise; its own trimming only reaches the top of the main
/// heap).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes the arenas' locks like any malloc call.
    unsafe {
        libc::malloc_trim(0);
    }
}
