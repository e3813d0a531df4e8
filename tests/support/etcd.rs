//! A real etcd (Debian's `etcd-server`, 3.4) on free loopback ports in a temporary data
//! directory, killed when the handle is dropped. It can be stopped and started again on the
//! same ports and data directory (a crash and a restart of the same member).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    pub peer_port: u16,
    dir: tempfile::TempDir,
    tls: Option<Tls>,
    /// Plain-HTTP `/health` and `/metrics` when the client URL is HTTPS.
    metrics_port: Option<u16>,
}

/// PEM files for an etcd that serves its client URL over TLS.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// `--client-cert-auth`: only clients with a certificate signed by `ca` get in.
    pub client_cert_auth: bool,
}

pub fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

impl Etcd {
    /// Starts etcd and waits until `/health` reports healthy. A start that lost one of its
    /// ports to another process is tried again on new ports.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// Starts etcd serving its client URL over TLS (`https://127.0.0.1:PORT`), with `/health`
    /// and `/metrics` on a plain-HTTP port of their own.
    pub async fn start_tls(tls: Tls) -> Etcd {
        Etcd::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> Etcd {
        for _ in 0..5 {
            let mut etcd = Etcd {
                child: None,
                client_port: super::free_port(),
                peer_port: super::free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                metrics_port: tls.as_ref().map(|_| super::free_port()),
                tls: tls.clone(),
            };
            etcd.spawn();
            if etcd.healthy_or_lost_a_port().await {
                return etcd;
            }
        }
        panic!("etcd lost one of its ports to another process five times in a row");
    }

    /// Waits until etcd is healthy (true) or has exited because a port was taken (false).
    async fn healthy_or_lost_a_port(&mut self) -> bool {
        let url = self.health_url();
        let exited = super::wait_for("etcd /health", Duration::from_secs(30), || {
            let url = url.clone();
            let gone = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            async move {
                if gone {
                    return Some(true);
                }
                let r = super::h1().get(url).send().await.ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                (v["health"] == "true").then_some(false)
            }
        })
        .await;
        if !exited {
            return true;
        }
        self.child = None;
        let log = self.log();
        assert!(super::lost_a_port(&log), "etcd exited:\n{log}");
        false
    }

    fn spawn(&mut self) {
        let client = self.url("");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        // Appends: a restarted member's log follows the first one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let mut command = Command::new(etcd_bin());
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg(format!("--client-cert-auth={}", tls.client_cert_auth));
        }
        if let Some(port) = self.metrics_port {
            command.arg(format!("--listen-metrics-urls=http://127.0.0.1:{port}"));
        }
        let child = command
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e} (run `make setup`)"));
        self.child = Some(child);
    }

    async fn wait_healthy(&self) {
        let url = self.health_url();
        super::wait_for("etcd /health", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let r = super::h1().get(url).send().await.ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                (v["health"] == "true").then_some(())
            }
        })
        .await;
    }

    /// The client URL (`https://` when started with TLS) and `path`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.client_port)
    }

    /// `/health` over plain HTTP (the metrics port when the client URL is HTTPS).
    pub fn health_url(&self) -> String {
        self.metrics_url("/health")
    }

    /// A path of the plain-HTTP metrics endpoint (`/metrics`, `/health`).
    pub fn metrics_url(&self, path: &str) -> String {
        match self.metrics_port {
            Some(port) => format!("http://127.0.0.1:{port}{path}"),
            None => self.url(path),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Starts a stopped etcd again: same client and peer ports, same data directory (so the
    /// records and leases written before the stop are back), and waits until it is healthy.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        self.spawn();
        self.wait_healthy().await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes etcd (SIGSTOP): connections are still accepted by the kernel, nothing is
    /// answered, so callouts time out, as with a hung or partitioned member.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen etcd run again (SIGCONT); it answers what was sent meanwhile.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("etcd is running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Stops etcd now with SIGKILL, a crash (the handle's drop does the same).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A frozen process dies of SIGKILL too; SIGCONT first keeps its log complete.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How many keys live under `prefix` (through the v3 JSON gateway).
    pub async fn count(&self, prefix: &str) -> u64 {
        let v = self
            .range(prefix, true, true)
            .await
            .expect("etcd reachable");
        v["count"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// The values of `key`, or of every key under it with `prefix`, in key order; `None`
    /// when etcd did not answer (it may be stopped on purpose).
    pub async fn values(&self, key: &str, prefix: bool) -> Option<Vec<Vec<u8>>> {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        let v = self.range(key, prefix, false).await?;
        let values = v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|kv| STANDARD.decode(kv["value"].as_str()?).ok())
            .collect();
        Some(values)
    }

    /// One range request of the v3 JSON gateway: `key` alone, or every key under it; `None`
    /// when etcd did not answer with JSON.
    async fn range(&self, key: &str, prefix: bool, count_only: bool) -> Option<serde_json::Value> {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        let mut body = serde_json::json!({"key": STANDARD.encode(key), "count_only": count_only});
        if prefix {
            let mut end = key.as_bytes().to_vec();
            if let Some(last) = end.last_mut() {
                *last += 1;
            }
            body["range_end"] = STANDARD.encode(&end).into();
        }
        super::h1()
            .post(self.url("/v3/kv/range"))
            .json(&body)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}\n--- end of etcd log ---", self.log());
        }
    }
}

/// An Envoy running `envoy/idempotency-etcd.yaml` in front of `backend`, with its `etcd`
/// cluster on `etcd_port`, the plugin's `on_error` and `lock_timeout_s` set.
pub async fn idempotency_envoy(
    backend: &super::Backend,
    etcd_port: u16,
    on_error: &str,
    lock_timeout_s: u64,
) -> super::Envoy {
    let opts = idempotency_opts(backend, etcd_port, on_error, lock_timeout_s);
    super::Envoy::start(opts).await
}

/// The plugin configuration [`idempotency_envoy`] runs.
pub fn idempotency_config(on_error: &str, lock_timeout_s: u64) -> serde_json::Value {
    let mut config = super::fixture_plugin_config("idempotency-etcd");
    config["idempotency"]["store"]["on_error"] = serde_json::json!(on_error);
    config["idempotency"]["lock_timeout_s"] = serde_json::json!(lock_timeout_s);
    // Generous for a loaded CI machine; the fixture's 250 ms is the production default.
    config["idempotency"]["store"]["timeout_ms"] = serde_json::json!(2000);
    config
}

/// The options of [`idempotency_envoy`], to start it another way (through LDS).
pub fn idempotency_opts(
    backend: &super::Backend,
    etcd_port: u16,
    on_error: &str,
    lock_timeout_s: u64,
) -> super::EnvoyOpts {
    super::EnvoyOpts::new("idempotency-etcd")
        .upstream(8081, backend)
        .port(2379, etcd_port)
        .plugin_config(idempotency_config(on_error, lock_timeout_s))
}

/// `handoff_idempotency_outcomes{outcome=<name>}` of one Envoy.
pub async fn outcome(envoy: &super::Envoy, name: &str) -> f64 {
    envoy.idempotency_outcome(name).await
}

/// The shared-store topology: one etcd, one payments upstream, two Envoys running
/// [`idempotency_envoy`] with the same settings.
pub async fn two_envoys(
    on_error: &str,
    lock_timeout_s: u64,
) -> (Etcd, super::Backend, super::Envoy, super::Envoy) {
    let etcd = Etcd::start().await;
    let backend = super::Backend::start("payments", "v1");
    let a = idempotency_envoy(&backend, etcd.client_port, on_error, lock_timeout_s).await;
    let b = idempotency_envoy(&backend, etcd.client_port, on_error, lock_timeout_s).await;
    (etcd, backend, a, b)
}
