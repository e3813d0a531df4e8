//! End-to-end harness: real Envoy processes (the `.venv` build, or `$ENVOY_BIN`) running the
//! freshly built `handoff.wasm` with a fixture from `envoy/`, real upstream processes (the
//! `payments` example), and HTTP/1.1 and HTTP/2 clients. Every process started here is stopped
//! when its handle is dropped, pass or fail; Envoy's log is printed when a test fails.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod backend;
pub mod cli;
pub mod client;
pub mod drain;
pub mod etcd;
pub mod lds;
pub mod pki;
pub mod tokens;
pub use backend::Backend;
#[allow(unused_imports)]
pub use client::{assert_problem_body, cohort, payment, post, send, user_in, Resp};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/envoy"))
}

pub fn wasm_path() -> PathBuf {
    let p = std::env::var_os("HANDOFF_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/wasm32-wasip1/release/handoff.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `make build` first (make test does)",
        p.display()
    );
    p
}

/// A port that was free a moment ago on 127.0.0.1, and that no other caller in this test
/// process has been given: parallel tests never pick the same port. Another process can still
/// bind it before the caller does; [`Envoy::start`] and [`etcd::Etcd::start`] then start again
/// on new ports.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A log that says a process could not bind one of its ports (another process took it between
/// [`free_port`] and the bind).
pub fn lost_a_port(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address already in use")
}

