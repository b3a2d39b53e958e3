//! Reloading the configuration in place (SIGHUP, `systemctl reload`, `edgegate reload`): what
//! changed between two configuration files, and the handle that asks the gateway to apply one.
//!
//! The gateway applies a reload (see `gateway::Pipeline::reload`) only after the new file passed
//! every check `edgegate check` makes; otherwise the running configuration stays in force whole.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::ConfigError;

/// Keys only a restart applies: the buffer's identity and layout on disk, and the process's
/// logging. A reload that changes one is refused, naming it.
const RESTART_ONLY: &[&str] = &["gateway.id", "gateway.data_dir", "buffer", "log"];

/// Why a reload was not applied. In every case the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid (the key and line are named): fix it and reload again.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// Settings only a restart applies changed: restart the service, or undo the change.
    #[error("{} changed: restart the service to apply (systemctl restart edgegate), or undo the change; nothing was applied", .0.join(", "))]
    NeedsRestart(Vec<String>),
    /// The new configuration is valid but cannot be put in place here (the new admin address
    /// is taken, a converter cannot start): fix the environment and reload again.
    #[error("{key}: {message}; nothing was applied")]
    Refused { key: String, message: String },
    /// The gateway is stopping, or has not started yet: try again once it runs.
    #[error("the gateway is not running")]
    Unavailable,
}

/// What a reload changed, for the log, the unit's status and `edgegate reload`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadSummary {
    /// One entry per part that was re-applied, e.g. `sources.meter (restarted)`.
    pub applied: Vec<String>,
    /// From the signal to the last stage running with the new configuration.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
}

pub struct ReloadRequest {
    pub reply: oneshot::Sender<Result<ReloadSummary, ReloadError>>,
}

/// Asks the running gateway to reload its configuration file; clone it freely.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<ReloadRequest>);

impl ReloadHandle {
    pub fn new() -> (ReloadHandle, mpsc::Receiver<ReloadRequest>) {
        // One reload at a time; a second asks while the first is applied, and waits.
        let (tx, rx) = mpsc::channel(4);
        (ReloadHandle(tx), rx)
    }

    pub async fn request(&self) -> Result<ReloadSummary, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(ReloadRequest { reply })
            .await
            .map_err(|_| ReloadError::Unavailable)?;
        answer.await.map_err(|_| ReloadError::Unavailable)?
    }
}

/// The top-level and per-entry tables of a configuration file, compared as parsed TOML: a
/// change of formatting or comments is no change.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub restart_only: Vec<String>,
    pub sources: BTreeSet<String>,
    /// Converters whose table changed (their scripts' text is compared by the gateway).
    pub converters: BTreeSet<String>,
    pub kafka: bool,
    pub downlink: bool,
    pub admin: bool,
}

impl Changes {
    pub fn between(old: &toml::Table, new: &toml::Table) -> Changes {
        let mut changes = Changes::default();
        for key in RESTART_ONLY {
            if lookup(old, key) != lookup(new, key) {
                changes.restart_only.push((*key).to_owned());
            }
        }
        let empty = toml::Table::new();
        let table = |t: &'_ toml::Table, k: &str| -> toml::Table {
            t.get(k)
                .and_then(|v| v.as_table())
                .unwrap_or(&empty)
                .clone()
        };
        let (old_sources, new_sources) = (table(old, "sources"), table(new, "sources"));
        let names: BTreeSet<&String> = old_sources.keys().chain(new_sources.keys()).collect();
        for name in names {
            if old_sources.get(name) != new_sources.get(name) {
                changes.sources.insert(name.clone());
            }
        }
        let (old_converters, new_converters) = (table(old, "converters"), table(new, "converters"));
        let names: BTreeSet<&String> = old_converters.keys().chain(new_converters.keys()).collect();
        for name in names {
            if old_converters.get(name) != new_converters.get(name) {
                changes.converters.insert(name.clone());
            }
        }
        changes.kafka = old.get("kafka") != new.get("kafka");
        changes.downlink = old.get("downlink") != new.get("downlink");
        changes.admin = old.get("admin") != new.get("admin");
        changes
    }
}

/// A dotted key's value, `None` when absent.
fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn formatting_and_comments_are_no_change() {
        let old = parse("[kafka]\ntopic = \"t\"\n[sources.a]\ntype = \"mqtt\"\n");
        let new =
            parse("# tuned\n[kafka]\ntopic    = \"t\"\n\n[sources.a]\ntype = \"mqtt\" # same\n");
        assert_eq!(Changes::between(&old, &new), Changes::default());
    }

    #[test]
    fn each_source_is_compared_on_its_own() {
        let old = parse("[sources.a]\nx = 1\n[sources.b]\nx = 1\n[sources.c]\nx = 1\n");
        let new = parse("[sources.a]\nx = 1\n[sources.b]\nx = 2\n[sources.d]\nx = 1\n");
        let changes = Changes::between(&old, &new);
        let names: Vec<&str> = changes.sources.iter().map(String::as_str).collect();
        assert_eq!(names, ["b", "c", "d"]);
        assert!(!changes.kafka && changes.converters.is_empty() && changes.restart_only.is_empty());
    }

    #[test]
    fn the_gateway_id_and_data_dir_need_a_restart_its_other_keys_do_not() {
        let old = parse("[gateway]\nid = \"a\"\ndata_dir = \"/x\"\n");
        let new = parse("[gateway]\nid = \"b\"\ndata_dir = \"/y\"\n");
        let changes = Changes::between(&old, &new);
        assert_eq!(changes.restart_only, ["gateway.id", "gateway.data_dir"]);
        let buffer =
            parse("[gateway]\nid = \"a\"\ndata_dir = \"/x\"\n[buffer]\nmax_bytes = \"1GB\"\n");
        assert_eq!(Changes::between(&old, &buffer).restart_only, ["buffer"]);
    }
}
