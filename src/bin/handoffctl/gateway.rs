//! etcd's v3 JSON gateway over HTTP(S), for `handoffctl rollout`: the requests are the
//! library's own (`handoff::etcd`, what the filter sends), only the transport is here. TLS
//! (`--cacert`, `--cert`/`--key`) goes through rustls; `--user` authenticates once
//! (`/v3/auth/authenticate`) and sends the token with every call.

use crate::app::Failure;
use handoff::etcd::{self, Answer, Request};
use std::time::Duration;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

/// The environment variable `--user NAME` reads the password from when it has no `:PASSWORD`.
pub const PASSWORD_ENV: &str = "HANDOFF_ETCD_PASSWORD";

const AUTHENTICATE: &str = "/v3/auth/authenticate";

/// How the command line reaches etcd.
#[derive(Debug, Default)]
pub struct Settings<'a> {
    pub url: &'a str,
    pub cacert: Option<&'a str>,
    pub cert: Option<&'a str>,
    pub key: Option<&'a str>,
    /// `NAME` or `NAME:PASSWORD`.
    pub user: Option<&'a str>,
}

pub struct Gateway {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// Connect and answer timeouts: generous for a loaded etcd, short enough for a person waiting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read (a record and its window are a few hundred bytes).
const MAX_ANSWER: u64 = 1 << 20;

impl Gateway {
    /// A gateway for `settings`, authenticated when `--user` is given.
    pub fn connect(settings: &Settings) -> Result<Gateway, Failure> {
        let base = settings.url.trim_end_matches('/').to_string();
        let is_https = match base.split_once("://") {
            Some(("https", rest)) if !rest.is_empty() => true,
            Some(("http", rest)) if !rest.is_empty() => false,
            _ => {
                return Err(Failure::usage(format!(
                    "rollout: --etcd expects an http:// or https:// URL, got `{}`",
                    settings.url
                )))
            }
        };
        let tls = tls_config(settings)?;
        if !is_https && (settings.cacert.is_some() || settings.cert.is_some()) {
            return Err(Failure::usage(
                "rollout: --cacert, --cert and --key need an https:// --etcd URL",
            ));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(CALL_TIMEOUT))
            .max_redirects(0)
            .tls_config(tls)
            .build();
        let mut gateway = Gateway {
            agent: ureq::Agent::new_with_config(config),
            base,
            token: None,
        };
        if let Some(user) = settings.user {
            gateway.token = Some(gateway.authenticate(user)?);
        }
        Ok(gateway)
    }

    /// `POST path body`: the answer's status and body, or the line saying why there is none.
    fn post(&self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .post(&url)
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", token);
        }
        let unreachable =
            |e: ureq::Error| Failure::etcd(format!("cannot reach etcd at {}: {e}", self.base));
        let mut answer = request.send(body).map_err(unreachable)?;
        let status = answer.status().as_u16();
        let body = answer
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((status, body))
    }

    /// Sends `request` and reads its answer with `parse` (one of `handoff::etcd`'s parsers).
    pub fn call<T>(
        &self,
        request: &Request,
        parse: impl Fn(&Answer) -> Result<T, etcd::Error>,
    ) -> Result<T, Failure> {
        let (status, body) = self.post(request.path, &request.body)?;
        parse(&Answer {
            status: Some(status),
            body: &body,
        })
        .map_err(|e| self.refused(e, &body))
    }

    /// The one line for an etcd error answer (`body`: the answer, for errors etcd writes as
    /// plain text).
    fn refused(&self, e: etcd::Error, body: &[u8]) -> Failure {
        let base = &self.base;
        match e {
            etcd::Error::Server { message, .. } if message.contains("user name is empty") => {
                Failure::etcd(format!(
                    "etcd at {base} refused: {message} (authentication is enabled: pass --user)"
                ))
            }
            etcd::Error::Server { message, .. } if message.contains("permission denied") => {
                Failure::etcd(format!(
                    "etcd at {base} refused: {message} (the user needs a role with readwrite on the rollout prefix)"
                ))
            }
            etcd::Error::Server {
                status, message, ..
            } if message.is_empty() => {
                Failure::etcd(format!("etcd at {base} answered {}", plain(status, body)))
            }
            etcd::Error::Server { message, .. } => {
                Failure::etcd(format!("etcd at {base} refused: {message}"))
            }
            etcd::Error::Unreachable => {
                Failure::etcd(format!("cannot reach etcd at {base}: no answer"))
            }
            other => Failure::etcd(format!("etcd at {base}: {other}")),
        }
    }