/// Waits until `check` returns `Some`, polling; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// HTTP/1.1 client (keep-alive).
pub fn h1() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// HTTP/2 client with prior knowledge (h2c), as gRPC and service meshes speak it.
pub fn h2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Both protocols, for tests that must hold on each.
pub fn clients() -> [(&'static str, reqwest::Client); 2] {
    [("HTTP/1.1", h1()), ("HTTP/2", h2())]
}

/// A change to the whole Envoy bootstrap (as JSON) before it starts.
pub type BootstrapEdit = Box<dyn FnOnce(&mut Value)>;

/// How to start an Envoy from a fixture.
pub struct EnvoyOpts {
    pub fixture: String,
    /// Replaces the JSON plugin configuration of the handoff filter.
    pub plugin_config: Option<Value>,
    /// Fixture port -> real port, for upstreams the test started. Every other port in the
    /// fixture (listeners, admin) is replaced by a free one.
    pub ports: HashMap<u16, u16>,
    pub concurrency: u32,
    /// Edits the whole bootstrap after ports and plugin config are set.
    pub edit: Option<BootstrapEdit>,
    /// Extra command-line arguments (`--drain-time-s 1`, `--base-id 3`, ...).
    pub args: Vec<String>,
}

impl EnvoyOpts {
    pub fn new(fixture: &str) -> EnvoyOpts {
        EnvoyOpts {
            fixture: fixture.to_string(),
            plugin_config: None,
            ports: HashMap::new(),
            concurrency: 2,
            edit: None,
            args: Vec::new(),
        }
    }

    pub fn plugin_config(mut self, v: Value) -> Self {
        self.plugin_config = Some(v);
        self
    }

    /// Points the fixture's upstream on `fixture_port` at a running backend.
    pub fn upstream(mut self, fixture_port: u16, backend: &Backend) -> Self {
        self.ports.insert(fixture_port, backend.addr.port());
        self
    }

    /// Points the fixture's two upstreams, v1 / stable on 8081 and v2 / canary on 8082, at
    /// running backends.
    pub fn versions(self, on_8081: &Backend, on_8082: &Backend) -> Self {
        self.upstream(8081, on_8081).upstream(8082, on_8082)
    }

    pub fn port(mut self, fixture_port: u16, real: u16) -> Self {
        self.ports.insert(fixture_port, real);
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn edit(mut self, f: impl FnOnce(&mut Value) + 'static) -> Self {
        self.edit = Some(Box::new(f));
        self
    }
}

/// `envoy/translate.yaml` with this plugin configuration and bootstrap edit, in front of a v1
/// (`v1`, port 8081) and a v2 (`v2`, port 8082) payments instance.
pub async fn translate_envoy(
    plugin_config: Value,
    edit: impl FnOnce(&mut Value) + 'static,
) -> (Envoy, Backend, Backend) {
    let (v1, v2) = Backend::versions("v1", "v2");
    let envoy = Envoy::start(
        EnvoyOpts::new("translate")
            .versions(&v1, &v2)
            .plugin_config(plugin_config)
            .edit(edit),
    )
    .await;
    (envoy, v1, v2)
}

/// Reads a fixture (YAML) as JSON.
pub fn load_fixture(name: &str) -> Value {
    let path = root().join("envoy").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The plugin configuration of the handoff filter in a fixture, parsed.
pub fn fixture_plugin_config(name: &str) -> Value {
    let mut found = None;
    visit_wasm_configs(&mut load_fixture(name), &mut |cfg| {
        let text = cfg
            .pointer("/configuration/value")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        found = Some(serde_json::from_str(text).expect("fixture plugin config is JSON"));
    });
    found.expect("fixture has a handoff filter")
}

/// Calls `f` on every wasm filter `config` object that runs handoff.wasm.
pub fn visit_wasm_configs(v: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    match v {
        Value::Object(map) => {
            let is_handoff = map
                .get("vm_config")
                .and_then(|vm| vm.pointer("/code/local/filename"))
                .and_then(Value::as_str)
                .is_some_and(|f| f.ends_with("handoff.wasm"));
            if is_handoff {
                f(v);
                return;
            }
            for child in map.values_mut() {
                visit_wasm_configs(child, f);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| visit_wasm_configs(c, f)),
        _ => {}
    }
}

fn remap_ports(v: &mut Value, ports: &mut HashMap<u16, u16>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "port_value" {
                    if let Some(p) = child.as_u64() {
                        let real = *ports.entry(p as u16).or_insert_with(free_port);
                        *child = Value::from(real);
                    }
                } else {
                    remap_ports(child, ports);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| remap_ports(c, ports)),
        _ => {}
    }
}

pub struct Envoy {
    child: Option<Child>,
    pub admin: SocketAddr,
    /// Fixture port -> real port.
    pub ports: HashMap<u16, u16>,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// How many times a start that lost one of its ports to another process is tried again.
const PORT_RETRIES: usize = 5;

/// A bootstrap ready to run: the fixture with its ports chosen and the test's edits applied.
struct Launch {
    cfg: Value,
    /// Fixture port -> real port.
    ports: HashMap<u16, u16>,
    /// The fixture ports the test chose itself (upstreams it started): never moved.
    pinned: BTreeSet<u16>,
    concurrency: u32,
    args: Vec<String>,
}

impl Launch {
    fn new(mut opts: EnvoyOpts) -> Launch {
        let mut cfg = load_fixture(&opts.fixture);
        let wasm = wasm_path();
        let plugin = opts.plugin_config.take();
        visit_wasm_configs(&mut cfg, &mut |c| {
            c["vm_config"]["code"]["local"]["filename"] = Value::from(wasm.display().to_string());
            if let Some(p) = &plugin {
                c["configuration"]["value"] = Value::from(p.to_string());
            }
        });
        let pinned = opts.ports.keys().copied().collect();
        let mut ports = opts.ports.clone();
        remap_ports(&mut cfg, &mut ports);
        if let Some(edit) = opts.edit.take() {
            edit(&mut cfg);
        }
        Launch {
            cfg,
            ports,
            pinned,
            concurrency: opts.concurrency,
            args: opts.args,
        }
    }

    /// Gives every port the harness chose a new free one (another process took one of them).
    fn move_ports(&mut self) {
        let mut moved = HashMap::new();
        for (fixture, real) in self.ports.iter_mut() {
            if !self.pinned.contains(fixture) {
                let new = free_port();
                moved.insert(*real, new);
                *real = new;
            }
        }
        replace_ports(&mut self.cfg, &moved);
    }
}

/// Replaces each `port_value` found in `moved` (old real port -> new real port).
fn replace_ports(v: &mut Value, moved: &HashMap<u16, u16>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match child.as_u64().and_then(|p| moved.get(&(p as u16))) {
                    Some(new) if k == "port_value" => *child = Value::from(*new),
                    _ => replace_ports(child, moved),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| replace_ports(c, moved)),
        _ => {}
    }
}

impl Envoy {
    /// Starts Envoy and waits until its admin endpoint reports LIVE. A start that lost one of
    /// its ports to another process is tried again on new ports.
    pub async fn start(opts: EnvoyOpts) -> Envoy {
        let mut launch = Launch::new(opts);
        let client = h1();
        for attempt in 1.. {
            let mut envoy = Envoy::spawn(&launch);
            let admin = envoy.admin;
            let mut child = envoy.child.take().expect("child");
            let ready = wait_for_ready(&client, admin, &mut child, Duration::from_secs(60)).await;
            envoy.child = Some(child);
            match ready {
                Ok(()) => return envoy,
                Err(_) if attempt < PORT_RETRIES && lost_a_port(&envoy.log()) => {
                    launch.move_ports();
                }
                Err(why) => panic!(
                    "Envoy did not become ready: {why}\n--- envoy log ---\n{}",
                    envoy.log()
                ),
            }
        }
        unreachable!()
    }

    /// Starts Envoy expecting it to refuse the configuration; returns its log once it exited.
    pub async fn start_expecting_failure(opts: EnvoyOpts) -> String {
        let mut launch = Launch::new(opts);
        for attempt in 1.. {
            let mut envoy = Envoy::spawn(&launch);
            let mut child = envoy.child.take().expect("child");
            let deadline = Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("Envoy kept running with a bad config:\n{}", envoy.log());
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            assert!(!status.success(), "Envoy exited successfully");
            let log = envoy.log();
            if attempt < PORT_RETRIES && lost_a_port(&log) {
                launch.move_ports();
                continue;
            }
            return log;
        }
        unreachable!()
    }

    fn spawn(launch: &Launch) -> Envoy {
        let cfg = &launch.cfg;
        let admin_port = cfg
            .pointer("/admin/address/socket_address/port_value")
            .and_then(Value::as_u64)
            .expect("fixture has an admin port") as u16;
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(cfg).unwrap()).unwrap();
        let log_path = dir.path().join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &launch.concurrency.to_string()])
            .args(["--disable-hot-restart", "-l", "info"])
            // Envoy buffers its log file (10 s by default): flush quickly so a test that
            // reads the log sees what already happened.
            .args(["--file-flush-interval-msec", "50"])
            .args(&launch.args)
            .arg("--log-path")
            .arg(&log_path)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run `make setup`)",
                    envoy_bin().display()
                )
            });
        Envoy {
            child: Some(child),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ports: launch.ports.clone(),
            log_path,
            config_path,
            _dir: dir,
        }
    }

    /// The real port of a fixture port (10000 is the main listener in every fixture).
    pub fn port(&self, fixture_port: u16) -> u16 {
        self.ports[&fixture_port]
    }

    /// `http://127.0.0.1:<main listener><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port(10000))
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Envoy's log once it contains `needle` (the log file is flushed every 50 ms); panics
    /// with the log after 10 s.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy's log never said {needle:?}:\n{}",
                tail(&log, 100)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `handoff_idempotency_outcomes{outcome=<name>}`.
    pub async fn idempotency_outcome(&self, name: &str) -> f64 {
        self.stats()
            .await
            .get("handoff_idempotency_outcomes", &[("outcome", name)])
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `/stats/prometheus`, parsed into `name{labels}` -> value.
    pub async fn stats(&self) -> Stats {
        let text = h1()
            .get(self.admin_url("/stats/prometheus"))
            .send()
            .await
            .expect("admin reachable")
            .text()
            .await
            .expect("stats body");
        Stats::parse(&text)
    }

    /// `/stats/prometheus` once `ready` holds for it, for counters the filter adds once a tick
    /// (the canary's decisions: at least once a second); panics with `what` and the last figures
    /// of `metric` after 10 s.
    pub async fn stats_when(
        &self,
        metric: &str,
        what: &str,
        ready: impl Fn(&Stats) -> bool,
    ) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats().await;
            if ready(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 10 s; {metric} is {:?}",
                stats
                    .0
                    .iter()
                    .filter(|(k, _)| k.starts_with(metric))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops Envoy now (the handle's drop does the same).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log ({}) ---\n{}\n--- end of envoy log ---",
                self.log_path.display(),
                tail(&self.log(), 200)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn wait_for_ready(
    client: &reqwest::Client,
    admin: SocketAddr,
    child: &mut Child,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("Envoy exited with {status}"));
        }
        if let Ok(r) = client.get(format!("http://{admin}/ready")).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("not LIVE in time".to_string());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Prometheus text, as `name{label="v",...}` -> value, labels sorted.
#[derive(Debug, Default)]
pub struct Stats(pub HashMap<String, f64>);

impl Stats {
    pub fn parse(text: &str) -> Stats {
        let mut out = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
            labels.sort();
            let key = format!("{name}{{{}}}", labels.join(","));
            out.insert(key, value.parse().unwrap_or(f64::NAN));
        }
        Stats(out)
    }

    /// The value of `name` with exactly these labels (`&[("variant", "canary")]`). A series
    /// Envoy does not report fails the test (a renamed metric must not read as 0); use
    /// [`Stats::get_or_zero`] for one that exists only once counted.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = Stats::key(name, labels);
        match self.0.get(&key) {
            Some(v) => *v,
            None => panic!(
                "no metric {key} in /stats/prometheus; {}",
                self.similar(name)
            ),
        }
    }

    /// `handoff_canary_decisions{variant, reason}`, as [`Stats::get`].
    pub fn decisions(&self, variant: &str, reason: &str) -> f64 {
        self.get(
            "handoff_canary_decisions",
            &[("variant", variant), ("reason", reason)],
        )
    }

    /// [`Stats::get`] for a series that legitimately does not exist yet (a counter defined on
    /// first use, such as one labelled by a configured route name): 0 when absent.
    pub fn get_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .get(&Stats::key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Sum of `name` over all label sets; fails the test when Envoy reports no series of that
    /// name (see [`Stats::sum_or_zero`]).
    pub fn sum(&self, name: &str) -> f64 {
        assert!(
            self.has(name),
            "no metric {name} in /stats/prometheus; {}",
            self.similar(name)
        );
        self.sum_or_zero(name)
    }

    /// [`Stats::sum`] for a metric that legitimately does not exist yet: 0 when absent.
    pub fn sum_or_zero(&self, name: &str) -> f64 {
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum of `name` over the series that carry these labels (and any others): the decisions
    /// of one `reason` whatever their `variant`. Fails the test like [`Stats::sum`].
    pub fn sum_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let _ = self.sum(name);
        let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.trim_end_matches('}'), v)))
            .filter(|(l, _)| want.iter().all(|w| l.split(',').any(|x| x == w)))
            .map(|(_, v)| v)
            .sum()
    }

    /// Envoy reports at least one series of `name`.
    pub fn has(&self, name: &str) -> bool {
        let prefix = format!("{name}{{");
        self.0.keys().any(|k| k.starts_with(&prefix))
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> String {
        let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        l.sort();
        format!("{name}{{{}}}", l.join(","))
    }

    /// The series that share the first word of `name` after `handoff_`, for the failure message.
    fn similar(&self, name: &str) -> String {
        let stem: String = name.splitn(3, '_').take(2).collect::<Vec<_>>().join("_");
        let mut near: Vec<&str> = self
            .0
            .keys()
            .filter(|k| k.starts_with(&stem))
            .map(String::as_str)
            .collect();
        near.sort();
        format!("reported with that stem: [{}]", near.join(", "))
    }
}

