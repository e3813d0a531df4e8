//! One closed loop of `make drain-clients` (bench/drain-clients/run.py): `--concurrency` tasks
//! share one reqwest client (its own pool) and send GET requests back to back until stdin
//! closes. Prints `READY` once the first request succeeded, then, at the end, one JSON line:
//! the client's versions and a record per request `[start unix ms, duration ms, status (0 on
//! a transport error), error, retry-after]`.
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The innermost cause, shortened: what a user would see in a log line.
fn error_class(e: &reqwest::Error) -> String {
    let mut kind = if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_request() {
        "request"
    } else if e.is_body() {
        "body"
    } else {
        "other"
    }
    .to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(l) = last {
        kind.push_str(": ");
        kind.push_str(&l.chars().take(120).collect::<String>());
    }
    kind
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut url, mut proto, mut concurrency) = (String::new(), "h1".to_string(), 4usize);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--url" => url = v,
            "--proto" => proto = v,
            "--concurrency" => concurrency = v.parse().expect("--concurrency N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    let client = match proto.as_str() {
        "h1" => builder.http1_only(),
        "h2" => builder.http2_prior_knowledge(),
        other => panic!("--proto h1|h2, not {other}"),
    }
    .build()
    .expect("client");
    // Warm up: the harness starts its clock once the client works.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(&url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "no 2xx from {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("READY");

    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin_closed = tokio::spawn({
        let stopped = stopped.clone();
        async move {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let records: Arc<Mutex<Vec<Value>>> = Arc::default();
    let loops: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, records, stopped) = (
                client.clone(),
                url.clone(),
                records.clone(),
                stopped.clone(),
            );
            tokio::spawn(async move {
                while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = now_ms();
                    let start = Instant::now();
                    let rec = match client.get(&url).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let ra = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            match r.bytes().await {
                                Ok(_) => json!([
                                    t,
                                    start.elapsed().as_secs_f64() * 1000.0,
                                    status,
                                    "",
                                    ra
                                ]),
                                Err(e) => json!([
                                    t,
                                    start.elapsed().as_secs_f64() * 1000.0,
                                    0,
                                    error_class(&e),
                                    ra
                                ]),
                            }
                        }
                        Err(e) => json!([
                            t,
                            start.elapsed().as_secs_f64() * 1000.0,
                            0,
                            error_class(&e),
                            null
                        ]),
                    };
                    records.lock().unwrap().push(rec);
                }
            })
        })
        .collect();
    let _ = stdin_closed.await;
    for l in loops {
        let _ = l.await;
    }
    let records = std::mem::take(&mut *records.lock().unwrap());
    let out = json!({
        "versions": {"reqwest": "0.12", "hyper": "1", "h2": "0.4"},
        "records": records,
    });
    println!("{out}");
}
