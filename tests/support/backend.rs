//! The `payments` example as a test upstream process.

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Backend {
    /// Starts an instance of `version` ("v1"/"v2") named `name` on a free loopback port.
    pub fn start(name: &str, version: &str) -> Backend {
        Backend::start_with(name, version, &[])
    }

    /// [`Backend::start`] with more arguments (`["--reset-pct", "1"]`).
    pub fn start_with(name: &str, version: &str, args: &[&str]) -> Backend {
        let bin = super::examples_dir().join("payments");
        let mut child = Command::new(&bin)
            .args([
                "--name",
                name,
                "--version",
                version,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let addr = super::read_listening(&mut child, name);
        Backend {
            name: name.to_string(),
            addr,
            child,
        }
    }

    /// The two versions the fixtures route to: a v1 instance named `v1_name` and a v2 instance
    /// named `v2_name` (see `EnvoyOpts::versions`).
    pub fn versions(v1_name: &str, v2_name: &str) -> (Backend, Backend) {
        (Backend::start(v1_name, "v1"), Backend::start(v2_name, "v2"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get_json(&self, path: &str) -> Value {
        super::h1()
            .get(self.url(path))
            .send()
            .await
            .expect("backend reachable")
            .json()
            .await
            .expect("backend admin JSON")
    }

    async fn post(&self, path: &str) {
        let r = super::h1()
            .post(self.url(path))
            .send()
            .await
            .expect("backend");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    /// Executions per idempotency key of non-GET requests.
    pub async fn executions(&self) -> BTreeMap<String, u64> {
        serde_json::from_value(self.get_json("/_admin/executions").await).unwrap_or_default()
    }

    /// Every execution with its times, and the resets (`GET /_admin/ledger`, see the example).
    pub async fn ledger(&self) -> Value {
        self.get_json("/_admin/ledger").await
    }

    /// Executions running now.
    pub async fn inflight(&self) -> u64 {
        self.get_json("/_admin/inflight")
            .await
            .as_u64()
            .unwrap_or(0)
    }

    /// Requests the app handled (control endpoints excluded).
    pub async fn requests(&self) -> u64 {
        self.get_json("/_admin/requests")
            .await
            .as_u64()
            .unwrap_or(0)
    }

    /// The last request the app handled, as it saw it.
    pub async fn last(&self) -> Value {
        self.get_json("/_admin/last").await
    }

    pub async fn set_ready_status(&self, status: u16) {
        self.post(&format!("/_admin/ready?status={status}")).await;
    }

    pub async fn set_drain_signal(&self, on: bool) {
        self.post(&format!("/_admin/drain-signal?on={}", u8::from(on)))
            .await;
    }

    /// From now on `error_pct` of every 100 requests answer 503, and each waits `delay_ms` more.
    pub async fn set_fault(&self, error_pct: u32, delay_ms: u64) {
        self.post(&format!(
            "/_admin/fault?error_pct={error_pct}&delay_ms={delay_ms}"
        ))
        .await;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}