/// Reads `LISTENING <addr>` from a child's stdout.
pub fn read_listening(child: &mut Child, what: &str) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    line.trim()
        .strip_prefix("LISTENING ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{what} did not start: {line:?}"))
}

/// The directory of cargo-built example binaries, next to the test executable.
pub fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("examples")
}

/// Lines of an Envoy log that show a crash or a filter failure: a Rust panic in the wasm, a
/// wasm trap, a failed proxy-wasm callback, an aborted VM. Empty when all is well.
pub fn crash_lines(log: &str) -> Vec<&str> {
    const MARKS: [&str; 7] = [
        "panicked",
        "wasm trap",
        "Function: proxy_on_",
        "failed to",
        "Wasm VM failed",
        "Plugin configured to fail",
        "unreachable",
    ];
    log.lines()
        .filter(|l| MARKS.iter().any(|m| l.contains(m)))
        .collect()
}

/// Lines that show the wasm code itself crashed (a panic, a trap, a failed callback), as
/// opposed to a configuration Envoy refused.
pub fn panic_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            [
                "panicked",
                "wasm trap",
                "Function: proxy_on_",
                "unreachable",
            ]
            .iter()
            .any(|m| l.contains(m))
        })
        .collect()
}

/// Asserts that Envoy is still serving (admin `/ready`) and that its log has no crash line.
pub async fn assert_survived(envoy: &Envoy) {
    let r = h1()
        .get(envoy.admin_url("/ready"))
        .send()
        .await
        .expect("Envoy admin still answers");
    assert_eq!(r.status(), 200, "Envoy not ready any more");
    let log = envoy.log();
    let bad = crash_lines(&log);
    assert!(
        bad.is_empty(),
        "crash lines in Envoy's log:\n{}",
        bad.join("\n")
    );
}

