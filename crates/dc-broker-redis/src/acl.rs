//! Least-privilege access to the head node's redis-server: the `user` lines of its redis.conf.
//!
//! Three users: `default` is switched off (a connection that does not authenticate as a named
//! user can run nothing); a node/pool user runs exactly the commands of the protocol
//! ([`NODE_COMMANDS`]), on keys under `<prefix>:` only, and no pub/sub channel; an admin user
//! may do everything and is meant for the head's own supervision only. Passwords are written
//! as SHA-256 hashes, so the file holds no clear secret.
//!
//! Every key the broker, its Lua scripts and `dc-cli bench` touch is `<prefix>:…`.
//!
//! # Examples
//! ```
//! use dc_broker_redis::acl::render_acl;
//!
//! let lines = render_acl("dc-node", "node-secret", "dc-admin", "admin-secret", "dc")?;
//! assert!(lines.starts_with("user default off"));
//! assert!(lines.contains("user dc-node on #"));
//! assert!(lines.contains(" ~dc:* "));
//! assert!(!lines.contains("node-secret"));
//! # Ok::<(), dc_broker_redis::acl::AclError>(())
//! ```

use sha2::{Digest, Sha256};

/// Commands (and subcommands, as `client|setname`) a node or pool runs: the whole protocol.
///
/// Each group below says what uses it: the redis crate's connection set-up, `RedisBroker`'s own
/// commands (`broker/`, `conn.rs`), the `redis.call`/`redis.pcall` of the Lua scripts
/// (`lua/*.lua`; a script runs with its caller's permissions, command by command and key by
/// key), and the raw Redis baselines of `dc-cli bench`.
pub const NODE_COMMANDS: &[&str] = &[
    // Connection set-up by the redis crate: `AUTH <user> <password>`, or `HELLO 3 AUTH …` when
    // the URL asks for RESP3. Redis lets every user run both; listed so that this list is the
    // whole protocol. (The crate's `CLIENT SETINFO` is left out: Redis 7.0 knows no such
    // subcommand, so a rule naming it would stop the server from starting, and the crate
    // ignores its answer.)
    "auth",
    "hello",
    // `RedisBroker::connect` checks the server with PING; `dc-cli bench` measures its round
    // trip.
    "ping",
    // A node's presence connection names itself (`heartbeat`); the reaper lists the named
    // connections to tell which nodes' processes are gone (`reap_expired`).
    "client|setname",
    "client|list",
    // Every script runs by EVALSHA; the redis crate loads it with SCRIPT LOAD when the server
    // answers NOSCRIPT (first use, or after a restart).
    "evalsha",
    "script|load",
    // Session ids (`try_open_session`).
    "incr",
    // Deleting what is left of a closed or dead session (`close_session`, `reap_expired`, a
    // node's periodic purge): SCAN MATCH <session keys>, then UNLINK. UNLINK also drops a read
    // result's chunks, a spec staged for a session that could not open and, in the scripts,
    // replaced or finished keys; `dc-cli bench` removes its keys the same way.
    "scan",
    "unlink",
    // `leave` (with ZREM) drops a node's status; the scripts drop the active pointer
    // (`close_session`, `keep_alive`); `dc-cli bench` drops its baseline keys.
    "del",
    // Scripts: checking a key before using it (`session_error`, `repair`, `submit`, `renew`,
    // `pending`, `lost`, `last_id`).
    "exists",
    "type",
    // Scripts: a staged payload becomes a job input, a result or an update body (`submit`,
    // `complete`, `publish_update`) and stops expiring.
    "rename",
    "persist",
    // Staging a payload by chunks puts a 24 h TTL on its hash (client); the scripts set the
    // TTLs of the active pointer and of a session's keys (`open_session`, `keep_alive`,
    // `publish_update`).
    "pexpire",
    // Scripts: the server's clock for heartbeats, node lists and stats.
    "time",
    // Scripts: the active-session pointer (`open_session` SET NX PX; `active`, `close_session`,
    // `keep_alive`, `sessions`) and node statuses (`heartbeat`, `nodes`, `stats`).
    // `dc-cli bench`: its 64 MiB SET/GET baseline.
    "get",
    "set",
    // Hashes: session meta, job records and payload chunks. The client stages big payloads
    // with HSET (pipelined with PEXPIRE) and fetches them with HGET; the scripts read and
    // update records (HMGET, HGET, HSET, HDEL, HINCRBY for counters) and check a session's
    // spec (`keep_alive`: HLEN, HSTRLEN).
    "hset",
    "hget",
    "hmget",
    "hdel",
    "hincrby",
    "hlen",
    "hstrlen",
    // Scripts: a job's attempt history (RPUSH, LRANGE) and a session's problems, deduplicated
    // by a set (`report_problem`: SADD, RPUSH; `stats`: LRANGE).
    "rpush",
    "lrange",
    "sadd",
    // Sorted sets: the session registry (`open_session` ZADD, `close_session` ZREM, `sessions`
    // ZRANGE) and the node registry (`heartbeat` ZADD and ZREMRANGEBYSCORE, `nodes` and
    // `stats` ZRANGEBYSCORE, `leave` ZREM from the client).
    "zadd",
    "zrem",
    "zrange",
    "zrangebyscore",
    "zremrangebyscore",
    // Streams: the job stream and its consumer group (`open_session` XGROUP CREATE, `take`
    // XREADGROUP, `renew` XPENDING + XCLAIM, `pending`/`end_attempt` XPENDING, XACK and XDEL
    // when an attempt ends, `lost` XRANGE), the results stream (XADD by the scripts and, to
    // put a notice back, by the client; XRANGE + XDEL by `take_results`), the update log
    // (XADD, XLEN, XRANGE) and the "opened" stream (`open_session` XADD; `last_id`: XINFO
    // STREAM). The client waits on streams with XREAD BLOCK (`take_jobs`, `take_results`,
    // `active_session`). `dc-cli bench` runs the bare stream cycle: XGROUP CREATE, XADD,
    // XREADGROUP BLOCK, XACK, XREAD BLOCK.
    "xadd",
    "xack",
    "xclaim",
    "xdel",
    "xlen",
    "xrange",
    "xread",
    "xreadgroup",
    "xpending",
    "xgroup|create",
    "xinfo|stream",
];

