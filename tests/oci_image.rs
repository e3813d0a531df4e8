//! `handoffctl image` (what `make image` runs): the OCI image layout Istio pulls for oci://
//! URLs, inspected independently of the code that wrote it, and the manifests it renders.

mod manifests;

use manifests::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn handoffctl(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_handoffctl"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "handoffctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A tiny but well-formed module: the header Istio checks, and a custom section.
fn module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend_from_slice(&[0, 6, 5, b'h', b'e', b'l', b'l', b'o']);
    m
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        sha256_hex(&bytes),
        hex,
        "blob {digest} does not match its name"
    );
    bytes
}

/// Reads the layout as Istio's fetcher would and returns (manifest digest hex, plugin.wasm).
fn inspect(layout: &Path, tag: &str) -> (String, Vec<u8>) {
    let oci_layout: Value =
        serde_json::from_slice(&std::fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no manifest tagged {tag}: {index}"));
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let digest = desc["digest"].as_str().unwrap();
    let manifest_bytes = blob(layout, digest);
    assert_eq!(desc["size"], manifest_bytes.len());
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    // Istio's compat variant: exactly one tar+gzip layer holding plugin.wasm.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"],
        "compat"
    );
    let layer = blob(layout, layers[0]["digest"].as_str().unwrap());
    assert_eq!(layers[0]["size"], layer.len());
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&tar_bytes))
    );
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut entries = archive.entries().unwrap();
    let mut entry = entries.next().expect("one file").unwrap();
    assert_eq!(entry.path().unwrap().to_str(), Some("plugin.wasm"));
    let mut wasm = Vec::new();
    entry.read_to_end(&mut wasm).unwrap();
    drop(entry);
    assert!(entries.next().is_none(), "plugin.wasm only");
    (digest.trim_start_matches("sha256:").to_string(), wasm)
}

/// Every WasmPlugin / TrafficExtension under `dir` pins the right digest for its URL: the
/// image manifest digest for oci:// (what Istio checks), the module's sha256 otherwise.
fn assert_rendered(dir: &Path, manifest_digest: &str, wasm_sha256: &str) -> usize {
    let mut pinned = 0;
    for file in yaml_files(dir) {
        for doc in yaml_docs(&file) {
            let spec = match doc["kind"].as_str() {
                Some("WasmPlugin") => &doc["spec"],
                Some("TrafficExtension") => &doc["spec"]["wasm"],
                _ => continue,
            };
            let url = spec["url"].as_str().unwrap();
            let want = if url.starts_with("oci://") {
                manifest_digest
            } else {
                wasm_sha256
            };
            assert_eq!(spec["sha256"], want, "{} {url}", file.display());
            pinned += 1;
        }
    }
    pinned
}

#[test]
fn image_layout_holds_the_module_and_rendered_manifests_pin_it() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm_path = tmp.path().join("handoff.wasm");
    std::fs::write(&wasm_path, module()).unwrap();
    let out = tmp.path().join("oci");
    let rendered = tmp.path().join("istio");
    let printed = handoffctl(&[
        "image",
        "--wasm",
        wasm_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tag",
        "test",
        "--manifests",
        "istio",
        "--render",
        rendered.to_str().unwrap(),
    ]);
    let (digest, wasm) = inspect(&out, "test");
    assert_eq!(wasm, module());
    assert!(
        printed.contains(&format!("manifest digest: sha256:{digest}")),
        "{printed}"
    );
    assert!(printed.contains(&format!("wasm sha256: {}", sha256_hex(&module()))));
    let pinned = assert_rendered(&rendered, &digest, &sha256_hex(&module()));
    assert!(pinned >= 6, "{pinned}");

    // Only sha256 lines change: the rendered files are the sources otherwise.
    for src in yaml_files(&repo().join("istio")) {
        let rel = src.strip_prefix(repo().join("istio")).unwrap();
        let a = std::fs::read_to_string(&src).unwrap();
        let b = std::fs::read_to_string(rendered.join(rel)).unwrap();
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.trim_start().starts_with("sha256:"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&a), strip(&b), "{}", rel.display());
    }

    // Reproducible: the same module gives the same digest.
    handoffctl(&[
        "image",
        "--wasm",
        wasm_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tag",
        "test",
    ]);
    assert_eq!(inspect(&out, "test").0, digest);
}

#[test]
fn image_refuses_what_is_not_a_module_or_not_a_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let not_wasm = tmp.path().join("x.wasm");
    std::fs::write(&not_wasm, b"hello").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_handoffctl"))
        .args(["image", "--wasm", not_wasm.to_str().unwrap(), "--out"])
        .arg(tmp.path().join("oci"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    // An existing directory that is not an image layout is never deleted.
    std::fs::write(tmp.path().join("keep.txt"), b"x").unwrap();
    std::fs::write(&not_wasm, module()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_handoffctl"))
        .args(["image", "--wasm", not_wasm.to_str().unwrap(), "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(tmp.path().join("keep.txt").exists());
}

/// What `make image` produced (the Makefile sets HANDOFF_IMAGE_DIR for `make test`): the real
/// module, readable by skopeo, and pinned by the rendered manifests in target/istio.
#[test]
fn make_image_output_is_self_consistent() {
    let Some(layout) = std::env::var_os("HANDOFF_IMAGE_DIR").map(PathBuf::from) else {
        eprintln!("HANDOFF_IMAGE_DIR not set: run through `make image-test`");
        return;
    };
    let layout = repo().join(layout);
    let tag =
        std::env::var("HANDOFF_IMAGE_TAG").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    let (digest, wasm) = inspect(&layout, &tag);
    let module = std::fs::read(repo().join("target/wasm32-wasip1/release/handoff.wasm")).unwrap();
    assert_eq!(wasm, module, "the image holds the current build");
    let rendered = std::env::var_os("HANDOFF_RENDERED_DIR")
        .map(PathBuf::from)
        .unwrap();
    assert!(assert_rendered(&repo().join(rendered), &digest, &sha256_hex(&module)) >= 6);
    // A standard OCI tool reads the layout and computes the same digest.
    let o = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .output()
        .expect("skopeo (make apt-tools installs it)");
    assert!(
        o.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        sha256_hex(&o.stdout),
        digest,
        "skopeo's manifest is the one pinned"
    );
}
