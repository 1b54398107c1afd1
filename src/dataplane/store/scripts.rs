//! The store's Lua scripts (in `lua/`), each built and hashed once: they run
//! for every row. A line `--#include <part>` splices in a shared part: the
//! source guard of scripts that make a row pending or terminal, the sink
//! append of scripts that deliver, and the return of expired refresh claims
//! of scripts that read the stale index.

use std::sync::LazyLock;

use redis::Script;

const SOURCE_GUARD: &str = include_str!("lua/source_guard.lua");
const RETURN_EXPIRED_REFRESHES: &str = include_str!("lua/return_expired_refreshes.lua");
const SINK_APPEND: &str = include_str!("lua/sink_append.lua");

/// `source` with its shared parts spliced in.
fn expand(source: &str) -> String {
    source
        .replace("--#include source_guard\n", SOURCE_GUARD)
        .replace(
            "--#include return_expired_refreshes\n",
            RETURN_EXPIRED_REFRESHES,
        )
        .replace("--#include sink_append\n", SINK_APPEND)
}

fn build(source: &str) -> Script {
    Script::new(&expand(source))
}

macro_rules! scripts {
    ($($name:ident = $file:literal;)*) => {
        $(pub static $name: LazyLock<Script> = LazyLock::new(|| build(include_str!($file)));)*

        #[cfg(test)]
        const SOURCES: &[(&str, &str)] = &[$(($file, include_str!($file))),*];
    };
}

scripts! {
    MAKE_PENDING = "lua/make_pending.lua";
    CLAIM_CALLBACK = "lua/claim_callback.lua";
    DELIVER_STORED = "lua/deliver_stored.lua";
    OUTBOX_DELIVERED = "lua/outbox_delivered.lua";
    OUTBOX_DEAD_LETTER = "lua/outbox_dead_letter.lua";
    DEAD_LETTER_ENTRY = "lua/dead_letter_entry.lua";
    DEAD_LETTER_PENDING = "lua/dead_letter_pending.lua";
    TAKE_EXPIRED = "lua/take_expired.lua";
    REPLACE_PENDING = "lua/replace_pending.lua";
    REPLAY = "lua/replay.lua";
    COUNT_STALE = "lua/count_stale.lua";
    CLAIM_STALE = "lua/claim_stale.lua";
    TRY_ADD = "lua/try_add.lua";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_include_is_spliced_in() {
        for (file, source) in SOURCES {
            let built = expand(source);
            assert!(!built.contains("--#include"), "{file}: {built}");
            let uses_guard = built
                .lines()
                .any(|line| line.contains("first_sight(") || line.trim_start().starts_with("ack("));
            assert_eq!(
                uses_guard,
                built.contains("local function first_sight"),
                "{file} uses the source guard only with it spliced in"
            );
        }
    }
}
