//! The Istio manifests under `istio/`: each document against the openAPIV3Schema of its kind's
//! served version in Istio's CRD bundle (`../shared/istio-crds/`), made strict the way the API
//! server's field validation is (unknown fields are errors); each plugin configuration with the
//! filter's own parser; and each one equal to its standalone Envoy twin under `envoy/`.

mod manifests;

use handoff::config::Config;
use manifests::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Kinds that are not Istio CRDs: Kubernetes validates them itself; we check the wiring.
const CORE_KINDS: &[(&str, &str)] = &[
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
];

fn crds_file() -> PathBuf {
    // CI clones the repository with shared/ beside it; a worktree may sit one level deeper.
    let rel = "shared/istio-crds/customresourcedefinitions.gen.yaml";
    repo()
        .ancestors()
        .skip(1)
        .map(|d| d.join(rel))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{rel} not found beside the repository ({}/../{rel})",
                repo().display()
            )
        })
}

/// (group, kind) -> version name -> (served, openAPIV3Schema)
type Crds = HashMap<(String, String), BTreeMap<String, (bool, Value)>>;

fn crds() -> Crds {
    let mut out = Crds::new();
    for crd in yaml_docs(&crds_file()) {
        if crd["kind"] != "CustomResourceDefinition" {
            continue;
        }
        let group = crd["spec"]["group"].as_str().unwrap().to_string();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let versions = out.entry((group, kind)).or_default();
        for v in crd["spec"]["versions"].as_array().unwrap() {
            versions.insert(
                v["name"].as_str().unwrap().to_string(),
                (
                    v["served"].as_bool().unwrap_or(false),
                    v["schema"]["openAPIV3Schema"].clone(),
                ),
            );
        }
    }
    assert!(out.len() > 5, "no CRDs read from {}", crds_file().display());
    out
}

/// A structural schema as the API server applies it with strict field validation: objects
/// with `properties` reject unknown fields unless `x-kubernetes-preserve-unknown-fields`;
/// other `x-kubernetes-*` extensions (CEL rules, list types) and `format` are not checked
/// here; `nullable` allows null.
fn strict(node: &Value) -> Value {
    let Value::Object(m) = node else {
        return node.clone();
    };
    let preserve = m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let mut out = Map::new();
    for (k, v) in m {
        if k.starts_with("x-kubernetes-") || k == "nullable" || k == "format" {
            continue;
        }
        let v = match k.as_str() {
            "properties" => Value::Object(
                v.as_object()
                    .unwrap()
                    .iter()
                    .map(|(name, s)| (name.clone(), strict(s)))
                    .collect(),
            ),
            "items" | "additionalProperties" | "not" => strict(v),
            "oneOf" | "anyOf" | "allOf" => {
                Value::Array(v.as_array().unwrap().iter().map(strict).collect())
            }
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    if out.contains_key("properties") && !preserve && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    if m.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        }
    }
    Value::Object(out)
}

/// The schema a whole resource must satisfy: the CRD's, plus the envelope the API server adds.
fn resource_schema(crds: &Crds, api_version: &str, kind: &str) -> Result<Value, String> {
    let (group, version) = api_version
        .split_once('/')
        .ok_or_else(|| format!("apiVersion `{api_version}` has no group"))?;
    let versions = crds
        .get(&(group.to_string(), kind.to_string()))
        .ok_or_else(|| format!("no CRD for kind {kind} in group {group}"))?;
    let (served, schema) = versions.get(version).ok_or_else(|| {
        format!(
            "{kind} has no version `{version}` (the CRD has {:?})",
            versions.keys().collect::<Vec<_>>()
        )
    })?;
    if !served {
        return Err(format!("{kind} {version} is not served"));
    }
    let mut schema = strict(schema);
    let props = schema["properties"].as_object_mut().unwrap();
    props.insert("apiVersion".into(), json!({"enum": [api_version]}));
    props.insert("kind".into(), json!({"enum": [kind]}));
    props.insert("metadata".into(), metadata_schema());
    let required = schema
        .as_object_mut()
        .unwrap()
        .entry("required")
        .or_insert_with(|| json!([]));
    let required = required.as_array_mut().unwrap();
    required.extend([json!("apiVersion"), json!("kind"), json!("metadata")]);
    Ok(schema)
}

