//! WebSockets at a drain, end to end: a real Envoy running handoff.wasm with `envoy/drain.yaml`
//! (upgrade_configs websocket), a WebSocket app and clients from tokio-tungstenite, and for
//! permessage-deflate (which tungstenite does not speak) Python's `websockets` on both ends
//! (tests/support/ws_deflate.py). Also here: how fast a drain start and a cancel reach every
//! worker, measured with a closed loop of requests through two workers.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::drain::{admin, drain_config_no_readiness, state, ADMIN};
use support::{wait_for, Backend, Envoy, EnvoyOpts};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

async fn start(upstream_port: u16, concurrency: u32, config: Value) -> Envoy {
    let mut opts = EnvoyOpts::new("drain")
        .port(8081, upstream_port)
        .plugin_config(config);
    opts.concurrency = concurrency;
    Envoy::start(opts).await
}

fn ws_url(envoy: &Envoy, path: &str) -> String {
    envoy.url(path).replacen("http://", "ws://", 1)
}

/// The WebSocket app behind Envoy, by path: `/echo` sends every message back, `/push` sends a
/// text message every 100 ms, `/fragments` sends one message in three fragments (the second
/// only once the test says so), `/silent` never sends. Every app connection records the Close
/// it received.
struct App {
    port: u16,
    closes: Arc<Mutex<Vec<(u16, String)>>>,
    first_fragment_sent: Arc<Notify>,
    send_the_rest: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let closes = Arc::new(Mutex::new(Vec::new()));
        let (first, rest) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (c, f, r) = (closes.clone(), first.clone(), rest.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (c, f, r) = (c.clone(), f.clone(), r.clone());
                tokio::spawn(async move {
                    let mut path = String::new();
                    // tungstenite's handshake callback type, not ours.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &Request, resp: Response| {
                        path = req.uri().path().to_string();
                        Ok(resp)
                    };
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                        return;
                    };
                    serve(ws, &path, c, f, r).await;
                });
            }
        });
        App {
            port,
            closes,
            first_fragment_sent: first,
            send_the_rest: rest,
            task,
        }
    }

    fn closes(&self) -> Vec<(u16, String)> {
        self.closes.lock().unwrap().clone()
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn serve(
    ws: Ws,
    path: &str,
    closes: Arc<Mutex<Vec<(u16, String)>>>,
    first_sent: Arc<Notify>,
    send_rest: Arc<Notify>,
) {
    let (mut tx, mut rx) = ws.split();
    let record = |m: &Message| {
        if let Message::Close(f) = m {
            let (code, reason) = f.as_ref().map_or((1005, String::new()), |f| {
                (u16::from(f.code), f.reason.to_string())
            });
            closes.lock().unwrap().push((code, reason));
        }
    };
    let fragment = |text: &str, op: Data, fin: bool| {
        Message::Frame(Frame::message(
            text.as_bytes().to_vec(),
            OpCode::Data(op),
            fin,
        ))
    };
    match path {
        "/fragments" => {
            let _ = tx.send(fragment("part1-", Data::Text, false)).await;
            first_sent.notify_one();
            send_rest.notified().await;
            let _ = tx.send(fragment("part2-", Data::Continue, false)).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tx.send(fragment("part3", Data::Continue, true)).await;
            let _ = tx.send(Message::text("after")).await;
        }
        "/push" => {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    m = rx.next() => match m {
                        Some(Ok(m)) if m.is_close() => { record(&m); break; }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                    _ = tick.tick() => {
                        n += 1;
                        if tx.send(Message::text(format!("tick {n}"))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    // Echo (or, on /silent, read only) until the Close, whose reply tungstenite sends itself.
    while let Some(Ok(m)) = rx.next().await {
        if m.is_close() {
            record(&m);
        } else if path == "/echo" && (m.is_text() || m.is_binary()) && tx.send(m).await.is_err() {
            return;
        }
    }
}

/// What one client saw, in order.
#[derive(Debug, Default)]
struct Seen {
    messages: Vec<String>,
    /// The migration message and when it came.
    migration: Option<(Value, Duration)>,
    close: Option<(u16, String, Duration)>,
    /// The migration message came before the Close.
    in_order: bool,
    error: Option<String>,
}

/// Reads `rx` to its end, timing events from `t0`.
async fn follow<S>(mut rx: S, t0: Instant) -> Seen
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut seen = Seen::default();
    while let Some(m) = rx.next().await {
        match m {
            Ok(Message::Text(t)) => match serde_json::from_str::<Value>(&t) {
                Ok(v) if v["type"] == "server_migration" => {
                    seen.migration = Some((v, t0.elapsed()));
                    seen.in_order = seen.close.is_none();
                }
                _ => seen.messages.push(t.to_string()),
            },
            Ok(Message::Close(f)) => {
                let (code, reason) = f.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                seen.close = Some((code, reason, t0.elapsed()));
            }
            Ok(_) => {}
            Err(e) => {
                seen.error = Some(e.to_string());
                break;
            }
        }
    }
    seen
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Client {
    tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("WebSocket {url}: {e}"))
        .0
}

#[tokio::test]
async fn without_a_drain_every_message_passes_unchanged() {
    let app = App::start().await;
    let envoy = start(app.port, 1, drain_config_no_readiness(|_| {})).await;
    let mut ws = connect(&ws_url(&envoy, "/echo")).await;
    let sizes = [0usize, 125, 126, 64 * 1024, 1024 * 1024];
    for size in sizes {
        let text: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let binary: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        for m in [Message::text(text.clone()), Message::binary(binary.clone())] {
            ws.send(m.clone()).await.unwrap();
            let back = ws.next().await.expect("an echo").unwrap();
            assert!(back == m, "{size} bytes came back changed");
        }
    }
    // A fragmented message (a ping between its fragments), reassembled by the app's library.
    for (text, op, fin) in [("one-", Data::Text, false), ("two-", Data::Continue, false)] {
        ws.send(Message::Frame(Frame::message(
            text.as_bytes().to_vec(),
            OpCode::Data(op),
            fin,
        )))
        .await
        .unwrap();
    }
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    ws.send(Message::Frame(Frame::message(
        b"three".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match ws.next().await.unwrap().unwrap() {
            Message::Pong(p) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
            Message::Text(t) => got.push(t.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, ["pong p", "one-two-three"]);
    ws.close(None).await.unwrap();
    let stats = envoy.stats().await;
    assert_eq!(stats.get("handoff_drain_websocket_malformed", &[]), 0.0);
    assert_eq!(stats.get("handoff_drain_websocket_migrations", &[]), 0.0);
}

/// `websockets` (Python) in the test venv: `make e2e` installs it.
fn python() -> std::path::PathBuf {
    support::root().join(".venv/bin/python")
}

#[tokio::test]
async fn permessage_deflate_passes_unchanged() {
    let script = support::root().join("tests/support/ws_deflate.py");
    let port = support::free_port();
    let mut server = Command::new(python())
        .arg(&script)
        .args(["serve", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python ws_deflate.py serve");
    support::read_listening(&mut server, "ws_deflate.py");
    let envoy = start(port, 1, drain_config_no_readiness(|_| {})).await;
    let url = ws_url(&envoy, "/echo");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args(["client", &url])
            .output()
            .expect("python ws_deflate.py client")
    })
    .await
    .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("permessage-deflate"), "{stdout}");
    assert_eq!(
        envoy
            .stats()
            .await
            .get("handoff_drain_websocket_malformed", &[]),
        0.0
    );
}

async fn prestop(envoy: &Envoy, args: &'static [&'static str]) -> std::process::Output {
    let script = support::root().join("istio/prestop-drain.sh");
    let admin_url = envoy.url(ADMIN);
    tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg(script)
            .args(["-u", &admin_url])
            .args(args)
            .output()
            .expect("sh")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_drain_migrates_then_closes_50_connections_across_the_jitter() {
    let app = App::start().await;
    let jitter = 3000u64;
    let envoy = start(
        app.port,
        2,
        drain_config_no_readiness(|d| {
            d["reconnect_jitter_ms"] = json!(jitter);
            d["grace_s"] = json!(20);
        }),
    )
    .await;
    let n = 50;
    let mut rxs = Vec::new();
    let mut txs = Vec::new();
    for _ in 0..n {
        let (tx, rx) = connect(&ws_url(&envoy, "/push")).await.split();
        txs.push(tx);
        rxs.push(rx);
    }
    wait_for("50 in flight", WAIT, || async {
        (state(&envoy).await["inflight"] == n).then_some(())
    })
    .await;
    assert_eq!(
        envoy
            .stats()
            .await
            .get("handoff_drain_websockets_open", &[]),
        f64::from(n)
    );
    // The preStop script starts the drain and waits until nothing is in flight: every socket
    // closed.
    let t0 = Instant::now();
    let clients: Vec<_> = rxs
        .into_iter()
        .map(|rx| tokio::spawn(follow(rx, t0)))
        .collect();
    let out = prestop(&envoy, &["-d", "30", "-i", "0.2"]).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let mut closes_ms = Vec::new();
    for c in clients {
        let seen = tokio::time::timeout(WAIT, c)
            .await
            .expect("closed")
            .unwrap();
        let (m, _) = seen
            .migration
            .as_ref()
            .unwrap_or_else(|| panic!("{seen:?}"));
        let after = m["reconnect_after_ms"]
            .as_u64()
            .expect("reconnect_after_ms");
        assert!(after <= jitter, "{seen:?}");
        let (code, reason, at) = seen.close.clone().unwrap_or_else(|| panic!("{seen:?}"));
        assert_eq!((code, reason.as_str()), (1001, "going away"), "{seen:?}");
        assert!(seen.in_order && seen.error.is_none(), "{seen:?}");
        // Closed at the connection's own delay (the next frame after it, 100 ms apart).
        let at = at.as_millis() as u64;
        assert!(
            at + 300 >= after && at <= after + 2500,
            "closed at {at} ms for a delay of {after} ms"
        );
        closes_ms.push(at);
    }
    closes_ms.sort();
    let spread = closes_ms[n as usize - 1] - closes_ms[0];
    assert!(
        spread >= jitter / 2,
        "close times spread over {spread} ms only: {closes_ms:?}"
    );
    wait_for("the app saw 50 Closes", WAIT, || async {
        (app.closes().len() == n as usize).then_some(())
    })
    .await;
    assert!(app
        .closes()
        .iter()
        .all(|(code, reason)| (*code, reason.as_str()) == (1001, "going away")));
    let s = state(&envoy).await;
    assert_eq!(
        (s["state"].as_str(), s["inflight"].as_u64()),
        (Some("draining"), Some(0))
    );
    wait_for("websocket metrics", WAIT, || async {
        let st = envoy.stats().await;
        let want = f64::from(n);
        (st.get("handoff_drain_websockets_open", &[]) == 0.0
            && st.get("handoff_drain_websocket_migrations", &[]) == want
            && st.get("handoff_drain_websocket_closes", &[]) == want)
            .then_some(())
    })
    .await;
    drop(txs);
}

#[tokio::test]
async fn the_migration_message_waits_for_the_last_fragment() {
    let app = App::start().await;
    let envoy = start(
        app.port,
        1,
        drain_config_no_readiness(|d| {
            // The longest delays and grace: only the migration message is due in this test.
            d["reconnect_jitter_ms"] = json!(3_600_000);
            d["grace_s"] = json!(3600);
        }),
    )
    .await;
    let mut ws = connect(&ws_url(&envoy, "/fragments")).await;
    tokio::time::timeout(WAIT, app.first_fragment_sent.notified())
        .await
        .expect("first fragment sent");
    // Let the first fragment pass through Envoy before the drain starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin(&envoy, reqwest::Method::POST, "").await;
    // The worker's tick (100 ms) has seen the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.send_the_rest.notify_one();
    // A migration message inside the fragmented one would be a protocol error here.
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message")
        {
            Some(Ok(Message::Text(t))) => got.push(t.to_string()),
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got[0], "part1-part2-part3");
    let m: Value = serde_json::from_str(&got[1]).expect("the migration message");
    assert_eq!(m["type"], "server_migration");
    assert!(m["reconnect_after_ms"].as_u64().unwrap() <= 3_600_000);
    assert_eq!(got[2], "after");
}

#[tokio::test]
async fn a_send_only_client_is_closed_and_an_idle_one_is_counted() {
    let app = App::start().await;
    let envoy = start(
        app.port,
        2,
        drain_config_no_readiness(|d| {
            d["reconnect_jitter_ms"] = json!(500);
            d["grace_s"] = json!(2);
        }),
    )
    .await;
    let (mut sender, sender_rx) = connect(&ws_url(&envoy, "/silent")).await.split();
    let idle = connect(&ws_url(&envoy, "/silent")).await;
    wait_for("2 in flight", WAIT, || async {
        (state(&envoy).await["inflight"] == 2).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let seen = tokio::spawn(follow(sender_rx, t0));
    admin(&envoy, reqwest::Method::POST, "").await;
    let pump = tokio::spawn(async move {
        for i in 0.. {
            if sender.send(Message::text(format!("up {i}"))).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let seen = tokio::time::timeout(WAIT, seen)
        .await
        .expect("closed")
        .unwrap();
    pump.abort();
    let (code, reason, at) = seen.close.clone().unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!((code, reason.as_str()), (1001, "going away"));
    assert!(at < Duration::from_millis(2500), "closed after {at:?}");
    wait_for("the app saw the Close", WAIT, || async {
        (app.closes() == [(1001, "going away".to_string())]).then_some(())
    })
    .await;
    // The idle connection: no frame, so no callback handoff could close it in. It is counted
    // when the grace ends, and still in flight.
    wait_for("idle at grace end", WAIT, || async {
        (envoy
            .stats()
            .await
            .get("handoff_drain_websocket_idle_at_grace_end", &[])
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(state(&envoy).await["inflight"], 1);
    drop(idle);
    wait_for("inflight 0", WAIT, || async {
        (state(&envoy).await["inflight"] == 0).then_some(())
    })
    .await;
    // Drained: a new upgrade gets the drained 503 like any other request.
    let err = tokio_tungstenite::connect_async(ws_url(&envoy, "/echo"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test]
async fn an_invalid_websocket_section_is_refused_naming_the_field() {
    for (key, value) in [
        ("close_code", json!(1006)),
        ("close_reason", json!("x".repeat(124))),
    ] {
        let opts = EnvoyOpts::new("drain").plugin_config(drain_config_no_readiness(|d| {
            d["websocket"][key] = value.clone();
        }));
        let log = Envoy::start_expecting_failure(opts).await;
        let want = format!("invalid configuration at `drain.websocket.{key}`");
        assert!(log.contains(&want), "{want}\n{log}");
    }
}

/// A closed loop of requests on fresh connections (so both workers answer) for `for_ms`:
/// (ms since `t0` when sent, status, reconnect hint present).
async fn closed_loop(envoy: &Envoy, t0: Instant, for_ms: u64) -> Vec<(u64, u16, bool)> {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = envoy.url("/pay");
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                let mut out = Vec::new();
                while t0.elapsed() < Duration::from_millis(for_ms) {
                    let sent = t0.elapsed().as_millis() as u64;
                    let r = client.get(&url).send().await.expect("request");
                    let hint = r.headers().contains_key("x-handoff-reconnect-after-ms");
                    out.push((sent, r.status().as_u16(), hint));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test]
async fn a_start_and_a_cancel_reach_every_worker_within_250_ms() {
    let app = Backend::start("app", "v1");
    // Plain requests: the websocket part plays no role here.
    let config = drain_config_no_readiness(|d| {
        d.as_object_mut().unwrap().remove("websocket");
    });
    let envoy = start(app.addr.port(), 2, config).await;
    // Start: every request sent 250 ms after the POST answered carries the hint.
    admin(&envoy, reqwest::Method::POST, "?grace_s=600").await;
    let t0 = Instant::now();
    let seen = closed_loop(&envoy, t0, 1000).await;
    let late: Vec<_> = seen
        .iter()
        .filter(|(at, _, hint)| *at >= 250 && !hint)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} without the hint: {late:?}",
        late.len(),
        seen.len()
    );
    // Drained at once, then cancelled: no request after the DELETE is refused.
    admin(&envoy, reqwest::Method::DELETE, "").await;
    admin(&envoy, reqwest::Method::POST, "?grace_s=0").await;
    let seen = closed_loop(&envoy, Instant::now(), 500).await;
    assert!(seen
        .iter()
        .filter(|(at, _, _)| *at >= 250)
        .all(|(_, s, _)| *s == 503));
    admin(&envoy, reqwest::Method::DELETE, "").await;
    let seen = closed_loop(&envoy, Instant::now(), 500).await;
    let refused = seen.iter().filter(|(_, s, _)| *s == 503).count();
    assert_eq!(
        refused,
        0,
        "{refused} of {} answered 503 after the DELETE",
        seen.len()
    );
    eprintln!(
        "closed loop after DELETE: {} requests, none refused",
        seen.len()
    );
}

/// An HTTP/2 stream (RFC 8441 extended CONNECT) as the byte stream a WebSocket runs over.
struct H2Stream {
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    buf: bytes::Bytes,
}

impl tokio::io::AsyncRead for H2Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                let n = out.remaining().min(this.buf.len());
                out.put_slice(&this.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    this.buf = b;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl tokio::io::AsyncWrite for H2Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(data.len());
        match std::task::ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(data.len());
                this.send
                    .send_data(bytes::Bytes::copy_from_slice(&data[..n]), false)
                    .map_err(std::io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(std::io::Error::other(e))),
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let _ = self.get_mut().send.send_data(bytes::Bytes::new(), true);
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn an_http2_extended_connect_websocket_is_drained_too() {
    let app = App::start().await;
    let envoy = start(
        app.port,
        1,
        drain_config_no_readiness(|d| {
            d["reconnect_jitter_ms"] = json!(500);
            d["grace_s"] = json!(5);
        }),
    )
    .await;
    let port = envoy.port(10000);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // Envoy's SETTINGS arrive with the first exchange.
    wait_for("SETTINGS_ENABLE_CONNECT_PROTOCOL", WAIT, || {
        let on = client.is_extended_connect_protocol_enabled();
        async move { on.then_some(()) }
    })
    .await;
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("http://127.0.0.1:{port}/push"))
        .header("sec-websocket-version", "13")
        // The HTTP/1.1 app behind Envoy checks the key of the upgrade Envoy makes of this.
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .body(())
        .unwrap();
    let (response, send) = client.send_request(req, false).expect("CONNECT sent");
    let response = response.await.expect("CONNECT answered");
    assert_eq!(response.status(), 200, "{response:?}");
    let stream = H2Stream {
        send,
        recv: response.into_body(),
        buf: bytes::Bytes::new(),
    };
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let (_tx, mut rx) = ws.split();
    match tokio::time::timeout(WAIT, rx.next())
        .await
        .expect("a message")
    {
        Some(Ok(Message::Text(t))) => assert!(t.starts_with("tick"), "{t}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        envoy
            .stats()
            .await
            .get("handoff_drain_websockets_open", &[]),
        1.0
    );
    admin(&envoy, reqwest::Method::POST, "").await;
    let seen = tokio::time::timeout(WAIT, follow(rx, Instant::now()))
        .await
        .expect("closed");
    assert!(seen.migration.is_some() && seen.in_order, "{seen:?}");
    assert_eq!(
        seen.close.as_ref().map(|c| (c.0, c.1.as_str())),
        Some((1001, "going away")),
        "{seen:?}"
    );
    wait_for("the app saw the Close", WAIT, || async {
        (app.closes() == [(1001, "going away".to_string())]).then_some(())
    })
    .await;
}
