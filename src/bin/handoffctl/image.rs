//! The OCI image Istio pulls for `oci://` WasmPlugin URLs, written as an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/`) without a container engine.
//!
//! Format: the Wasm image spec's *compat* variant, which every Istio release with OCI support
//! accepts (istio `pkg/wasm/imagefetcher.go`): an OCI manifest with one
//! `application/vnd.oci.image.layer.v1.tar+gzip` layer whose tar holds `plugin.wasm`, and the
//! annotation `module.wasm.image/variant: compat`. The output is reproducible: the same module
//! always gives the same digests (fixed tar metadata, no gzip timestamp, no creation date), so
//! a digest pinned in a manifest identifies the module.
//!
//! Istio compares a WasmPlugin's `sha256` with the image *manifest* digest for `oci://` URLs,
//! and with the module's own sha256 for `http(s)://` URLs; `file://` modules are loaded by
//! Envoy as local files (the value is then documentation).

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// What was written: the digests (hex, without `sha256:`) a manifest pins.
pub struct Built {
    pub manifest_digest: String,
    pub wasm_sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn write_layout(wasm: &[u8], out: &Path, tag: &str) -> Result<Built, String> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err("image: the module is not a wasm binary (no \\0asm header)".to_string());
    }
    if tag.is_empty()
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!("image: invalid tag `{tag}`"));
    }
    prepare_dir(out)?;

    let tar = layer_tar(wasm).map_err(|e| format!("image: cannot build the layer: {e}"))?;
    let layer = gzip(&tar).map_err(|e| format!("image: cannot compress the layer: {e}"))?;
    let config = serde_json::to_vec(&json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]},
    }))
    .map_err(|e| e.to_string())?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config),
        "layers": [descriptor(LAYER_MEDIA_TYPE, &layer)],
        "annotations": {
            "module.wasm.image/variant": "compat",
            "org.opencontainers.image.title": "handoff",
            "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
        },
    }))
    .map_err(|e| e.to_string())?;
    let mut manifest_desc = descriptor(MANIFEST_MEDIA_TYPE, &manifest);
    manifest_desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [manifest_desc],
    }))
    .map_err(|e| e.to_string())?;

    for blob in [&config, &layer, &manifest] {
        write(&out.join("blobs/sha256").join(sha256_hex(blob)), blob)?;
    }
    write(&out.join("index.json"), &index)?;
    write(
        &out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(Built {
        manifest_digest: sha256_hex(&manifest),
        wasm_sha256: sha256_hex(wasm),
    })
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256_hex(blob)),
        "size": blob.len(),
    })
}

/// Starts `out` afresh, refusing to delete a directory that is not an image layout.
fn prepare_dir(out: &Path) -> Result<(), String> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map_err(|e| format!("image: cannot read {}: {e}", out.display()))?
            .next()
            .is_none();
        if !empty && !out.join("oci-layout").exists() {
            return Err(format!(
                "image: {} exists and is not an OCI image layout; choose another --out",
                out.display()
            ));
        }
        std::fs::remove_dir_all(out)
            .map_err(|e| format!("image: cannot clear {}: {e}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("blobs/sha256"))
        .map_err(|e| format!("image: cannot create {}: {e}", out.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("image: cannot write {}: {e}", path.display()))
}

fn layer_tar(wasm: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, "plugin.wasm", wasm)?;
    builder.into_inner()
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    // No file name and mtime 0 in the gzip header: reproducible output.
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)?;
    enc.finish()
}

/// Copies every `*.yaml` under `src` (recursively) to the same place under `dest`, setting
/// each document's `sha256:` lines for the document's `url:`. Comments and layout are kept
/// (line edits, not a YAML round trip). Returns how many values were set.
pub fn render_manifests(src: &Path, dest: &Path, built: &Built) -> Result<usize, String> {
    let mut files = Vec::new();
    yaml_files(src, &mut files)?;
    files.sort();
    let mut changed = 0;
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("image: cannot read {}: {e}", path.display()))?;
        let (rendered, n) = set_digests(&text, built);
        changed += n;
        // `path` was found under `src`.
        let target = dest.join(path.strip_prefix(src).unwrap_or(&path));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("image: cannot create {}: {e}", dir.display()))?;
        }
        if rendered != text || target != path {
            write(&target, rendered.as_bytes())?;
        }
    }
    Ok(changed)
}

pub fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("image: cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("image: cannot read {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// The `sha256` a document with this `url` must carry.
fn digest_for(url: &str, built: &Built) -> String {
    if url.starts_with("oci://") {
        built.manifest_digest.clone()
    } else {
        built.wasm_sha256.clone()
    }
}

fn set_digests(text: &str, built: &Built) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut changed = 0;
    for doc in split_documents(text) {
        let url = doc.lines().find_map(|l| {
            let rest = l.trim_start().strip_prefix("url:")?;
            Some(rest.trim().trim_matches(|c| c == '"' || c == '\''))
        });
        let Some(url) = url else {
            out.push_str(doc);
            continue;
        };
        let digest = digest_for(url, built);
        for line in doc.split_inclusive('\n') {
            let indent = line.len() - line.trim_start().len();
            match line.trim_start().strip_prefix("sha256:") {
                Some(_) => {
                    let eol = if line.ends_with('\n') { "\n" } else { "" };
                    out.push_str(&format!("{}sha256: {digest}{eol}", &line[..indent]));
                    changed += 1;
                }
                None => out.push_str(line),
            }
        }
    }
    (out, changed)
}

/// Splits YAML text at `---` lines, each part keeping its separator line.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" && offset > start {
            parts.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built() -> Built {
        Built {
            manifest_digest: "a".repeat(64),
            wasm_sha256: "b".repeat(64),
        }
    }

    #[test]
    fn digests_follow_each_documents_url() {
        let text = "# c\nkind: WasmPlugin\nspec:\n  url: oci://r/h:1\n  sha256: 00\n---\n\
                    kind: WasmPlugin\nspec:\n  url: file:///w/h.wasm\n  sha256: 00\n---\nkind: X\n";
        let (out, n) = set_digests(text, &built());
        assert_eq!(n, 2);
        assert!(out.starts_with("# c\n"));
        assert!(out.contains(&format!("  sha256: {}\n---", "a".repeat(64))));
        assert!(out.contains(&format!("  sha256: {}\n---\nkind: X\n", "b".repeat(64))));
    }

    #[test]
    fn tar_layer_is_reproducible() {
        let wasm = b"\0asm\x01\0\0\0";
        assert_eq!(
            gzip(&layer_tar(wasm).unwrap()).unwrap(),
            gzip(&layer_tar(wasm).unwrap()).unwrap()
        );
    }
}