    /// `/v3/auth/authenticate` for `NAME[:PASSWORD]` (the password from [`PASSWORD_ENV`] when
    /// the argument has none): the token for the other calls.
    fn authenticate(&self, user: &str) -> Result<String, Failure> {
        let (name, password) = match user.split_once(':') {
            Some((n, p)) => (n.to_string(), p.to_string()),
            None => match std::env::var(PASSWORD_ENV) {
                Ok(p) => (user.to_string(), p),
                Err(_) => {
                    return Err(Failure::usage(format!(
                        "rollout: --user {user} has no password: pass --user {user}:PASSWORD \
                         or set {PASSWORD_ENV}"
                    )))
                }
            },
        };
        if name.is_empty() {
            return Err(Failure::usage("rollout: --user needs a user name"));
        }
        let body = serde_json::json!({"name": name, "password": password}).to_string();
        let (status, answer) = self.post(AUTHENTICATE, body.as_bytes())?;
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&answer).ok();
        let token = parsed
            .as_ref()
            .and_then(|v| v.get("token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty());
        match token {
            Some(t) if status == 200 => Ok(t.to_string()),
            _ => {
                let message = parsed
                    .as_ref()
                    .and_then(|v| v.get("message").or_else(|| v.get("error")))
                    .and_then(|m| m.as_str())
                    .map_or_else(|| plain(status, &answer), str::to_string);
                Err(Failure::etcd(format!(
                    "etcd at {} refused user `{name}`: {message}",
                    self.base
                )))
            }
        }
    }
}

/// An answer that is not etcd's JSON (the gateway writes some errors as plain text): its
/// status and first 200 bytes on one line.
fn plain(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        format!("status {status}")
    } else {
        format!("status {status}: {text}")
    }
}

fn read_pem(flag: &str, path: &str) -> Result<Vec<PemItem<'static>>, Failure> {
    let text = std::fs::read(path)
        .map_err(|e| Failure::invalid(format!("rollout: cannot read --{flag} {path}: {e}")))?;
    ureq::tls::parse_pem(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::invalid(format!("rollout: --{flag} {path}: {e}")))
}

fn certificates(flag: &str, path: &str) -> Result<Vec<Certificate<'static>>, Failure> {
    let certs: Vec<_> = read_pem(flag, path)?
        .into_iter()
        .filter_map(|item| match item {
            PemItem::Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(Failure::invalid(format!(
            "rollout: --{flag} {path} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

fn private_key(path: &str) -> Result<PrivateKey<'static>, Failure> {
    read_pem("key", path)?
        .into_iter()
        .find_map(|item| match item {
            PemItem::PrivateKey(k) => Some(k),
            _ => None,
        })
        .ok_or_else(|| Failure::invalid(format!("rollout: --key {path} holds no PEM private key")))
}

/// The rustls settings: Mozilla's root certificates (webpki-roots) unless `--cacert`, a client certificate with
/// `--cert` and `--key` (both or neither).
fn tls_config(settings: &Settings) -> Result<TlsConfig, Failure> {
    let mut tls = TlsConfig::builder();
    if let Some(path) = settings.cacert {
        tls = tls.root_certs(RootCerts::new_with_certs(&certificates("cacert", path)?));
    }
    match (settings.cert, settings.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates("cert", cert)?;
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, private_key(key)?)));
        }
        (None, None) => {}
        _ => return Err(Failure::usage("rollout: --cert and --key go together")),
    }
    Ok(tls.build())
}