/// Commands that must never be allowed to a node/pool user (checked by the tests).
///
/// Server administration, persistence and replication, anything that reads the whole keyspace
/// or other clients' traffic, wipes or moves data, stops or stalls the server, or kills other
/// connections.
pub const DENIED_COMMANDS: &[&str] = &[
    "config",
    "acl",
    "monitor",
    "flushall",
    "flushdb",
    "shutdown",
    "replicaof",
    "slaveof",
    "debug",
    "module",
    "keys",
    "script|flush",
    "script|kill",
    "client|kill",
    "client|pause",
    "client|no-evict",
    "sync",
    "psync",
    "save",
    "bgsave",
    "bgrewriteaof",
    "failover",
    "cluster",
    "migrate",
    "restore",
    "swapdb",
    "function",
    "slowlog",
    "latency",
];

/// A value [`render_acl`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AclError {
    /// A user name or the key prefix is not `[A-Za-z0-9_-]+` (it goes into redis.conf
    /// unquoted).
    #[error("{what} {value:?} is not allowed: use letters, digits, '-' and '_' only")]
    InvalidName {
        /// What it is: "node user name", "admin user name" or "key prefix".
        what: &'static str,
        /// The value, as given.
        value: String,
    },
    /// A user name is `default`, which is switched off.
    #[error("the user name \"default\" is reserved (that user is switched off): choose another")]
    DefaultUser,
    /// The node user and the admin user have the same name.
    #[error("the node user and the admin user must differ (both are {0:?})")]
    SameUser(String),
    /// A password is empty.
    #[error("the password of user {0:?} is empty")]
    EmptySecret(String),
}

