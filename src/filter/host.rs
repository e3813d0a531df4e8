//! [`RequestView`] over the proxy-wasm host: each value is read only when a policy asks for it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;
use std::cell::OnceCell;

use crate::source::RequestView;

/// Envoy's jwt_authn filter writes the verified payload into its dynamic metadata under the
/// key named by `payload_in_metadata`; handoff expects that key to be this one.
pub const JWT_PAYLOAD_KEY: &str = "jwt_payload";
const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

pub struct HostRequest;

impl RequestView for HostRequest {
    fn header(&self, name: &str) -> Option<String> {
        // Bytes, not `get_map_value`: the SDK panics (and the VM dies) on a header value that
        // is not UTF-8, which any client can send. Such a value counts as absent.
        let bytes = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()?;
        String::from_utf8(bytes).ok()
    }

    fn path(&self) -> Option<String> {
        self.header(":path")
    }

    fn jwt_claim(&self, claim: &str) -> Option<String> {
        let path = vec![
            "metadata",
            "filter_metadata",
            JWT_AUTHN,
            JWT_PAYLOAD_KEY,
            claim,
        ];
        let bytes = hostcalls::get_property(path).ok().flatten()?;
        String::from_utf8(bytes).ok()
    }

    fn peer_principal(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["connection", "uri_san_peer_certificate"])
            .ok()
            .flatten()?;
        String::from_utf8(bytes).ok()
    }
}

/// A request header as text; absent when missing or not UTF-8. Use this (never
/// `get_http_request_header`, whose String conversion panics on obs-text bytes and aborts the
/// VM) for every header a client controls.
pub fn request_header(name: &str) -> Option<String> {
    header_of(MapType::HttpRequestHeaders, name)
}

/// A response header as text; absent when missing or not UTF-8 (the app controls these).
pub fn response_header(name: &str) -> Option<String> {
    header_of(MapType::HttpResponseHeaders, name)
}

/// Whether a header is present at all, whatever its bytes (a security check must not treat an
/// undecodable value as absent).
pub fn header_present(map: MapType, name: &str) -> bool {
    matches!(hostcalls::get_map_value_bytes(map, name), Ok(Some(_)))
}

fn header_of(map: MapType, name: &str) -> Option<String> {
    let bytes = hostcalls::get_map_value_bytes(map, name).ok().flatten()?;
    String::from_utf8(bytes).ok()
}

/// Removes a request header a client must not send (handoff's own marks), checking first: a
/// check is a lookup, a removal also mutates the map and makes Envoy recompute the route.
pub fn scrub_request_header(name: &str) {
    if header_present(MapType::HttpRequestHeaders, name) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }
}

/// `:method` and `:path`, each read from the host at most once per request (every stage asks
/// for them) and kept as bytes: each stage decides how to treat a value that is not UTF-8.
#[derive(Default)]
pub struct Head {
    method: OnceCell<Option<Vec<u8>>>,
    path: OnceCell<Option<Vec<u8>>>,
}

fn read_bytes(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

impl Head {
    fn path_bytes(&self) -> Option<&[u8]> {
        self.path.get_or_init(|| read_bytes(":path")).as_deref()
    }

    fn method_bytes(&self) -> Option<&[u8]> {
        self.method.get_or_init(|| read_bytes(":method")).as_deref()
    }

    /// `:path`; absent when missing or not UTF-8 (as [`request_header`]).
    pub fn path(&self) -> Option<&str> {
        self.path_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// `:method`; absent when missing or not UTF-8 (as [`request_header`]).
    pub fn method(&self) -> Option<&str> {
        self.method_bytes()
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// `:path`, undecodable bytes replaced (empty when missing).
    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(self.path_bytes().unwrap_or_default()).into_owned()
    }

    /// `:method`, undecodable bytes replaced (empty when missing).
    pub fn method_lossy(&self) -> String {
        String::from_utf8_lossy(self.method_bytes().unwrap_or_default()).into_owned()
    }

    /// Records a `:path` this filter wrote, so later stages see the request as forwarded.
    pub fn set_path(&mut self, path: &str) {
        self.path = OnceCell::from(Some(path.as_bytes().to_vec()));
    }
}

/// Who calls an admin path, as the host tells it.
pub struct AdminCaller {
    /// From this host (see [`crate::drain::is_loopback_request`]).
    pub loopback: bool,
    /// The `authorization` header (absent when missing or not UTF-8).
    pub authorization: Option<String>,
    /// The peer address, for a log line.
    pub peer: Option<String>,
}

pub fn admin_caller() -> AdminCaller {
    let address = |side: &str| {
        hostcalls::get_property(vec![side, "address"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
    };
    let peer = address("source");
    let loopback = crate::drain::is_loopback_request(
        peer.as_deref(),
        address("destination").as_deref(),
        header_present(MapType::HttpRequestHeaders, "x-forwarded-for"),
    );
    AdminCaller {
        loopback,
        authorization: request_header("authorization"),
        peer,
    }
}

/// Whether an admin request may pass: a loopback request or the bearer token whose SHA-256 is
/// `token_sha256`. `Err` names the refused peer, for the log line.
pub fn admin_allowed(token_sha256: Option<&[u8; 32]>) -> Result<(), String> {
    let c = admin_caller();
    match crate::drain::authorize(c.loopback, c.authorization.as_deref(), token_sha256) {
        crate::drain::AdminAuth::Denied => Err(c.peer.unwrap_or_else(|| "an unknown peer".into())),
        _ => Ok(()),
    }
}

/// 16 random bytes from the host (WASI `random_get`).
pub fn random_bytes() -> [u8; 16] {
    let mut buf = [0u8; 16];
    if getrandom::getrandom(&mut buf).is_err() {
        // Fall back to the clock: ids stay unique enough to spread users, and a missing
        // random source must not fail the request.
        let t = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        buf = t.to_le_bytes();
    }
    buf
}

/// Sends one etcd gateway request from `ctx` to `cluster` (its answer comes back to that
/// context's `on_http_call_response`).
pub fn etcd_call(
    ctx: &dyn proxy_wasm::traits::Context,
    cluster: &str,
    authority: &str,
    timeout_ms: u64,
    r: &crate::etcd::Request,
) -> Result<u32, proxy_wasm::types::Status> {
    ctx.dispatch_http_call(
        cluster,
        vec![
            (":method", "POST"),
            (":path", r.path),
            (":authority", authority),
            ("content-type", "application/json"),
        ],
        Some(&r.body),
        vec![],
        std::time::Duration::from_millis(timeout_ms),
    )
}

/// The answer to a callout: no headers means it failed or timed out.
pub fn call_answer(
    ctx: &dyn proxy_wasm::traits::Context,
    num_headers: usize,
    body_size: usize,
) -> (Option<u16>, Vec<u8>) {
    if num_headers == 0 {
        return (None, Vec::new());
    }
    let status = ctx
        .get_http_call_response_header(":status")
        .and_then(|s| s.parse().ok());
    let body = ctx
        .get_http_call_response_body(0, body_size)
        .unwrap_or_default();
    (status, body)
}
