//! `handoffctl`, run as a binary: what it prints, on which stream, with which exit code.

#[path = "support/cli.rs"]
mod cli;
mod manifests;

use cli::{expect, stderr, stdout};
use handoff::canary;
use handoff::config::Config;
use manifests::repo;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(args: &[&str]) -> Output {
    run_with_stdin(args, b"")
}

fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoffctl"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn temp_file(name: &str, content: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

#[test]
fn help_lists_every_command_and_the_exit_codes() {
    for flag in ["--help", "-h", "help"] {
        let o = run(&[flag]);
        expect(&o, 0);
        let out = stdout(&o);
        for needle in [
            "check CONFIG",
            "cohort --config CONFIG --user ID [--percent P]",
            "translate --config CONFIG --route NAME --to v1|v2 [--response]",
            "schema",
            "image --wasm FILE --out DIR",
            "EXIT CODES",
            "0  success",
            "1  invalid configuration or input",
            "2  usage error",
            "rollout status      --etcd URL --salt S",
            "rollout set-percent PERCENT",
            "3  rollout: etcd unreachable",
            "4  rollout: the record changed underneath",
        ] {
            assert!(out.contains(needle), "--help lacks {needle:?}");
        }
    }
    expect(&run(&["cohort", "--help"]), 0);
    expect(&run(&["rollout", "--help"]), 0);
    expect(&run(&["rollout", "abort", "--help"]), 0);
    let o = run(&["--version"]);
    expect(&o, 0);
    assert!(stdout(&o).starts_with("handoffctl "));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["check"],
        &["check", "--strict", "x.json"],
        &["cohort", "--config", "envoy/canary.yaml"],
        &[
            "cohort",
            "--config",
            "envoy/canary.yaml",
            "--user",
            "u",
            "--percent",
            "lots",
        ],
        &["cohort", "--config"],
        &[
            "translate",
            "--config",
            "envoy/canary.yaml",
            "--route",
            "payments",
        ],
        &[
            "translate",
            "--config",
            "envoy/canary.yaml",
            "--route",
            "payments",
            "--to",
            "v3",
        ],
        &["schema", "extra"],
        &["image", "--wasm", "x.wasm"],
    ] {
        let o = run(args);
        expect(&o, 2);
    }
}

#[test]
fn check_accepts_json_wasmplugins_trafficextensions_and_envoy_configs() {
    let (_d, json) = temp_file(
        "ok.json",
        r#"{"canary": {"salt": "s", "percent": 5, "user_id": [{"header": "x-user-id"}]}}"#,
    );
    let o = run(&["check", &json]);
    expect(&o, 0);
    assert!(stdout(&o).contains("canary 5%"), "{}", stdout(&o));

    let o = run(&["check", "istio/wasmplugin.yaml"]);
    expect(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("WasmPlugin handoff-client"), "{out}");
    assert!(out.contains("WasmPlugin handoff-server"), "{out}");

    let o = run(&["check", "istio/trafficextension/trafficextension.yaml"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("TrafficExtension handoff-client"));

    let o = run(&["check", "envoy/canary.yaml", "envoy/client-side.yaml"]);
    expect(&o, 0);
    assert_eq!(
        stdout(&o).matches("wasm filter `handoff`").count(),
        2,
        "{}",
        stdout(&o)
    );

    // An Envoy config written as JSON.
    let bootstrap: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("envoy/canary.yaml")).unwrap(),
    )
    .unwrap();
    let (_d3, as_json) = temp_file("envoy.json", &bootstrap.to_string());
    let o = run(&["check", &as_json]);
    expect(&o, 0);
    assert!(
        stdout(&o).contains("wasm filter `handoff`: canary 12.5%"),
        "{}",
        stdout(&o)
    );

    let (_d, yaml) = temp_file(
        "plain.yaml",
        "canary:\n  salt: s\n  percent: 1\n  user_id: [{header: x}]\n",
    );
    expect(&run(&["check", &yaml]), 0);
}