/// redis.conf lines: `user default off`, the node user, the admin user. Passwords are given
/// as SHA-256 hashes (`#<hex>`) so no clear secret is written and no value can break the line.
///
/// The node user may run [`NODE_COMMANDS`] only, on keys matching `<prefix>:*` only, and no
/// pub/sub channel; the admin user may run everything. Each line ends with a newline.
///
/// # Errors
/// [`AclError`] for a user name or prefix that is not `[A-Za-z0-9_-]+`, a user named
/// `default`, the same name twice, or an empty password.
pub fn render_acl(
    node_user: &str,
    node_secret: &str,
    admin_user: &str,
    admin_secret: &str,
    prefix: &str,
) -> Result<String, AclError> {
    check_name("node user name", node_user)?;
    check_name("admin user name", admin_user)?;
    check_name("key prefix", prefix)?;
    if node_user == "default" || admin_user == "default" {
        return Err(AclError::DefaultUser);
    }
    if node_user == admin_user {
        return Err(AclError::SameUser(node_user.to_string()));
    }
    for (user, secret) in [(node_user, node_secret), (admin_user, admin_secret)] {
        if secret.is_empty() {
            return Err(AclError::EmptySecret(user.to_string()));
        }
    }
    let commands: String = NODE_COMMANDS.iter().map(|c| format!(" +{c}")).collect();
    Ok(format!(
        "user default off resetpass resetkeys resetchannels -@all\n\
         user {node_user} on #{node_hash} resetkeys ~{prefix}:* resetchannels -@all{commands}\n\
         user {admin_user} on #{admin_hash} ~* &* +@all\n",
        node_hash = sha256_hex(node_secret),
        admin_hash = sha256_hex(admin_secret),
    ))
}

fn check_name(what: &'static str, value: &str) -> Result<(), AclError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AclError::InvalidName {
            what,
            value: value.to_string(),
        })
    }
}

