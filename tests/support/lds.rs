//! Live listener updates without a control plane: file-based LDS.
//!
//! [`Lds::setup`] turns a fixture's static listeners into an LDS resource file that Envoy
//! watches (`dynamic_resources.lds_config.path_config_source` with a `watched_directory`); a
//! push writes the new file next to it and renames it over the old one, the atomic replace
//! Envoy's file watcher expects. [`Lds::push_plugin_config`] swaps the handoff plugin
//! configuration (for a canary ramp), [`Lds::push_raw`] writes anything (for invalid pushes).
//!
//! ```ignore
//! let lds = Lds::new();
//! let envoy = Envoy::start(lds.setup(EnvoyOpts::new("canary").upstream(8081, &a))).await;
//! lds.push_plugin_config(&envoy, config_at(50.0)).await.expect("accepted");
//! ```

use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{wait_for, Envoy, EnvoyOpts};

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The outcome of a push, from Envoy's LDS counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Accepted,
    Rejected,
}

#[derive(Clone)]
pub struct Lds {
    dir: Arc<tempfile::TempDir>,
    /// The listeners as last written (ports already remapped).
    listeners: Arc<Mutex<Vec<Value>>>,
    version: Arc<Mutex<u64>>,
}

impl Default for Lds {
    fn default() -> Self {
        Lds::new()
    }
}

impl Lds {
    pub fn new() -> Lds {
        Lds {
            dir: Arc::new(tempfile::tempdir().expect("tempdir")),
            listeners: Arc::new(Mutex::new(Vec::new())),
            version: Arc::new(Mutex::new(0)),
        }
    }

    /// The directory Envoy watches (only the LDS file lives there: a temporary file written
    /// in it would trigger a reload of the old content).
    fn watched(&self) -> PathBuf {
        let d = self.dir.path().join("watched");
        std::fs::create_dir_all(&d).expect("watched dir");
        d
    }

    /// The LDS file Envoy watches.
    pub fn path(&self) -> PathBuf {
        self.watched().join("lds.json")
    }

    /// Moves the fixture's static listeners into the watched LDS file (after ports are
    /// remapped) and points the bootstrap at it. Chains with any earlier `edit`.
    pub fn setup(&self, mut opts: EnvoyOpts) -> EnvoyOpts {
        let earlier = opts.edit.take();
        let this = self.clone();
        opts.edit(move |cfg| {
            if let Some(e) = earlier {
                e(cfg);
            }
            let listeners = cfg
                .pointer_mut("/static_resources")
                .and_then(Value::as_object_mut)
                .and_then(|s| s.remove("listeners"))
                .and_then(|l| match l {
                    Value::Array(a) => Some(a),
                    _ => None,
                })
                .expect("fixture has static listeners");
            this.write(&listeners);
            *this.listeners.lock().unwrap() = listeners;
            // Dynamic resources need a node identity.
            if cfg.get("node").is_none() {
                cfg["node"] = json!({"id": "handoff-test", "cluster": "handoff-test"});
            }
            cfg["dynamic_resources"] = json!({
                "lds_config": {
                    "resource_api_version": "V3",
                    "path_config_source": {
                        "path": this.path().display().to_string(),
                        "watched_directory": {"path": this.watched().display().to_string()}
                    }
                }
            });
        })
    }

    /// The listeners as last pushed.
    pub fn listeners(&self) -> Vec<Value> {
        self.listeners.lock().unwrap().clone()
    }

