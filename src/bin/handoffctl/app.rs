//! The command line: argument parsing and the commands.

use crate::{extract, image, rollout, sync};

use handoff::translate::{ApiVersion, Message};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use handoff::config::Config;
use handoff::source::{RequestView, Source};

const USAGE: &str = "\
handoffctl — check, explain and package handoff configurations

USAGE:
  handoffctl check CONFIG...
      Validate plugin configurations with the filter's own parser. CONFIG is a JSON plugin
      configuration, or a YAML/JSON file holding WasmPlugin or TrafficExtension resources
      (spec.pluginConfig / spec.wasm.pluginConfig) or an Envoy config with wasm filters
      (configuration.value). Every configuration found is checked and named; an invalid one
      prints exactly the line the filter logs: invalid configuration at `PATH`: MESSAGE

  handoffctl cohort --config CONFIG --user ID [--percent P]
      Print the canary variant, bucket and reason (allow, deny, hash) the filter assigns to the
      user id ID. --percent replaces canary.percent (to preview a ramp).

  handoffctl translate --config CONFIG --route NAME --to v1|v2 [--response]
      Read a JSON body on stdin and print it translated to version --to for the translate
      route NAME (a response body with --response), or print the application/problem+json
      body the filter would answer with (exit 1).

  handoffctl schema
      Print the JSON Schema of the plugin configuration (the committed handoff.schema.json).

  handoffctl image --wasm FILE --out DIR [--tag TAG] [--manifests SRC --render DEST]
      Write an OCI image layout of the wasm module that Istio pulls for oci:// URLs (one
      tar+gzip layer holding plugin.wasm). With --manifests, copy the *.yaml of SRC to DEST
      with each `sha256:` set for its `url:` (oci:// gets the image manifest digest, file://
      and http(s):// the module's own sha256).

  handoffctl sync [--client ENVOY.yaml] [--server ENVOY.yaml] DIR
      Set the pluginConfig of every WasmPlugin / TrafficExtension under DIR to the plugin
      configuration of its Envoy twin: --client (default envoy/client-side.yaml) for
      `match: [{mode: CLIENT}]`, --server (default envoy/server-side.yaml) for SERVER. Only
      the pluginConfig blocks are rewritten (what `make istio-sync` runs).

  handoffctl rollout status      --etcd URL --salt S [--prefix P] [--json] [CONNECTION]
  handoffctl rollout abort       --etcd URL --salt S [--prefix P] [--reason TEXT] [CONNECTION]
  handoffctl rollout resume      --etcd URL --salt S [--prefix P] [CONNECTION]
  handoffctl rollout set-percent PERCENT --etcd URL --salt S [--prefix P] [CONNECTION]
      Fleet rollout control: read or change the rollout record at PREFIX SALT (prefix
      default /handoff/rollout/, salt: the canary.salt of the configuration) through etcd's
      v3 JSON gateway at URL. status prints the record (state, percent, when, by whom, why),
      the judging Envoy, how many Envoys report, and the last fleet window per cohort (--json:
      the stored record, key, revision, judge and reporting count);
      with no record, the fleet is active at the configured percent. abort sends every user
      to stable; resume brings the cohorts back (a no-op when active); set-percent replaces
      the configured percent (0 to 100) without a configuration push. Every change is a
      compare-and-swap on the revision read: a record changed meanwhile is never overwritten.
      CONNECTION: --cacert FILE (PEM CA for an https:// URL), --cert FILE --key FILE (PEM
      client certificate), --user NAME[:PASSWORD] (etcd authentication; the password from
      $HANDOFF_ETCD_PASSWORD when not given).

  handoffctl help | --help | -h      this text
  handoffctl --version | -V          the version

EXIT CODES:
  0  success
  1  invalid configuration or input (unreadable file, bad JSON body, no such section);
     one line on stderr
  2  usage error (unknown command or option, missing or malformed argument); one line on
     stderr
  3  rollout: etcd unreachable, refused the credentials, or answered an error; one line on
     stderr
  4  rollout: the record changed underneath (compare-and-swap lost): re-run
     `handoffctl rollout status` and decide again
";

/// A failure: the exit code and the one line printed on stderr.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// etcd could not be reached, refused the credentials, or answered an error.
    pub fn etcd(message: impl Into<String>) -> Failure {
        Failure {
            code: 3,
            message: message.into(),
        }
    }

    /// A compare-and-swap lost: someone else wrote the record between our read and write.
    pub fn changed_underneath() -> Failure {
        Failure {
            code: 4,
            message: "the record changed underneath: re-run `handoffctl rollout status`".into(),
        }
    }
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line: multi-line messages would break `handoffctl ... 2>err; cat err` checks.
            let line = f.message.replace('\n', " ");
            eprintln!("handoffctl: {line}");
            ExitCode::from(f.code)
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let Some((command, rest)) = args.split_first() else {
        return Err(Failure::usage(
            "missing command (check, cohort, translate, schema, image, sync, rollout); see handoffctl --help",
        ));
    };
    match command.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "-V" | "--version" => {
            println!("handoffctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "check" => check(rest),
        "cohort" => cohort(rest),
        "translate" => translate(rest),
        "schema" => schema(rest),
        "image" => image_command(rest),
        "sync" => sync_command(rest),
        "rollout" => rollout::command(rest),
        other => Err(Failure::usage(format!(
            "unknown command `{other}`; see handoffctl --help"
        ))),
    }
}

/// Options of one command: `--name value` pairs and flags, plus positional arguments.
pub struct Options {
    command: &'static str,
    values: Vec<(String, String)>,
    flags: Vec<String>,
    pub positional: Vec<String>,
}

impl Options {
    pub fn parse(
        command: &'static str,
        args: &[String],
        with_value: &[&str],
        flags: &[&str],
    ) -> Result<Options, Failure> {
        let mut out = Options {
            command,
            values: Vec::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if arg == "-h" || arg == "--help" {
                print!("{USAGE}");
                std::process::exit(0);
            }
            if let Some(name) = arg.strip_prefix("--") {
                let (name, inline) = match name.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (name, None),
                };
                if with_value.contains(&name) {
                    let value = match inline {
                        Some(v) => v,
                        None => it.next().cloned().ok_or_else(|| {
                            Failure::usage(format!("{command}: --{name} needs a value"))
                        })?,
                    };
                    if out.values.iter().any(|(n, _)| n == name) {
                        return Err(Failure::usage(format!("{command}: --{name} given twice")));
                    }
                    out.values.push((name.to_string(), value));
                } else if flags.contains(&name) && inline.is_none() {
                    out.flags.push(name.to_string());
                } else {
                    return Err(Failure::usage(format!(
                        "{command}: unknown option `{arg}`; see handoffctl --help"
                    )));
                }
            } else {
                out.positional.push(arg.clone());
            }
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn required(&self, name: &str) -> Result<&str, Failure> {
        self.get(name).ok_or_else(|| {
            Failure::usage(format!(
                "{}: missing --{name}; see handoffctl --help",
                self.command
            ))
        })
    }

    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    pub fn no_positional(&self) -> Result<(), Failure> {
        match self.positional.first() {
            Some(p) => Err(Failure::usage(format!(
                "{}: unexpected argument `{p}`; see handoffctl --help",
                self.command
            ))),
            None => Ok(()),
        }
    }
}

fn check(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse("check", args, &[], &[])?;
    if opts.positional.is_empty() {
        return Err(Failure::usage(
            "check: missing CONFIG file; see handoffctl --help",
        ));
    }
    let mut failures = Vec::new();
    for path in &opts.positional {
        let found = extract::plugin_configs(path)?;
        for item in found {
            match Config::parse(item.json.as_bytes()) {
                Ok(cfg) => println!("ok: {}: {}", item.label, cfg.summary()),
                Err(e) => failures.push(format!("{}: {e}", item.label)),
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(Failure::invalid(failures.remove(0))),
        n => Err(Failure::invalid(format!(
            "{n} invalid configurations: {}",
            failures.join("; ")
        ))),
    }
}

/// Loads the one configuration of `path` that has `section`, validated by the filter's parser.
/// `adjust` may edit the JSON first (for `--percent`).
fn load_section(
    path: &str,
    section: &str,
    adjust: impl Fn(&mut serde_json::Value) -> Result<(), Failure>,
) -> Result<Config, Failure> {
    let found = extract::plugin_configs(path)?;
    let mut with_section = Vec::new();
    for item in found {
        let mut value: serde_json::Value = match serde_json::from_str(&item.json) {
            Ok(v) => v,
            // Not JSON: let the filter's parser word the error.
            Err(_) => serde_json::Value::Null,
        };
        if value.get(section).is_some() {
            adjust(&mut value)?;
            with_section.push((item.label, value));
        } else if value.is_null() {
            // Report the parse error exactly as `check` would.
            Config::parse(item.json.as_bytes())
                .map_err(|e| Failure::invalid(format!("{}: {e}", item.label)))?;
        }
    }
    let (label, value) = match with_section.len() {
        0 => {
            return Err(Failure::invalid(format!(
                "{path}: no configuration with a `{section}` section"
            )))
        }
        1 => with_section.remove(0),
        _ => {
            let labels: Vec<_> = with_section.iter().map(|(l, _)| l.as_str()).collect();
            return Err(Failure::invalid(format!(
                "{path}: several configurations have a `{section}` section ({}); pass a file with one",
                labels.join(", ")
            )));
        }
    };
    let text = value.to_string();
    Config::parse(text.as_bytes()).map_err(|e| Failure::invalid(format!("{label}: {e}")))
}

fn cohort(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse("cohort", args, &["config", "user", "percent"], &[])?;
    opts.no_positional()?;
    let path = opts.required("config")?;
    let user = opts.required("user")?;
    let percent = match opts.get("percent") {
        Some(p) => Some(p.parse::<f64>().map_err(|_| {
            Failure::usage(format!("cohort: --percent expects a number, got `{p}`"))
        })?),
        None => None,
    };
    let config = load_section(path, "canary", |v| {
        if let Some(p) = percent {
            v["canary"]["percent"] = serde_json::json!(p);
        }
        Ok(())
    })?;
    let Some(canary) = config.canary else {
        return Err(Failure::invalid(format!("{path}: no `canary` section")));
    };
    let view = UserView::new(&canary, user);
    let a = canary.assign(&view, || user.to_string());
    println!("variant: {}", a.variant.as_str());
    match a.bucket {
        Some(b) => println!("bucket: {b} (canary below {})", canary.threshold),
        None => println!("bucket: none"),
    }
    println!("reason: {}", a.reason.as_str());
    println!("percent: {}", canary.percent);
    println!(
        "route header: {}: {}",
        canary.route_header,
        a.variant.as_str()
    );
    Ok(())
}

/// A request that carries `user` in the first `user_id` source of the configuration (or in the
/// anonymous cookie when there is no source), and nothing else.
struct UserView<'a> {
    source: Option<&'a Source>,
    anonymous_cookie: Option<&'a str>,
    user: &'a str,
}

impl<'a> UserView<'a> {
    fn new(canary: &'a handoff::canary::Canary, user: &'a str) -> UserView<'a> {
        UserView {
            source: canary.user_id.first(),
            anonymous_cookie: canary.anonymous_cookie.as_ref().map(|c| c.name.as_str()),
            user,
        }
    }
}

impl RequestView for UserView<'_> {
    fn header(&self, name: &str) -> Option<String> {
        match self.source {
            Some(Source::Header(h)) if h == name => Some(self.user.to_string()),
            Some(Source::Cookie(c)) if name == "cookie" => Some(format!("{c}={}", self.user)),
            None if name == "cookie" => self.anonymous_cookie.map(|c| format!("{c}={}", self.user)),
            _ => None,
        }
    }

    fn path(&self) -> Option<String> {
        match self.source {
            Some(Source::Query(q)) => Some(format!(
                "/?{}={}",
                percent_encode(q),
                percent_encode(self.user)
            )),
            _ => Some("/".to_string()),
        }
    }

    fn jwt_claim(&self, claim: &str) -> Option<String> {
        match self.source {
            Some(Source::JwtClaim(c)) if c == claim => Some(self.user.to_string()),
            _ => None,
        }
    }

    fn peer_principal(&self) -> Option<String> {
        match self.source {
            Some(Source::PeerPrincipal(true)) => Some(self.user.to_string()),
            _ => None,
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn translate(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse("translate", args, &["config", "route", "to"], &["response"])?;
    opts.no_positional()?;
    let path = opts.required("config")?;
    let route = opts.required("route")?;
    let to = opts.required("to")?;
    if to != "v1" && to != "v2" {
        return Err(Failure::usage(format!(
            "translate: --to expects v1 or v2, got `{to}`"
        )));
    }
    let response = opts.flag("response");
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|e| Failure::invalid(format!("translate: cannot read stdin: {e}")))?;
    let config = load_section(path, "translate", |_| Ok(()))?;
    let Some(t) = config.translate else {
        return Err(Failure::invalid(format!(
            "translate: {path} has no `translate` section"
        )));
    };
    let Some(r) = t.routes.iter().find(|r| r.name == route) else {
        let names: Vec<&str> = t.routes.iter().map(|r| r.name.as_str()).collect();
        return Err(Failure::invalid(format!(
            "translate: no route `{route}` in {path} (routes: {})",
            names.join(", ")
        )));
    };
    let to = if to == "v1" {
        ApiVersion::V1
    } else {
        ApiVersion::V2
    };
    // A request is translated from the other version into `to`; a response into `to` (the
    // version of the client that reads it). The filter's own size check comes first.
    let (message, result) = if response {
        (
            Message::Response,
            r.check_size(body.len())
                .and_then(|()| r.translate_response(to, &body)),
        )
    } else {
        (
            Message::Request,
            r.check_size(body.len())
                .and_then(|()| r.translate_request(to.other(), &body)),
        )
    };
    let mut out = std::io::stdout();
    match result {
        Ok(translated) => out
            .write_all(&translated)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| Failure::invalid(format!("translate: cannot write: {e}"))),
        Err(e) => {
            // The same problem+json the filter would send, on stdout; the reason on stderr.
            let reply = e.reply(message);
            let _ = out
                .write_all(&reply.body)
                .and_then(|()| out.write_all(b"\n"));
            Err(Failure::invalid(format!(
                "translate: route `{route}`: {} {}",
                reply.status,
                e.detail()
            )))
        }
    }
}

fn schema(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse("schema", args, &[], &[])?;
    opts.no_positional()?;
    let text = schema_text();
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| Failure::invalid(format!("schema: cannot write: {e}")))
}

/// The committed `handoff.schema.json`: pretty JSON and a final newline.
pub fn schema_text() -> String {
    let schema = schemars::schema_for!(handoff::config::RawConfig);
    // Serializing a schema (plain JSON values) cannot fail.
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

fn image_command(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse(
        "image",
        args,
        &["wasm", "out", "tag", "manifests", "render"],
        &[],
    )?;
    opts.no_positional()?;
    let wasm_path = opts.required("wasm")?;
    let out = PathBuf::from(opts.required("out")?);
    let tag = opts.get("tag").unwrap_or(env!("CARGO_PKG_VERSION"));
    let render = match (opts.get("manifests"), opts.get("render")) {
        (Some(src), Some(dest)) => Some((PathBuf::from(src), PathBuf::from(dest))),
        (None, None) => None,
        _ => {
            return Err(Failure::usage(
                "image: --manifests and --render go together",
            ))
        }
    };
    let wasm = std::fs::read(wasm_path)
        .map_err(|e| Failure::invalid(format!("image: cannot read {wasm_path}: {e}")))?;
    let built = image::write_layout(&wasm, &out, tag).map_err(Failure::invalid)?;
    println!("image: oci:{}:{tag}", out.display());
    println!("manifest digest: sha256:{}", built.manifest_digest);
    println!("wasm sha256: {}", built.wasm_sha256);
    if let Some((src, dest)) = render {
        let changed = image::render_manifests(&src, &dest, &built).map_err(Failure::invalid)?;
        println!(
            "manifests: {} -> {} ({changed} sha256 values set)",
            src.display(),
            dest.display()
        );
    }
    Ok(())
}

fn sync_command(args: &[String]) -> Result<(), Failure> {
    let opts = Options::parse("sync", args, &["client", "server"], &[])?;
    let [dir] = &opts.positional[..] else {
        return Err(Failure::usage(
            "sync: expected one manifest directory; see handoffctl --help",
        ));
    };
    let twins = sync::Twins {
        client: opts
            .get("client")
            .unwrap_or("envoy/client-side.yaml")
            .to_string(),
        server: opts
            .get("server")
            .unwrap_or("envoy/server-side.yaml")
            .to_string(),
    };
    let changed = sync::sync(std::path::Path::new(dir), &twins)?;
    println!(
        "{dir}: {changed} pluginConfig block(s) rewritten from {} and {}",
        twins.client, twins.server
    );
    Ok(())
}
