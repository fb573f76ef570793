//! The merged configuration of a command: defaults, then the config file (`--config`, else
//! `./dc.toml`), then `DC_*` environment variables, then the flags; and the secrets it names.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::node::default_state_dir;

/// The merged configuration (file + environment + flags).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    pub(super) address: String,
    pub(super) port: u16,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) no_tls: bool,
    pub(super) tls_ca: Option<PathBuf>,
    pub(super) broker: Option<String>,
    pub(super) head: bool,
    pub(super) server_only: bool,
    pub(super) cpu_workers: usize,
    pub(super) gpus: String,
    pub(super) workers_per_gpu: usize,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) bind: String,
    pub(super) heartbeat_ms: u64,
    /// Worker kinds served by external programs: kind = ["program", "arg", …].
    pub(super) external_workers: BTreeMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: "localhost".into(),
            port: dc_core::DEFAULT_PORT,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            no_tls: false,
            tls_ca: None,
            broker: None,
            head: false,
            server_only: false,
            cpu_workers: 0,
            gpus: "auto".into(),
            workers_per_gpu: 1,
            state_dir: None,
            bind: "*,-::*".into(),
            heartbeat_ms: 1000,
            external_workers: BTreeMap::new(),
        }
    }
}

/// The keys a config file may set (the fields of [`Config`]).
const CONFIG_KEYS: &[&str] = &[
    "address",
    "port",
    "password",
    "password_file",
    "token",
    "token_file",
    "no_tls",
    "tls_ca",
    "broker",
    "head",
    "server_only",
    "cpu_workers",
    "gpus",
    "workers_per_gpu",
    "state_dir",
    "bind",
    "heartbeat_ms",
    "external_workers",
];

/// Config-file keys that no `DC_*` variable sets: the role (`head`, `server_only`) and the
/// table of external workers, which only a file or flags give.
const FILE_ONLY_KEYS: &[&str] = &["head", "server_only", "external_workers"];

/// The config file to read: `--config` (which must be a file), else `./dc.toml` if there is
/// one (in this directory only).
fn config_file(given: Option<&PathBuf>) -> Result<Option<PathBuf>, String> {
    let (path, explicit) = match given {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from("dc.toml"), false),
    };
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(Some(path)),
        Ok(_) => Err(format!(
            "config file {} is not a file (a directory?): pass --config FILE.toml",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("config file {} does not exist", path.display()))
        }
        Err(e) => Err(format!("config file {}: {e}", path.display())),
    }
}

/// Parse a config file's text, refusing keys that configure nothing.
fn config_file_provider(
    path: &std::path::Path,
    text: &str,
) -> Result<figment::providers::Data<Toml>, String> {
    let table: BTreeMap<String, figment::value::Value> = Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    if let Some(key) = table.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "config file {}: unknown key {key:?} (known keys: {})",
            path.display(),
            CONFIG_KEYS.join(", ")
        ));
    }
    Ok(Toml::string(text))
}

impl Config {
    pub(super) fn load(
        flags: &impl Serialize,
        config_file: Option<&PathBuf>,
    ) -> Result<Self, String> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = self::config_file(config_file)?;
        if let Some(path) = &file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("config file {}: {e}", path.display()))?;
            figment = figment.merge(config_file_provider(path, &text)?);
            let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            tracing::info!(file = %shown.display(), "configuration file loaded");
        }
        let env_keys: Vec<&str> = CONFIG_KEYS
            .iter()
            .copied()
            .filter(|key| !FILE_ONLY_KEYS.contains(key))
            .collect();
        figment = figment
            .merge(Env::prefixed("DC_").only(&env_keys))
            .merge(Serialized::defaults(flags));
        figment.extract().map_err(|e| match &file {
            Some(path) => format!("configuration (file {}): {e}", path.display()),
            None => format!("configuration: {e}"),
        })
    }

    /// The password, if one is given (flag, environment, config, or file).
    pub(super) fn password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(file) = &self.password_file {
            return Ok(Some(read_secret_file(file, "password")?));
        }
        Ok(None)
    }

    /// The join token, if one is given.
    pub(super) fn token(&self) -> Result<Option<String>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_string()));
        }
        if let Some(file) = &self.token_file {
            return Ok(Some(read_secret_file(file, "join token")?));
        }
        Ok(None)
    }

    /// How a node or `status` reaches the pool server.
    pub(super) fn target(&self) -> Result<dc_core::NetworkTarget, String> {
        let password = self.password()?;
        let token = self.token()?;
        if password.is_none() && token.is_none() && self.broker.is_none() {
            return Err(
                "no join token and no password: pass --token-file FILE (a copy of the head's join-token), DC_TOKEN, --password-file FILE or DC_PASSWORD".into(),
            );
        }
        Ok(dc_core::NetworkTarget {
            address: self.address.clone(),
            // With a token, -a replaces the token's addresses; the default does not.
            address_set: self.address != Config::default().address,
            port: self.port,
            password,
            token,
            tls: !self.no_tls,
            tls_ca: self.tls_ca.clone(),
            known_heads: None,
            url: self.broker.clone(),
            connect_timeout: Duration::from_secs(5),
        })
    }

    pub(super) fn state_dir(&self) -> Result<PathBuf, String> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => default_state_dir().map_err(|e| e.to_string()),
        }
    }
}

