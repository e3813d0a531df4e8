//! End-to-end harness: real Envoy processes (the `.venv` build, or `$ENVOY_BIN`) running the
//! freshly built `handoff.wasm` with a fixture from `envoy/`, real upstream processes (the
//! `payments` example), and HTTP/1.1 and HTTP/2 clients. Every process started here is stopped
//! when its handle is dropped, pass or fail; Envoy's log is printed when a test fails.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod backend;
pub mod drain;
pub mod etcd;
pub mod lds;
pub mod tokens;
pub use backend::Backend;

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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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

impl Envoy {
    /// Starts Envoy and waits until its admin endpoint reports LIVE.
    pub async fn start(opts: EnvoyOpts) -> Envoy {
        let mut envoy = Envoy::spawn(opts);
        let admin = envoy.admin;
        let client = h1();
        let mut child = envoy.child.take().expect("child");
        let log_path = envoy.log_path.clone();
        let ready = wait_for_ready(&client, admin, &mut child, Duration::from_secs(60)).await;
        envoy.child = Some(child);
        if let Err(why) = ready {
            panic!(
                "Envoy did not become ready: {why}\n--- envoy log ---\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        envoy
    }

    /// Starts Envoy expecting it to refuse the configuration; returns its log once it exited.
    pub async fn start_expecting_failure(opts: EnvoyOpts) -> String {
        let mut envoy = Envoy::spawn(opts);
        let mut child = envoy.child.take().expect("child");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(!status.success(), "Envoy exited successfully");
                return envoy.log();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("Envoy kept running with a bad config:\n{}", envoy.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn spawn(mut opts: EnvoyOpts) -> Envoy {
        let mut cfg = load_fixture(&opts.fixture);
        let wasm = wasm_path();
        let plugin = opts.plugin_config.take();
        visit_wasm_configs(&mut cfg, &mut |c| {
            c["vm_config"]["code"]["local"]["filename"] = Value::from(wasm.display().to_string());
            if let Some(p) = &plugin {
                c["configuration"]["value"] = Value::from(p.to_string());
            }
        });
        let mut ports = opts.ports.clone();
        remap_ports(&mut cfg, &mut ports);
        if let Some(edit) = opts.edit.take() {
            edit(&mut cfg);
        }
        let admin_port = cfg
            .pointer("/admin/address/socket_address/port_value")
            .and_then(Value::as_u64)
            .expect("fixture has an admin port") as u16;
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let log_path = dir.path().join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &opts.concurrency.to_string()])
            .args(["--disable-hot-restart", "-l", "info"])
            // Envoy buffers its log file (10 s by default): flush quickly so a test that
            // reads the log sees what already happened.
            .args(["--file-flush-interval-msec", "50"])
            .args(&opts.args)
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
            ports,
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

    /// The value of `name` with exactly these labels (`&[("variant", "canary")]`), 0 if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        l.sort();
        self.0
            .get(&format!("{name}{{{}}}", l.join(",")))
            .copied()
            .unwrap_or(0.0)
    }

    /// Sum of `name` over all label sets.
    pub fn sum(&self, name: &str) -> f64 {
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
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