fn metadata_schema() -> Value {
    let dns = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    json!({
        "type": "object",
        "required": ["name"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "maxLength": 253, "pattern": dns},
            "namespace": {"type": "string", "maxLength": 63, "pattern": dns},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
}

/// The errors of one document, each naming the field.
fn check_document(crds: &Crds, doc: &Value) -> Vec<String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    if CORE_KINDS.contains(&(api_version, kind)) {
        return check_core(doc);
    }
    let schema = match resource_schema(crds, api_version, kind) {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    let validator = jsonschema::draft4::new(&schema).expect("the CRD schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    // The CRD's CEL rule on `url` (x-kubernetes-validations), which the schema above skips.
    let url = doc
        .pointer("/spec/url")
        .or_else(|| doc.pointer("/spec/wasm/url"))
        .and_then(Value::as_str);
    if let Some(url) = url {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("oci");
        if !["http", "https", "file", "oci"].contains(&scheme) {
            errors.push(format!(
                "url: scheme `{scheme}` is not http, https, file or oci"
            ));
        }
    }
    errors
}

/// Core kinds: the envelope, and that every volume a container mounts is declared.
fn check_core(doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none()
    {
        errors.push("/metadata/name: missing".to_string());
    }
    if doc["kind"] == "Deployment" {
        let pod = &doc["spec"]["template"]["spec"];
        let volumes: Vec<&str> = pod["volumes"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        for c in pod["containers"].as_array().into_iter().flatten() {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap_or_default();
                if !volumes.contains(&name) {
                    errors.push(format!(
                        "container {}: volumeMount `{name}` has no volume",
                        c["name"]
                    ));
                }
            }
        }
    }
    errors
}

fn describe(file: &std::path::Path, n: usize, doc: &Value) -> String {
    format!(
        "{} (document {n}, {} {})",
        file.strip_prefix(repo()).unwrap_or(file).display(),
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[test]
fn every_manifest_matches_its_crd_schema() {
    let crds = crds();
    let mut failures = Vec::new();
    let mut kinds = BTreeMap::<String, usize>::new();
    for (file, n, doc) in istio_documents() {
        *kinds
            .entry(doc["kind"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        for e in check_document(&crds, &doc) {
            failures.push(format!("{}: {e}", describe(&file, n, &doc)));
        }
    }
    assert!(
        failures.is_empty(),
        "invalid manifests:\n{}",
        failures.join("\n")
    );
    for (kind, at_least) in [
        ("WasmPlugin", 4),
        ("TrafficExtension", 2),
        ("VirtualService", 1),
        ("DestinationRule", 1),
        ("EnvoyFilter", 1),
        ("Deployment", 1),
    ] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) >= at_least,
            "expected at least {at_least} {kind} under istio/, found {kinds:?}"
        );
    }
}

#[test]
fn every_plugin_config_parses_with_the_filters_parser() {
    let mut checked = 0;
    for (file, n, doc) in istio_documents() {
        let Some(config) = plugin_config(&doc) else {
            continue;
        };
        let text = config.to_string();
        if let Err(e) = Config::parse(text.as_bytes()) {
            panic!("{}: {e}", describe(&file, n, &doc));
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} plugin configurations found");
}

/// The mode of the first `match` entry: CLIENT or SERVER.
fn mode(doc: &Value) -> &str {
    doc.pointer("/spec/match/0/mode")
        .and_then(Value::as_str)
        .unwrap_or("UNDEFINED")
}

#[test]
fn plugin_configs_equal_their_envoy_twins() {
    let twins = [
        ("CLIENT", "envoy/client-side.yaml"),
        ("SERVER", "envoy/server-side.yaml"),
    ];
    let mut compared = 0;
    for (file, n, doc) in istio_documents() {
        let Some(config) = plugin_config(&doc) else {
            continue;
        };
        let (_, twin) = twins
            .iter()
            .find(|(m, _)| *m == mode(&doc))
            .unwrap_or_else(|| {
                panic!(
                    "{}: match mode must be CLIENT or SERVER",
                    describe(&file, n, &doc)
                )
            });
        let envoy = envoy_plugin_configs(&repo().join(twin));
        assert_eq!(envoy.len(), 1, "{twin}: expected one wasm filter");
        let envoy: Value = serde_json::from_str(&envoy[0]).unwrap();
        assert_eq!(
            config,
            envoy,
            "{}: pluginConfig differs from the configuration in {twin}; run `make istio-sync`",
            describe(&file, n, &doc)
        );
        compared += 1;
    }
    assert!(compared >= 6);
}

#[test]
fn wasm_plugins_come_as_oci_and_file_variants_with_digests() {
    let mut urls = BTreeMap::<String, Vec<String>>::new();
    let mut oci_digests = Vec::new();
    let mut file_digests = Vec::new();
    for (file, n, doc) in istio_documents() {
        if doc["kind"] != "WasmPlugin" && doc["kind"] != "TrafficExtension" {
            continue;
        }
        let spec = if doc["kind"] == "WasmPlugin" {
            &doc["spec"]
        } else {
            &doc["spec"]["wasm"]
        };
        let what = describe(&file, n, &doc);
        for field in ["url", "sha256", "failStrategy"] {
            assert!(spec[field].is_string(), "{what}: {field} missing");
        }
        for field in ["phase", "priority"] {
            assert!(!doc["spec"][field].is_null(), "{what}: {field} missing");
        }
        let url = spec["url"].as_str().unwrap().to_string();
        let sha = spec["sha256"].as_str().unwrap().to_string();
        assert!(
            sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "{what}: sha256"
        );
        if url.starts_with("oci://") {
            oci_digests.push(sha);
        } else if url.starts_with("file://") {
            file_digests.push(sha);
        }
        if doc["kind"] == "WasmPlugin" {
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            urls.entry(name).or_default().push(url);
        }
    }
    for (name, urls) in &urls {
        assert!(
            urls.iter().any(|u| u.starts_with("oci://"))
                && urls.iter().any(|u| u.starts_with("file://")),
            "WasmPlugin {name}: expected an oci:// and a file:// variant, got {urls:?}"
        );
    }
    assert!(urls.contains_key("handoff-client") && urls.contains_key("handoff-server"));
    // One build pinned everywhere (`make istio-sync` sets them together).
    oci_digests.dedup();
    file_digests.dedup();
    assert_eq!(
        oci_digests.len(),
        1,
        "oci:// sha256 values differ: {oci_digests:?}; run `make istio-sync`"
    );
    assert_eq!(
        file_digests.len(),
        1,
        "file:// sha256 values differ: {file_digests:?}; run `make istio-sync`"
    );
}

/// A copy of the first document of `file` whose kind is `kind`.
fn sample(file: &str, kind: &str) -> Value {
    yaml_docs(&repo().join(file))
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap()
}

#[test]
fn a_typo_in_a_manifest_fails_validation() {
    let crds = crds();
    let plugin = sample("istio/wasmplugin.yaml", "WasmPlugin");
    assert!(check_document(&crds, &plugin).is_empty());
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut d = plugin.clone();
                d["spec"]["phse"] = json!("AUTHN");
                d
            },
            "phse",
        ),
        (
            {
                let mut d = plugin.clone();
                d["spec"]["failStrategy"] = json!("FAIL_SOMETIMES");
                d
            },
            "failStrategy",
        ),
        (
            {
                let mut d = plugin.clone();
                d["spec"]["sha256"] = json!("abc");
                d
            },
            "sha256",
        ),
        (
            {
                let mut d = plugin.clone();
                d["spec"]["match"][0]["mode"] = json!("CLEINT");
                d
            },
            "mode",
        ),
        (
            {
                let mut d = plugin.clone();
                d["spec"]["url"] = json!("ftp://example/h.wasm");
                d
            },
            "url",
        ),
        (
            {
                let mut d = plugin.clone();
                d["apiVersion"] = json!("extensions.istio.io/v1beta9");
                d
            },
            "v1beta9",
        ),
        (
            {
                let mut d = plugin.clone();
                d["metadata"]["nmae"] = json!("x");
                d
            },
            "nmae",
        ),
        (
            {
                let mut d = sample(
                    "istio/trafficextension/trafficextension.yaml",
                    "TrafficExtension",
                );
                d["spec"]["wasm"]["sha265"] = d["spec"]["wasm"]["sha256"].clone();
                d
            },
            "sha265",
        ),
        (
            {
                let mut d = sample("istio/routing.yaml", "VirtualService");
                d["spec"]["http"][0]["matches"] = json!([]);
                d
            },
            "matches",
        ),
        (
            {
                let mut d = sample("istio/envoyfilter.yaml", "EnvoyFilter");
                d["spec"]["configPatches"][0]["match"]["context"] = json!("SIDECAR");
                d
            },
            "context",
        ),
    ];
    for (doc, field) in cases {
        let errors = check_document(&crds, &doc);
        assert!(
            errors.iter().any(|e| e.contains(field)),
            "a manifest with a bad `{field}` must fail naming it, got {errors:?}"
        );
    }
}

#[test]
fn a_bad_plugin_config_key_fails_the_filters_parser() {
    let mut plugin = sample("istio/wasmplugin.yaml", "WasmPlugin");
    let config = plugin_config(&plugin).unwrap();
    assert!(Config::parse(config.to_string().as_bytes()).is_ok());
    plugin["spec"]["pluginConfig"]["canary"]["persent"] = json!(5);
    let e = Config::parse(plugin_config(&plugin).unwrap().to_string().as_bytes()).unwrap_err();
    assert_eq!(e.path, "canary.persent", "{e}");
    plugin["spec"]["pluginConfig"] = json!({"canery": {}});
    let e = Config::parse(plugin_config(&plugin).unwrap().to_string().as_bytes()).unwrap_err();
    assert!(e.to_string().contains("unknown field `canery`"), "{e}");
}

#[test]
fn the_bootstrap_override_carries_every_stats_tag_of_the_envoy_configs() {
    let cm = sample("istio/stats-bootstrap.yaml", "ConfigMap");
    let bootstrap: Value =
        serde_json::from_str(cm["data"]["custom_bootstrap.json"].as_str().unwrap()).unwrap();
    let tags = bootstrap["stats_config"]["stats_tags"].as_array().unwrap();
    for file in envoy_files() {
        for doc in yaml_docs(&file) {
            for tag in doc["stats_config"]["stats_tags"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert!(
                    tags.contains(tag),
                    "{}: stats tag {tag} is missing from istio/stats-bootstrap.yaml",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_deployment_runs_the_prestop_drain_script_in_the_sidecar() {
    let d = sample("istio/workload/deployment.yaml", "Deployment");
    let pod = &d["spec"]["template"]["spec"];
    let proxy = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-proxy")
        .expect("an istio-proxy container override");
    let command = proxy
        .pointer("/lifecycle/preStop/exec/command")
        .unwrap()
        .to_string();
    assert!(
        command.contains("/etc/handoff/prestop-drain.sh"),
        "{command}"
    );
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/handoff")
        .unwrap();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    // The ConfigMap made from istio/prestop-drain.sh (see the file's header).
    assert_eq!(volume["configMap"]["name"], "handoff-prestop");
    assert_eq!(
        pod["containers"][0]["ports"][0]["containerPort"], 8080,
        "the app port the EnvoyFilter's `app` cluster and the drain URL use"
    );
}

/// The clusters the EnvoyFilter adds, loaded by a real Envoy (`--mode validate`): the patch
/// values are Envoy protos that no CRD schema checks.
#[test]
fn envoyfilter_clusters_are_valid_envoy_clusters() {
    let mut clusters = Vec::new();
    for (_, _, doc) in istio_documents() {
        if doc["kind"] != "EnvoyFilter" {
            continue;
        }
        for patch in doc["spec"]["configPatches"].as_array().unwrap() {
            if patch["applyTo"] == "CLUSTER" && patch["patch"]["operation"] == "ADD" {
                clusters.push(patch["patch"]["value"].clone());
            }
        }
    }
    let names: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
    for needed in ["envoy_admin", "etcd", "app"] {
        assert!(
            names.contains(&needed),
            "EnvoyFilter lacks cluster {needed}: {names:?}"
        );
    }
    let bootstrap = json!({"static_resources": {"clusters": clusters}});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clusters.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let envoy = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/envoy"));
    let out = std::process::Command::new(&envoy)
        .args(["--mode", "validate", "-l", "error", "-c"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (make envoy installs it)", envoy.display()));
    assert!(
        out.status.success(),
        "Envoy rejects the EnvoyFilter's clusters:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