#[test]
fn check_prints_the_filters_own_error() {
    let bad = r#"{"canary": {"salt": "s", "percent": 150, "user_id": [{"header": "x-user-id"}]}}"#;
    let (_d, path) = temp_file("bad.json", bad);
    let o = run(&["check", &path]);
    expect(&o, 1);
    let filter_error = Config::parse(bad.as_bytes()).unwrap_err().to_string();
    assert_eq!(stderr(&o), format!("handoffctl: {path}: {filter_error}\n"));
    assert!(filter_error.starts_with("invalid configuration at `canary.percent`"));

    // Syntax errors keep the filter's line and column.
    let broken = "{\n  \"canary\": {,\n}";
    let (_d2, path) = temp_file("broken.json", broken);
    let o = run(&["check", &path]);
    expect(&o, 1);
    let filter_error = Config::parse(broken.as_bytes()).unwrap_err().to_string();
    assert!(
        stderr(&o).ends_with(&format!("{filter_error}\n")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_names_the_bad_resource_among_several() {
    let manifest = "\
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: good}
spec: {url: oci://r/h:1, pluginConfig: {}}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: typo}
spec:
  url: oci://r/h:1
  pluginConfig:
    canary: {salt: s, percent: 5, user_id: [{header: x}], persent: 1}
";
    let (_d, path) = temp_file("plugins.yaml", manifest);
    let o = run(&["check", &path]);
    expect(&o, 1);
    assert!(stdout(&o).contains("WasmPlugin good"));
    let err = stderr(&o);
    assert!(
        err.contains("WasmPlugin typo: invalid configuration at `canary.persent`"),
        "{err}"
    );

    // An Envoy config with a bad filter configuration names the filter.
    let envoy = std::fs::read_to_string(repo().join("envoy/canary.yaml"))
        .unwrap()
        .replace("\"percent\": 12.5", "\"percent\": 12.345");
    let (_d2, path) = temp_file("envoy.yaml", &envoy);
    let o = run(&["check", &path]);
    expect(&o, 1);
    assert!(stderr(&o).contains("wasm filter `handoff`: invalid configuration at `canary.percent`"));
}

#[test]
fn check_fails_on_missing_files_and_files_without_a_configuration() {
    expect(&run(&["check", "does/not/exist.json"]), 1);
    let (_d, path) = temp_file(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
    );
    let o = run(&["check", &path]);
    expect(&o, 1);
    assert!(stderr(&o).contains("no handoff configuration found"));
}

fn cohort(user: &str, extra: &[&str]) -> Output {
    let mut args = vec!["cohort", "--config", "envoy/canary.yaml", "--user", user];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn cohort_prints_variant_bucket_and_reason() {
    // envoy/canary.yaml: salt checkout-2026-11, 12.5%, allow u-1, deny u-2.
    let o = cohort("u-1", &[]);
    expect(&o, 0);
    assert!(stdout(&o).contains("variant: canary\n"));
    assert!(stdout(&o).contains("reason: allow\n"));

    let o = cohort("u-2", &["--percent", "100"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("variant: stable\n"));
    assert!(stdout(&o).contains("reason: deny\n"));

    for user in ["alice", "bob", "carol", "dave", "u-42"] {
        let bucket = canary::bucket("checkout-2026-11", user);
        let o = cohort(user, &[]);
        expect(&o, 0);
        let out = stdout(&o);
        assert!(
            out.contains(&format!("bucket: {bucket} (canary below 1250)")),
            "{out}"
        );
        assert!(out.contains("reason: hash\n"), "{out}");
        let want = if bucket < 1250 { "canary" } else { "stable" };
        assert!(out.contains(&format!("variant: {want}\n")), "{out}");
        // --percent previews a ramp: everyone at 100, no one at 0.
        assert!(stdout(&cohort(user, &["--percent", "100"])).contains("variant: canary\n"));
        assert!(stdout(&cohort(user, &["--percent=0"])).contains("variant: stable\n"));
    }
}

#[test]
fn cohort_reads_the_client_wasmplugin_of_a_manifest() {
    // istio/wasmplugin.yaml has two WasmPlugins; only handoff-client has a canary section.
    let o = run(&[
        "cohort",
        "--config",
        "istio/wasmplugin.yaml",
        "--user",
        "alice",
    ]);
    expect(&o, 0);
    let bucket = canary::bucket("payments-v2-2026-11", "alice");
    assert!(
        stdout(&o).contains(&format!("bucket: {bucket} (canary below 1000)")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn cohort_rejects_an_invalid_percent_like_the_filter() {
    let o = cohort("alice", &["--percent", "150"]);
    expect(&o, 1);
    assert!(
        stderr(&o).contains("invalid configuration at `canary.percent`"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "cohort",
        "--config",
        "envoy/server-side.yaml",
        "--user",
        "alice",
    ]);
    expect(&o, 1);
    assert!(stderr(&o).contains("no configuration with a `canary` section"));
}

#[test]
fn translate_needs_a_translate_section() {
    let o = run_with_stdin(
        &[
            "translate",
            "--config",
            "envoy/canary.yaml",
            "--route",
            "payments",
            "--to",
            "v2",
        ],
        br#"{"amount": 5}"#,
    );
    expect(&o, 1);
    assert!(
        stderr(&o).contains("no configuration with a `translate` section"),
        "{}",
        stderr(&o)
    );
}

fn translate(args: &[&str], body: &str) -> Output {
    let mut all = vec!["translate", "--config", "envoy/translate.yaml"];
    all.extend_from_slice(args);
    run_with_stdin(&all, body.as_bytes())
}

fn json_out(o: &Output) -> serde_json::Value {
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn translate_rewrites_a_request_like_the_filter() {
    let o = translate(
        &["--route", "payments", "--to", "v2"],
        r#"{"amount": 12.5, "currency": "EUR", "customer_id": "c-1"}"#,
    );
    expect(&o, 0);
    assert_eq!(
        json_out(&o),
        serde_json::json!({"amount": {"value": 12.5, "currency": "EUR"},
                           "customer": {"id": "c-1", "email": null}})
    );
    // The mirror direction reads the same entries backwards.
    let o = translate(
        &["--route", "payments", "--to", "v1"],
        r#"{"amount": {"value": 3, "currency": "USD"}, "customer": {"id": "c-2"}}"#,
    );
    expect(&o, 0);
    assert_eq!(
        json_out(&o),
        serde_json::json!({"amount": 3, "currency": "USD", "customer_id": "c-2"})
    );
}

#[test]
fn translate_rewrites_a_response_with_arrays() {
    let o = translate(
        &["--route", "payments", "--to", "v1", "--response"],
        r#"{"data": [{"id": "a", "status": "ok"}, {"id": "b"}]}"#,
    );
    expect(&o, 0);
    assert_eq!(
        json_out(&o),
        serde_json::json!({"payments": [{"transaction_id": "a"}, {"transaction_id": "b"}]})
    );
}

#[test]
fn translate_errors_print_the_filters_problem_and_exit_1() {
    // A missing required field: 422 naming the pointer.
    let o = translate(&["--route", "payments", "--to", "v2"], r#"{"amount": 1}"#);
    expect(&o, 1);
    let p = json_out(&o);
    assert_eq!(p["status"], 422, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("/customer_id"),
        "{p}"
    );
    assert!(stderr(&o).contains("422"), "{}", stderr(&o));
    // Not JSON: 400 with the position.
    let o = translate(&["--route", "payments", "--to", "v2"], "{\"amount\": ");
    expect(&o, 1);
    assert_eq!(json_out(&o)["status"], 400);
    // An unknown route names the routes there are.
    let o = translate(&["--route", "nope", "--to", "v2"], "{}");
    expect(&o, 1);
    assert!(stderr(&o).contains("routes: payments"), "{}", stderr(&o));
}

#[test]
fn translate_enforces_max_body_bytes_with_413() {
    let cfg = serde_json::json!({"translate": {"routes": [{
        "name": "small", "v1_prefix": "/v1", "v2_prefix": "/v2", "backend": "v2",
        "request": [{"v1": "/a", "v2": "/b"}], "max_body_bytes": 200}]}});
    let (_dir, path) = temp_file("small.json", &cfg.to_string());
    let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(300));
    let o = run_with_stdin(
        &[
            "translate",
            "--config",
            &path,
            "--route",
            "small",
            "--to",
            "v2",
        ],
        big.as_bytes(),
    );
    expect(&o, 1);
    assert_eq!(json_out(&o)["status"], 413);
}

#[test]
fn schema_prints_the_committed_schema() {
    let o = run(&["schema"]);
    expect(&o, 0);
    let committed = std::fs::read_to_string(repo().join("handoff.schema.json")).unwrap();
    assert!(
        stdout(&o) == committed,
        "handoff.schema.json is stale; regenerate it with\n    cargo run --bin handoffctl -- schema > handoff.schema.json"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn sync_leaves_the_committed_manifests_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("istio");
    copy_dir(&repo().join("istio"), &copy);
    let o = run(&["sync", copy.to_str().unwrap()]);
    expect(&o, 0);
    for file in manifests::yaml_files(&repo().join("istio")) {
        let rel = file.strip_prefix(repo().join("istio")).unwrap();
        assert!(
            std::fs::read_to_string(&file).unwrap()
                == std::fs::read_to_string(copy.join(rel)).unwrap(),
            "istio/{} differs from its Envoy twin's configuration; run `make istio-sync`",
            rel.display()
        );
    }
}

#[test]
fn sync_copies_each_twins_configuration_into_the_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("istio");
    copy_dir(&repo().join("istio"), &copy);
    let twin = std::fs::read_to_string(repo().join("envoy/client-side.yaml")).unwrap();
    assert!(twin.contains("\"percent\": 10,"));
    let (_d, client) = temp_file(
        "client.yaml",
        &twin.replace("\"percent\": 10,", "\"percent\": 33,"),
    );
    let o = run(&["sync", "--client", &client, copy.to_str().unwrap()]);
    expect(&o, 0);
    assert!(
        stdout(&o).contains("3 pluginConfig block(s) rewritten"),
        "{}",
        stdout(&o)
    );
    let mut seen = 0;
    for file in manifests::yaml_files(&copy) {
        for doc in manifests::yaml_docs(&file) {
            let Some(config) = manifests::plugin_config(&doc) else {
                continue;
            };
            let want = if doc["spec"]["match"][0]["mode"] == "CLIENT" {
                serde_json::json!(33)
            } else {
                serde_json::Value::Null
            };
            assert_eq!(config["canary"]["percent"], want, "{}", file.display());
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
    expect(&run(&["sync"]), 2);
}