    fn write(&self, listeners: &[Value]) {
        let mut version = self.version.lock().unwrap();
        *version += 1;
        let resources: Vec<Value> = listeners
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l["@type"] = Value::from(LISTENER_TYPE);
                l
            })
            .collect();
        let doc = json!({"version_info": version.to_string(), "resources": resources});
        self.write_raw(&serde_json::to_vec_pretty(&doc).expect("json"));
    }

    /// Writes `bytes` as the LDS file atomically: a temporary file on the same filesystem
    /// (outside the watched directory), then a rename over the watched path.
    fn write_raw(&self, bytes: &[u8]) {
        let tmp = self.dir.path().join(".lds.json.tmp");
        std::fs::write(&tmp, bytes).expect("write LDS temp file");
        std::fs::rename(&tmp, self.path()).expect("rename LDS file");
    }

    /// Pushes `listeners` and waits until Envoy accepted or rejected the update.
    pub async fn push(&self, envoy: &Envoy, listeners: Vec<Value>) -> Push {
        let before = LdsCounters::read(envoy).await;
        self.write(&listeners);
        let outcome = wait_for_update(envoy, before).await;
        if outcome == Push::Accepted {
            *self.listeners.lock().unwrap() = listeners;
        }
        outcome
    }

    /// Pushes arbitrary file content (for malformed updates) and waits for Envoy's verdict.
    pub async fn push_raw(&self, envoy: &Envoy, bytes: &[u8]) -> Push {
        let before = LdsCounters::read(envoy).await;
        self.write_raw(bytes);
        wait_for_update(envoy, before).await
    }

    /// Pushes the current listeners with the handoff plugin configuration replaced by
    /// `config` in every handoff filter.
    pub async fn push_plugin_config(&self, envoy: &Envoy, config: Value) -> Push {
        let mut listeners = self.listeners();
        for l in listeners.iter_mut() {
            set_plugin_config(l, &config);
        }
        self.push(envoy, listeners).await
    }
}

/// Replaces the plugin configuration of every handoff wasm filter under `v`.
pub fn set_plugin_config(v: &mut Value, config: &Value) {
    super::visit_wasm_configs(v, &mut |c| {
        c["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": config.to_string()
        });
    });
}

/// Envoy's LDS update counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdsCounters {
    pub success: u64,
    pub rejected: u64,
    pub failure: u64,
}

impl LdsCounters {
    pub async fn read(envoy: &Envoy) -> LdsCounters {
        let text = admin_stats(envoy, "^listener_manager\\.lds\\.").await;
        let get = |name: &str| stat_in(&text, &format!("listener_manager.lds.{name}"));
        LdsCounters {
            success: get("update_success"),
            rejected: get("update_rejected"),
            failure: get("update_failure"),
        }
    }
}

async fn wait_for_update(envoy: &Envoy, before: LdsCounters) -> Push {
    let outcome = wait_for(
        "the LDS update to be applied or rejected",
        Duration::from_secs(30),
        || async {
            let now = LdsCounters::read(envoy).await;
            if now.rejected > before.rejected || now.failure > before.failure {
                Some(Push::Rejected)
            } else if now.success > before.success {
                Some(Push::Accepted)
            } else {
                None
            }
        },
    )
    .await;
    if outcome == Push::Accepted {
        // An accepted listener warms up (its wasm VM starts) before it takes new connections.
        wait_for(
            "the new listener to warm up",
            Duration::from_secs(30),
            || async {
                (gauge(envoy, "listener_manager.total_listeners_warming").await == 0).then_some(())
            },
        )
        .await;
    }
    outcome
}

/// A plain admin stat (counter or gauge) by its full name (it must exist).
pub async fn gauge(envoy: &Envoy, name: &str) -> u64 {
    stat_in(&exact_stat(envoy, name).await, name)
}

/// A stat Envoy creates only when it first happens (per-code counters such as
/// `upstream_rq_503`): 0 when absent.
pub async fn gauge_or_zero(envoy: &Envoy, name: &str) -> u64 {
    stat_or_none(&exact_stat(envoy, name).await, name).unwrap_or(0)
}

/// The admin stats text of exactly the stat `name`.
async fn exact_stat(envoy: &Envoy, name: &str) -> String {
    admin_stats(envoy, &format!("^{}$", name.replace('.', "\\."))).await
}

/// Envoy's plain-text admin stats whose names match the regex `filter`.
async fn admin_stats(envoy: &Envoy, filter: &str) -> String {
    super::h1()
        .get(envoy.admin_url(&format!("/stats?filter={filter}")))
        .send()
        .await
        .expect("admin reachable")
        .text()
        .await
        .expect("stats")
}

/// The value of stat `name` in admin stats text. Envoy creates these stats at start, so a
/// missing one is a wrong name (or a changed Envoy), never a zero.
fn stat_in(text: &str, name: &str) -> u64 {
    stat_or_none(text, name)
        .unwrap_or_else(|| panic!("Envoy has no stat `{name}` (admin stats: {text:?})"))
}

fn stat_or_none(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.trim().parse().ok())
}