/// The SHA-256 of `secret` in lowercase hex, as Redis wants it after `#`.
fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{AclError, DENIED_COMMANDS, NODE_COMMANDS, render_acl, sha256_hex};
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    fn render(node: &str, admin: &str, prefix: &str) -> Result<String, AclError> {
        render_acl(node, "node-pw", admin, "admin-pw", prefix)
    }

    #[test]
    fn names_and_prefixes_outside_the_safe_set_are_rejected() {
        for bad in [
            "dc node",
            "dc\nuser evil on nopass +@all",
            "dc\r",
            "dc\t",
            "",
            "dc:x",
            "dc*",
            "~*",
            "+@all",
            "#x",
            ">x",
            "dé",
            "dc\u{0}",
        ] {
            assert!(
                matches!(
                    render(bad, "dc-admin", "dc"),
                    Err(AclError::InvalidName { .. })
                ),
                "node user {bad:?} accepted"
            );
            assert!(
                matches!(
                    render("dc-node", bad, "dc"),
                    Err(AclError::InvalidName { .. })
                ),
                "admin user {bad:?} accepted"
            );
            assert!(
                matches!(
                    render("dc-node", "dc-admin", bad),
                    Err(AclError::InvalidName { .. })
                ),
                "prefix {bad:?} accepted"
            );
        }
        assert_eq!(
            render("default", "dc-admin", "dc"),
            Err(AclError::DefaultUser)
        );
        assert_eq!(
            render("dc-node", "default", "dc"),
            Err(AclError::DefaultUser)
        );
        assert_eq!(
            render("same", "same", "dc"),
            Err(AclError::SameUser("same".into()))
        );
        assert_eq!(
            render_acl("dc-node", "", "dc-admin", "x", "dc"),
            Err(AclError::EmptySecret("dc-node".into()))
        );
        assert_eq!(
            render_acl("dc-node", "x", "dc-admin", "", "dc"),
            Err(AclError::EmptySecret("dc-admin".into()))
        );
        assert!(render("dc_node-2", "Admin_1", "my-pool_3").is_ok());
    }

    #[test]
    fn no_clear_secret_is_written_and_no_secret_can_break_a_line() {
        let node_secret = "node pw\nuser evil on nopass ~* +@all";
        let admin_secret = "admin \"pw\" #x >y";
        let text = render_acl("dc-node", node_secret, "dc-admin", admin_secret, "dc")
            .expect("valid names");
        assert!(!text.contains("node pw"), "{text}");
        assert!(!text.contains("evil"), "{text}");
        assert!(!text.contains("admin \"pw\""), "{text}");
        assert!(!text.contains('>'), "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.ends_with('\n'));
        assert!(text.contains(&format!("user dc-node on #{} ", sha256_hex(node_secret))));
        assert!(text.contains(&format!("user dc-admin on #{} ", sha256_hex(admin_secret))));
    }

    #[test]
    fn sha256_is_the_standard_one_in_lowercase_hex() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_rendered_lines_are_the_expected_rules() {
        let text = render("dc-node", "dc-admin", "dc").expect("valid names");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "user default off resetpass resetkeys resetchannels -@all"
        );
        let node = format!(
            "user dc-node on #{} resetkeys ~dc:* resetchannels -@all +",
            sha256_hex("node-pw")
        );
        assert!(lines[1].starts_with(&node), "{}", lines[1]);
        let granted: Vec<&str> = lines[1]
            .split(' ')
            .filter_map(|w| w.strip_prefix('+'))
            .collect();
        assert_eq!(granted, NODE_COMMANDS);
        assert!(
            !lines[1].contains('&'),
            "no channel: the protocol uses no pub/sub"
        );
        assert_eq!(
            lines[2],
            format!("user dc-admin on #{} ~* &* +@all", sha256_hex("admin-pw"))
        );
    }

    #[test]
    fn no_denied_command_is_granted() {
        let node: BTreeSet<&str> = NODE_COMMANDS.iter().copied().collect();
        let denied: BTreeSet<&str> = DENIED_COMMANDS.iter().copied().collect();
        assert_eq!(
            node.len(),
            NODE_COMMANDS.len(),
            "duplicates in NODE_COMMANDS"
        );
        assert_eq!(
            denied.len(),
            DENIED_COMMANDS.len(),
            "duplicates in DENIED_COMMANDS"
        );
        for c in NODE_COMMANDS.iter().chain(DENIED_COMMANDS) {
            assert_eq!(*c, c.to_ascii_lowercase(), "{c} is not lowercase");
            assert!(!c.starts_with('@'), "{c}: no category, commands only");
        }
        for d in DENIED_COMMANDS {
            let parent = d.split('|').next().unwrap_or(d);
            assert!(!node.contains(d), "{d} is denied and granted");
            assert!(!node.contains(parent), "{parent} grants the denied {d}");
            assert!(
                !node.iter().any(|n| n.split('|').next() == Some(*d)),
                "a subcommand of the denied {d} is granted"
            );
        }
    }

    /// Read a file of this workspace, if this checkout has it.
    fn read(path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn crate_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Commands whose first argument is a subcommand, as ACL rules name them.
    const CONTAINERS: &[&str] = &[
        "client", "xgroup", "xinfo", "script", "config", "acl", "object", "memory", "function",
        "cluster", "command", "module", "latency", "slowlog",
    ];

    /// A quoted literal starting at `s` (after optional whitespace): its text and the rest.
    fn literal(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start();
        let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let body = &s[1..];
        let end = body.find(quote)?;
        Some((&body[..end], &body[end + 1..]))
    }

    /// The ACL name of a command given its name and what follows it, taking the subcommand of
    /// a container from `next_arg` (the text after the name).
    fn acl_name(name: &str, rest: &str, next_arg: impl Fn(&str) -> Option<&str>) -> String {
        let name = name.to_ascii_lowercase();
        if CONTAINERS.contains(&name.as_str()) {
            let sub =
                next_arg(rest).unwrap_or_else(|| panic!("{name} without a literal subcommand"));
            format!("{name}|{}", sub.to_ascii_lowercase())
        } else {
            name
        }
    }

    /// Every command the Lua scripts call with a literal name; a call with a computed one must
    /// be listed in `dynamic` (file name → the commands it can be).
    fn lua_commands(dynamic: &[(&str, &[&str])]) -> BTreeSet<String> {
        let dir = crate_dir().join("lua");
        let mut found = BTreeSet::new();
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("the lua directory") {
            let path = entry.expect("a lua file").path();
            if path.extension().and_then(|e| e.to_str()) != Some("lua") {
                continue;
            }
            files += 1;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let text = read(&path).expect("readable lua");
            for call in ["redis.call(", "redis.pcall("] {
                for (at, _) in text.match_indices(call) {
                    let after = &text[at + call.len()..];
                    match literal(after) {
                        Some((cmd, rest)) => {
                            found.insert(acl_name(cmd, rest, |r| {
                                literal(r.trim_start().strip_prefix(',')?).map(|(s, _)| s)
                            }));
                        }
                        None => {
                            let known = dynamic
                                .iter()
                                .find(|(file, _)| *file == name)
                                .unwrap_or_else(|| {
                                    panic!("{name}: a call with a computed command name; review it and list it here")
                                });
                            found.extend(known.1.iter().map(|c| c.to_string()));
                        }
                    }
                }
            }
        }
        assert!(
            files >= 10,
            "only {files} scripts found in {}",
            dir.display()
        );
        found
    }

    /// Every command a Rust file sends by name (`redis::cmd("X")`, `pipe.cmd("X")`).
    fn rust_commands(text: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for (at, _) in text.match_indices("cmd(\"") {
            let before = &text[..at];
            if !(before.ends_with("redis::") || before.ends_with('.')) {
                continue;
            }
            let Some((cmd, rest)) = literal(&text[at + 4..]) else {
                continue;
            };
            let rest = rest.strip_prefix(')').unwrap_or(rest);
            found.insert(acl_name(cmd, rest, |r| {
                literal(r.trim_start().strip_prefix(".arg(")?).map(|(s, _)| s)
            }));
        }
        found
    }

    /// NODE_COMMANDS is exactly what the protocol sends: every command of the scripts, of the
    /// broker and of `dc-cli bench`'s baselines is granted, and nothing else is.
    #[test]
    fn node_commands_are_exactly_those_the_code_sends() {
        let mut used = lua_commands(&[("pending.lua", &["xpending"])]);
        let mut dirs = vec![crate_dir().join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("a source directory") {
                let path = entry.expect("a source file").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.file_name().and_then(|n| n.to_str()) == Some("acl.rs") {
                    continue;
                }
                if let Some(text) = read(&path) {
                    used.extend(rust_commands(&text));
                }
            }
        }
        // The facade's benchmark runs raw Redis baselines as the same user: `src/bench.rs`, or
        // every file of `src/bench/`.
        let bench = crate_dir().join("../../src/bench");
        let mut bench_files: Vec<_> = std::fs::read_dir(&bench)
            .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        bench_files.push(bench.with_extension("rs"));
        let mut bench_read = 0;
        for path in bench_files {
            if let Some(text) = read(&path) {
                bench_read += 1;
                used.extend(rust_commands(&text));
            }
        }
        assert!(
            bench_read > 0,
            "the benchmark's source was not found under {}",
            bench.display()
        );
        // Sent by the redis crate itself: connection set-up and `Script::invoke_async`.
        used.extend(["auth", "hello", "evalsha", "script|load"].map(String::from));
        let granted: BTreeSet<String> = NODE_COMMANDS.iter().map(|c| c.to_string()).collect();
        let missing: Vec<&String> = used.difference(&granted).collect();
        let unused: Vec<&String> = granted.difference(&used).collect();
        assert!(missing.is_empty(), "used but not granted: {missing:?}");
        assert!(unused.is_empty(), "granted but never used: {unused:?}");
    }
}