/// A raw HTTP/1.1 exchange over a fresh connection: writes `request` as is (so it can carry
/// bytes no HTTP client library would send) and reads until the server closes. Returns the
/// status (0 when the server closed without answering), the head and the body.
pub async fn raw_h1(port: u16, request: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // The server may answer and close before reading everything (a 431): ignore write errors.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer and no close within 30 s");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, body)
}

/// An HTTP/2 (h2c) POST whose body ends with trailers instead of END_STREAM on its last DATA
/// frame, as gRPC clients send it (reqwest cannot send request trailers). Returns the status,
/// the response headers and the body.
pub async fn h2_post_with_trailers(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    trailers: &[(&'static str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut trailer_map = hyper::HeaderMap::new();
    for (name, value) in trailers {
        trailer_map.insert(*name, value.parse().expect("trailer value"));
    }
    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(bytes::Bytes::copy_from_slice(body))),
        Ok(Frame::trailers(trailer_map)),
    ];
    let mut req = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(StreamBody::new(futures::stream::iter(frames)))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("an answer within 20 s")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("a body within 20 s")
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// Upstream clusters of a fixture spoken to over HTTP/2 (h2c), so response trailers reach
/// the filter.
pub fn h2_upstreams(cfg: &mut Value) {
    let clusters = cfg["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters");
    for c in clusters {
        c["typed_extension_protocol_options"] = serde_json::json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
}
