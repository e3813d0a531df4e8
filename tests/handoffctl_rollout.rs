//! `handoffctl rollout` against a real etcd (tests/support/etcd.rs): what each command writes
//! in the record, the compare-and-swap lost to a concurrent writer, etcd unreachable, etcd's
//! authentication (a user whose role covers the prefix and one without it), and TLS with
//! client certificates (etcd's --client-cert-auth) from a CA made in the test.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};
use support::cli::{expect, stdout};
use support::etcd::Etcd;
use support::pki::Pki;

const PREFIX: &str = "/handoff/rollout/";
const SALT: &str = "checkout-2026";

fn key() -> String {
    format!("{PREFIX}{SALT}")
}

async fn ctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoffctl"));
    command.args(args).env_remove("HANDOFF_ETCD_PASSWORD");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().await.expect("handoffctl runs")
}

/// `handoffctl rollout SUB --etcd URL --salt SALT EXTRA...`
async fn rollout(url: &str, sub: &[&str], extra: &[&str]) -> Output {
    let mut args = vec!["rollout"];
    args.extend_from_slice(sub);
    args.extend_from_slice(&["--etcd", url, "--salt", SALT]);
    args.extend_from_slice(extra);
    ctl(&args, &[]).await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// POST `path` to etcd's JSON gateway: the status and the JSON answer.
async fn gateway(url: &str, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut request = support::h1().post(format!("{url}{path}")).json(&body);
    if let Some(t) = token {
        request = request.header("authorization", t);
    }
    let r = request.send().await.expect("etcd reachable");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The record as stored and its mod_revision, read directly from etcd.
async fn stored(url: &str) -> Option<(Value, i64)> {
    let (status, v) = gateway(
        url,
        "/v3/kv/range",
        json!({"key": STANDARD.encode(key())}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let kv = v["kvs"].get(0)?;
    let value = STANDARD.decode(kv["value"].as_str()?).unwrap();
    let rev = kv["mod_revision"].as_str()?.parse().unwrap();
    Some((
        serde_json::from_slice(&value).expect("the record is JSON"),
        rev,
    ))
}

async fn put_record(url: &str, record: &Value) {
    put(url, &key(), record.to_string().as_bytes()).await;
}

async fn put(url: &str, key: &str, value: &[u8]) {
    let body = json!({"key": STANDARD.encode(key), "value": STANDARD.encode(value)});
    let (status, v) = gateway(url, "/v3/kv/put", body, None).await;
    assert_eq!(status, 200, "{v}");
}

/// A record as the fleet judge writes it: active, the configured percent, a fleet window.
fn judged_record() -> Value {
    json!({
        "state": "active", "updated_ms": 1_764_620_000_000u64, "by": "fleet:00000000000000aa",
        "reason": "",
        "window": {"window": 29_410_333, "window_s": 60, "envoys": 3, "bad_windows": 1,
                   "bad_errors": true, "bad_latency": false, "quantile": 0.99,
                   "stable": {"requests": 1200, "errors": 3, "quantile_ms": 41.5},
                   "canary": {"requests": 130, "errors": 20, "quantile_ms": 310}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_writes_the_record_as_the_contract_says() {
    let etcd = Etcd::start().await;
    let url = etcd.url("");

    // No record: active at the configured percent; resume has nothing to do.
    let o = rollout(&url, &["status"], &[]).await;
    expect(&o, 0);
    assert_eq!(stdout(&o), "no record: active at the configured percent\n");
    let o = rollout(&url, &["status", "--json"], &[]).await;
    expect(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        json!({"key": key(), "record": null, "judge": null, "reporting": 0})
    );
    let o = rollout(&url, &["resume"], &[]).await;
    expect(&o, 0);
    assert!(stdout(&o).contains("already active"), "{}", stdout(&o));
    assert!(
        stored(&url).await.is_none(),
        "resume of nothing wrote a record"
    );

    // set-percent creates the record (the key was absent: create_revision == 0).
    let before = now_ms();
    let o = rollout(&url, &["set-percent", "30"], &[]).await;
    expect(&o, 0);
    let (r, _) = stored(&url).await.expect("a record");
    assert_eq!(r["state"], "active");
    assert_eq!(r["percent"], 30);
    assert_eq!(r["by"], "handoffctl");
    let updated = r["updated_ms"].as_u64().unwrap();
    assert!((before..=now_ms()).contains(&updated), "{updated}");

    // The judge writes its window (and holds the leader key; two Envoys report counts);
    // abort keeps the window (and the percent).
    put(&url, &format!("{}/leader", key()), b"00000000000000aa").await;
    for id in ["00000000000000aa", "00000000000000bb"] {
        put(&url, &format!("{}/counts/{id}", key()), b"\x01").await;
    }
    let mut judged = judged_record();
    judged["percent"] = json!(30);
    put_record(&url, &judged).await;
    let o = rollout(
        &url,
        &["abort"],
        &["--reason", "payments 5xx after deploy 4411"],
    )
    .await;
    expect(&o, 0);
    let (r, rev_aborted) = stored(&url).await.unwrap();
    assert_eq!(r["state"], "aborted");
    assert_eq!(r["percent"], 30);
    assert_eq!(r["by"], "handoffctl");
    assert_eq!(r["reason"], "payments 5xx after deploy 4411");
    assert_eq!(r["window"], judged["window"], "abort kept the fleet window");
    assert!(r["updated_ms"].as_u64().unwrap() > 1_764_620_000_000);

    // status: the record and the fleet window per cohort.
    let o = rollout(&url, &["status"], &[]).await;
    expect(&o, 0);
    let out = stdout(&o);
    for needle in [
        "state: aborted",
        "percent: 30",
        "by: handoffctl",
        "reason: payments 5xx after deploy 4411",
        "fleet window 29410333 (60 s, 3 Envoys, bad windows in a row: 1 (errors))",
        "p99 (ms)",
        "judge: envoy:00000000000000aa",
        "envoys reporting counts: 2",
    ] {
        assert!(out.contains(needle), "status lacks {needle:?}:\n{out}");
    }
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("stable") || l.trim_start().starts_with("canary"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["stable", "1200", "3", "0.25%", "41.5"],
            ["canary", "130", "20", "15.38%", "310.0"]
        ],
        "{out}"
    );
    let updated = r["updated_ms"].as_u64().unwrap();
    let day = time::OffsetDateTime::from_unix_timestamp((updated / 1000) as i64)
        .unwrap()
        .date()
        .to_string();
    assert!(out.contains(&format!("updated: {day}T")), "UTC time: {out}");
    let o = rollout(&url, &["status", "--json"], &[]).await;
    expect(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["record"], r);
    assert_eq!(v["mod_revision"], rev_aborted);
    assert_eq!(v["judge"], "00000000000000aa");
    assert_eq!(v["reporting"], 2);

    // set-percent while aborted: the percent changes, the abort stays.
    let o = rollout(&url, &["set-percent", "12.5"], &[]).await;
    expect(&o, 0);
    assert!(stdout(&o).contains("aborted"), "{}", stdout(&o));
    let (r, _) = stored(&url).await.unwrap();
    assert_eq!(
        (r["state"].as_str(), r["percent"].as_f64()),
        (Some("aborted"), Some(12.5))
    );

    // resume: active, percent and window kept; a second resume changes nothing.
    let o = rollout(&url, &["resume"], &[]).await;
    expect(&o, 0);
    let (r, rev) = stored(&url).await.unwrap();
    assert_eq!(r["state"], "active");
    assert_eq!(r["percent"], 12.5);
    assert_eq!(r["by"], "handoffctl");
    assert_eq!(r["window"], judged["window"]);
    let o = rollout(&url, &["resume"], &[]).await;
    expect(&o, 0);
    assert_eq!(stdout(&o), "already active: nothing to do\n");
    assert_eq!(stored(&url).await.unwrap().1, rev, "a no-op resume wrote");

    // Another prefix is another record.
    let o = rollout(&url, &["status"], &["--prefix", "/other/"]).await;
    expect(&o, 0);
    assert!(stdout(&o).starts_with("no record"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_percent_takes_0_to_100_and_nothing_else() {
    let etcd = Etcd::start().await;
    let url = etcd.url("");
    for bad in ["101", "-1", "abc", "NaN", "30%"] {
        let o = rollout(&url, &["set-percent", bad], &[]).await;
        let err = expect(&o, 2);
        assert!(err.contains("from 0 to 100"), "{bad}: {err}");
    }
    let o = rollout(&url, &["set-percent"], &[]).await;
    expect(&o, 2);
    assert!(
        stored(&url).await.is_none(),
        "a refused percent wrote a record"
    );
    for (p, want) in [("0", 0.0), ("100", 100.0), ("0.01", 0.01)] {
        expect(&rollout(&url, &["set-percent", p], &[]).await, 0);
        assert_eq!(
            stored(&url).await.unwrap().0["percent"].as_f64(),
            Some(want)
        );
    }
    // --reason belongs to abort only; a prefix must be a directory.
    expect(&rollout(&url, &["resume"], &["--reason", "x"]).await, 2);
    expect(
        &rollout(&url, &["status"], &["--prefix", "no-slash"]).await,
        2,
    );
}

/// Between handoffctl's read of the record and its compare-and-swap, another writer (an
/// Envoy's guard, another operator) changes the record: an HTTP proxy in front of etcd writes
/// the record itself when it sees the transaction, then forwards it.
async fn interfering_proxy(etcd_url: String, concurrent: Value) -> String {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (etcd_url, concurrent) = (etcd_url.clone(), concurrent.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (etcd_url, concurrent) = (etcd_url.clone(), concurrent.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        if path == "/v3/kv/txn" {
                            put_record(&etcd_url, &concurrent).await;
                        }
                        let r = support::h1()
                            .post(format!("{etcd_url}{path}"))
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .expect("etcd reachable");
                        let status = r.status();
                        let bytes = r.bytes().await.expect("etcd answer");
                        let mut answer = hyper::Response::new(Full::new(bytes));
                        *answer.status_mut() = status;
                        Ok::<_, hyper::Error>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_underneath_is_never_overwritten() {
    let etcd = Etcd::start().await;
    let url = etcd.url("");
    // An Envoy's guard aborts while the operator raises the percent.
    let mut guard_abort = judged_record();
    guard_abort["state"] = json!("aborted");
    guard_abort["by"] = json!("envoy:00000000000000bb");
    guard_abort["reason"] =
        json!("errors 15.38% (20/130) vs stable 0.25% (3/1200), 2 windows of 60 s");
    let proxy = interfering_proxy(url.clone(), guard_abort.clone()).await;

    // The record absent when read (create_revision == 0 compared), present when written.
    let o = rollout(&proxy, &["set-percent", "50"], &[]).await;
    let err = expect(&o, 4);
    assert_eq!(
        err.trim_end(),
        "handoffctl: the record changed underneath: re-run `handoffctl rollout status`"
    );
    assert_eq!(
        stored(&url).await.unwrap().0,
        guard_abort,
        "the other write stands"
    );

    // The record present when read (mod_revision compared), rewritten before the write.
    for sub in [&["resume"][..], &["abort"], &["set-percent", "10"]] {
        let o = rollout(&proxy, sub, &[]).await;
        expect(&o, 4);
        assert_eq!(
            stored(&url).await.unwrap().0,
            guard_abort,
            "{sub:?} overwrote"
        );
    }
    // Directly, the same commands go through.
    expect(&rollout(&url, &["resume"], &[]).await, 0);
    assert_eq!(stored(&url).await.unwrap().0["state"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_exits_3_and_names_the_url() {
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}");
    for sub in [
        &["status"][..],
        &["abort"],
        &["resume"],
        &["set-percent", "5"],
    ] {
        let o = rollout(&url, sub, &[]).await;
        let err = expect(&o, 3);
        assert!(
            err.contains(&format!("cannot reach etcd at {url}")),
            "{sub:?}: {err}"
        );
    }
    let o = rollout("etcd:2379", &["status"], &[]).await;
    let err = expect(&o, 2);
    assert!(err.contains("http:// or https://"), "{err}");
}

/// The steps that turn etcd's authentication on: `root` (root role), `handoff` with a role that
/// can read and write the rollout prefix only, and `intruder` with no role.
fn auth_steps() -> Vec<(&'static str, Value)> {
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    vec![
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "root-pw"}),
        ),
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/role/add", json!({"name": "handoff-rollout"})),
        (
            "/v3/auth/role/grant",
            json!({"name": "handoff-rollout", "perm": {"permType": "READWRITE",
                   "key": STANDARD.encode(PREFIX), "range_end": STANDARD.encode(&end)}}),
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "handoff", "password": "s3cret"}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "handoff", "role": "handoff-rollout"}),
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "intruder", "password": "pw"}),
        ),
        ("/v3/auth/enable", json!({})),
    ]
}

async fn enable_auth(url: &str) {
    for (path, body) in auth_steps() {
        let (status, v) = gateway(url, path, body, None).await;
        assert_eq!(status, 200, "{path}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_only_a_user_whose_role_covers_the_prefix_gets_in() {
    let etcd = Etcd::start().await;
    let url = etcd.url("");
    enable_auth(&url).await;

    // No credentials.
    let err = expect(&rollout(&url, &["status"], &[]).await, 3);
    assert!(err.contains("pass --user"), "{err}");
    // A wrong password.
    let err = expect(
        &rollout(&url, &["abort"], &["--user", "handoff:wrong"]).await,
        3,
    );
    assert!(
        err.contains("refused user `handoff`") && err.contains("authentication failed"),
        "{err}"
    );
    // A user without the role.
    for sub in [&["status"][..], &["abort"]] {
        let err = expect(&rollout(&url, sub, &["--user", "intruder:pw"]).await, 3);
        assert!(err.contains("permission denied"), "{sub:?}: {err}");
    }
    // The role's user, outside the prefix.
    let err = expect(
        &rollout(
            &url,
            &["status"],
            &["--user", "handoff:s3cret", "--prefix", "/elsewhere/"],
        )
        .await,
        3,
    );
    assert!(err.contains("permission denied"), "{err}");
    // No password at all: a usage error, nothing sent.
    let err = expect(&rollout(&url, &["status"], &["--user", "handoff"]).await, 2);
    assert!(err.contains("HANDOFF_ETCD_PASSWORD"), "{err}");

    // The role's user: --user NAME:PASSWORD, and the password from the environment.
    let o = rollout(
        &url,
        &["abort"],
        &["--user", "handoff:s3cret", "--reason", "by auth"],
    )
    .await;
    expect(&o, 0);
    let mut args = vec![
        "rollout", "status", "--json", "--etcd", &url, "--salt", SALT,
    ];
    args.extend(["--user", "handoff"]);
    let o = ctl(&args, &[("HANDOFF_ETCD_PASSWORD", "s3cret")]).await;
    expect(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["record"]["state"], "aborted");
    assert_eq!(v["record"]["reason"], "by auth");
}

/// `rollout SUB` with the CA and the client certificate `cert` (none: `--cacert` only), then
/// `extra`.
async fn over_tls(
    url: &str,
    sub: &[&str],
    pki: &Pki,
    cert: Option<&str>,
    extra: &[&str],
) -> Output {
    let mut flags = match cert {
        Some(name) => pki.flags(name),
        None => vec!["--cacert".to_string(), pki.path("ca.pem")],
    };
    flags.extend(extra.iter().map(|e| e.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    rollout(url, sub, &flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_client_certificates() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.tls()).await;
    let url = etcd.url("");
    assert!(url.starts_with("https://"), "{url}");
    let unreachable = format!("cannot reach etcd at {url}");

    // The CA and a client certificate it signed: in.
    let o = over_tls(
        &url,
        &["abort"],
        &pki,
        Some("client"),
        &["--reason", "over TLS"],
    )
    .await;
    expect(&o, 0);
    let o = over_tls(&url, &["status"], &pki, Some("client"), &[]).await;
    expect(&o, 0);
    assert!(stdout(&o).contains("reason: over TLS"), "{}", stdout(&o));
    // A client certificate with a Common Name, while etcd's authentication is off: in.
    expect(
        &over_tls(&url, &["status"], &pki, Some("client-cn"), &[]).await,
        0,
    );

    // Without the CA, the server's certificate is not trusted.
    let (cert, key) = (pki.path("client.pem"), pki.path("client-key.pem"));
    let err = expect(
        &rollout(&url, &["status"], &["--cert", &cert, "--key", &key]).await,
        3,
    );
    assert!(err.contains(&unreachable), "{err}");
    // Without a client certificate, or with another CA's, etcd refuses the handshake.
    for cert in [None, Some("stranger")] {
        let err = expect(&over_tls(&url, &["status"], &pki, cert, &[]).await, 3);
        assert!(err.contains(&unreachable), "{cert:?}: {err}");
    }

    // etcd's authentication on top (set up over TLS with the client certificate).
    let agent = pki.agent("client");
    for (path, body) in auth_steps() {
        let r = agent
            .post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .send(body.to_string())
            .expect("etcd over TLS");
        assert_eq!(r.status(), 200, "{path}");
    }
    // The certificate alone is not a user through the JSON gateway ...
    let err = expect(
        &over_tls(&url, &["status"], &pki, Some("client"), &[]).await,
        3,
    );
    assert!(err.contains("pass --user"), "{err}");
    // ... nor a certificate whose Common Name is the user's name: the gateway does not map a
    // CN to a user, and refuses such a certificate rather than act as the wrong one ...
    for extra in [&[][..], &["--user", "handoff:s3cret"]] {
        let err = expect(
            &over_tls(&url, &["status"], &pki, Some("client-cn"), extra).await,
            3,
        );
        assert!(
            err.contains("CommonName") && err.contains("gateway"),
            "{err}"
        );
    }
    // ... the user's password is, over the same TLS connection.
    let user = ["--user", "handoff:s3cret"];
    expect(
        &over_tls(&url, &["resume"], &pki, Some("client"), &user).await,
        0,
    );
    let intruder = ["--user", "intruder:pw"];
    let err = expect(
        &over_tls(&url, &["abort"], &pki, Some("client"), &intruder).await,
        3,
    );
    assert!(err.contains("permission denied"), "{err}");

    // Flag mistakes are usage errors.
    let ca = pki.path("ca.pem");
    expect(
        &over_tls(&url, &["status"], &pki, None, &["--cert", &cert]).await,
        2,
    );
    let plain = url.replacen("https://", "http://", 1);
    expect(&rollout(&plain, &["status"], &["--cacert", &ca]).await, 2);
    let err = expect(
        &rollout(&url, &["status"], &["--cacert", "/nonexistent.pem"]).await,
        1,
    );
    assert!(err.contains("/nonexistent.pem"), "{err}");
}