/// The first line of a password or token file (at most 64 KiB read), with a warning when
/// group or others may read it.
fn read_secret_file(file: &std::path::Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let opened = std::fs::File::open(file)
        .map_err(|e| format!("cannot read {what} file {}: {e}", file.display()))?;
    if let Ok(meta) = opened.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %file.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the {what} file can be read by other users of this machine: chmod 600 it"
        );
    }
    let mut text = String::new();
    opened
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {what} file {}: {e}", file.display()))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// A warning for a password short enough to guess: how long guessing would take at the rate
/// one connection can try passwords against a Redis server.
pub(super) fn weak_password_warning(password: &str) {
    const GUESSES_PER_SECOND: f64 = 70_000.0;
    let n = password.chars().count();
    if n >= 16 {
        return;
    }
    let alphabet = if password.chars().all(|c| c.is_ascii_digit()) {
        10.0
    } else if password.chars().all(|c| c.is_ascii_lowercase()) {
        26.0
    } else {
        94.0
    };
    let seconds = f64::powi(alphabet, i32::try_from(n).unwrap_or(i32::MAX)) / GUESSES_PER_SECOND;
    let shown = if seconds < 120.0 {
        format!("{seconds:.0} seconds")
    } else if seconds < 2.0 * 3600.0 {
        format!("{:.0} minutes", seconds / 60.0)
    } else if seconds < 2.0 * 86400.0 {
        format!("{:.0} hours", seconds / 3600.0)
    } else if seconds < 2.0 * 365.0 * 86400.0 {
        format!("{:.0} days", seconds / 86400.0)
    } else {
        format!("{:.0} years", seconds / (365.0 * 86400.0))
    };
    tracing::warn!(
        "the pool password has {n} characters: one connection guessing {GUESSES_PER_SECOND:.0} passwords a second tries them all within {shown}; use 16 or more, or start the head without a password and join with its token"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_key_that_configures_nothing_is_an_error_naming_key_and_file() {
        let path = std::path::Path::new("/etc/dc/dc.toml");
        let error = config_file_provider(path, "cpu_workerz = 4\n")
            .err()
            .expect("unknown key");
        assert!(error.contains("\"cpu_workerz\""), "{error}");
        assert!(error.contains("/etc/dc/dc.toml"), "{error}");
        assert!(
            config_file_provider(path, "cpu_workers = 4\n[external_workers]\nx = [\"y\"]\n")
                .is_ok()
        );
        let error = config_file_provider(path, "cpu_workers = \n")
            .err()
            .expect("bad TOML");
        assert!(error.contains("/etc/dc/dc.toml"), "{error}");
    }

    #[test]
    fn config_must_name_a_file() {
        let dir = std::env::temp_dir();
        let error = config_file(Some(&dir)).expect_err("a directory is refused");
        assert!(error.contains("not a file"), "{error}");
        let missing = dir.join("dc-no-such-config-file.toml");
        let error = config_file(Some(&missing)).expect_err("a missing file is refused");
        assert!(error.contains("does not exist"), "{error}");
    }
}
