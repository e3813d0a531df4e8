//! [`RequestView`] over the proxy-wasm host: each value is read only when a policy asks for it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, Status};
use std::cell::{OnceCell, RefCell};

use crate::headers::HeaderSnapshot;
use crate::source::RequestView;

thread_local! {
    /// The request headers read in one host call, while the request headers' stages run
    /// ([`RequestSnapshot`]); `None` otherwise, and every read goes to the host.
    static SNAPSHOT: RefCell<Option<HeaderSnapshot>> = const { RefCell::new(None) };
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK's own import, declared here as well: its `get_map_bytes` turns each name into a
    // `String` and panics (the VM dies) on one that is not UTF-8; here the serialized bytes
    // are kept as they are.
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

fn request_header_pairs() -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer it allocated with the SDK's `proxy_on_memory_allocate`
    // (a boxed slice of exactly `size` bytes) and its size, or leaves the pointer null; the
    // Vec takes that allocation over, as the SDK's own map getters do.
    unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if data.is_null() => Some(Vec::new()),
            Status::Ok => Some(Vec::from_raw_parts(data, size, size)),
            _ => None,
        }
    }
}

/// While alive, request header reads answer from one `proxy_get_header_map_pairs` instead of
/// a host call each, and [`set_request_header`] keeps that view current. Taken by
/// `on_http_request_headers` when the configuration's stages read several headers; dropped
/// before it returns.
pub struct RequestSnapshot(());

impl RequestSnapshot {
    pub fn take() -> RequestSnapshot {
        let snapshot = request_header_pairs().and_then(HeaderSnapshot::parse);
        SNAPSHOT.with(|s| *s.borrow_mut() = snapshot);
        RequestSnapshot(())
    }
}

impl Drop for RequestSnapshot {
    fn drop(&mut self) {
        SNAPSHOT.with(|s| *s.borrow_mut() = None);
    }
}

/// A request header's bytes: from the snapshot while there is one, else from the host.
pub fn request_bytes(name: &str) -> Option<Vec<u8>> {
    let snapped = SNAPSHOT.with(|s| {
        s.borrow()
            .as_ref()
            .map(|snap| snap.get(name).map(<[u8]>::to_vec))
    });
    match snapped {
        Some(value) => value,
        None => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten(),
    }
}

/// Replaces (`Some`) or removes (`None`) a request header, on the host and in the snapshot.
/// Every request header write of the filter goes through here.
pub fn set_request_header(name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    SNAPSHOT.with(|s| {
        if let Some(snap) = s.borrow_mut().as_mut() {
            snap.set(name, value.map(str::as_bytes));
        }
    });
}

/// Envoy's jwt_authn filter writes the verified payload into its dynamic metadata under the
/// key named by `payload_in_metadata`; handoff expects that key to be this one.
pub const JWT_PAYLOAD_KEY: &str = "jwt_payload";
const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

pub struct HostRequest;

impl RequestView for HostRequest {
    fn header(&self, name: &str) -> Option<String> {
        // Bytes, not `get_map_value`: the SDK panics (and the VM dies) on a header value that
        // is not UTF-8, which any client can send. Such a value counts as absent.
        String::from_utf8(request_bytes(name)?).ok()
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
    String::from_utf8(request_bytes(name)?).ok()
}

/// A response header's bytes, from the host (responses are not snapshotted).
pub fn response_bytes(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// A response header as text; absent when missing or not UTF-8 (the app controls these).
pub fn response_header(name: &str) -> Option<String> {
    String::from_utf8(response_bytes(name)?).ok()
}

/// Whether a request header is present at all, whatever its bytes (a security check must not
/// treat an undecodable value as absent).
pub fn request_header_present(name: &str) -> bool {
    request_bytes(name).is_some()
}

/// Whether a response header is present at all, whatever its bytes.
pub fn response_header_present(name: &str) -> bool {
    response_bytes(name).is_some()
}

/// Removes a request header a client must not send (handoff's own marks), checking first: a
/// check is a lookup, a removal also mutates the map and makes Envoy recompute the route.
pub fn scrub_request_header(name: &str) {
    if request_header_present(name) {
        set_request_header(name, None);
    }
}

/// `:method` and `:path`, each read from the host at most once per request (every stage asks
/// for them) and kept as bytes: each stage decides how to treat a value that is not UTF-8.
#[derive(Default)]
pub struct Head {
    method: OnceCell<Option<Vec<u8>>>,
    path: OnceCell<Option<Vec<u8>>>,
}

impl Head {
    fn path_bytes(&self) -> Option<&[u8]> {
        self.path.get_or_init(|| request_bytes(":path")).as_deref()
    }

    fn method_bytes(&self) -> Option<&[u8]> {
        self.method
            .get_or_init(|| request_bytes(":method"))
            .as_deref()
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
        request_header_present("x-forwarded-for"),
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
