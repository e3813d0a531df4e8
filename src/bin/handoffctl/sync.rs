//! Keeps the Istio manifests' plugin configurations equal to their standalone Envoy twins: the
//! `pluginConfig` of every WasmPlugin / TrafficExtension is replaced by the configuration of
//! the Envoy config for its `match` mode (CLIENT or SERVER). Only the `pluginConfig` block is
//! rewritten; comments and the rest of each file are kept.

use std::path::Path;

use crate::app::Failure;
use crate::extract;

pub struct Twins {
    pub client: String,
    pub server: String,
}

/// The plugin configuration of an Envoy twin as YAML, keys in their written order.
fn twin_yaml(path: &str) -> Result<serde_yaml_ng::Value, Failure> {
    let found = extract::plugin_configs(path)?;
    let [one] = &found[..] else {
        return Err(Failure::invalid(format!(
            "{path}: expected exactly one handoff filter, found {}",
            found.len()
        )));
    };
    let text = if one.json.trim().is_empty() {
        "{}"
    } else {
        &one.json
    };
    // JSON is YAML; the YAML mapping keeps the key order of the file.
    serde_yaml_ng::from_str(text)
        .map_err(|e| Failure::invalid(format!("{}: not JSON: {e}", one.label)))
}

/// Rewrites the manifests under `dir`; returns how many pluginConfig blocks changed.
pub fn sync(dir: &Path, twins: &Twins) -> Result<usize, Failure> {
    let client = twin_yaml(&twins.client)?;
    let server = twin_yaml(&twins.server)?;
    let mut files = Vec::new();
    crate::image::yaml_files(dir, &mut files).map_err(Failure::invalid)?;
    files.sort();
    let mut changed = 0;
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Failure::invalid(format!("cannot read {}: {e}", path.display())))?;
        let mut out = String::with_capacity(text.len());
        for doc in crate::image::split_documents(&text) {
            let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap_or_default();
            let kind = value.get("kind").and_then(|k| k.as_str());
            let mode = value
                .get("spec")
                .and_then(|s| s.get("match"))
                .and_then(|m| m.get(0))
                .and_then(|m| m.get("mode"))
                .and_then(|m| m.as_str());
            let config = match (kind, mode) {
                (Some("WasmPlugin" | "TrafficExtension"), Some("CLIENT")) => &client,
                (Some("WasmPlugin" | "TrafficExtension"), Some("SERVER")) => &server,
                _ => {
                    out.push_str(doc);
                    continue;
                }
            };
            let rewritten = replace_plugin_config(doc, config).ok_or_else(|| {
                Failure::invalid(format!(
                    "{}: a {} has no `pluginConfig:` line to rewrite",
                    path.display(),
                    kind.unwrap_or_default()
                ))
            })?;
            if rewritten != doc {
                changed += 1;
            }
            out.push_str(&rewritten);
        }
        if out != text {
            std::fs::write(&path, out)
                .map_err(|e| Failure::invalid(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    Ok(changed)
}

/// `doc` with its `pluginConfig:` block (the line and every following line indented deeper)
/// replaced by `config`.
fn replace_plugin_config(doc: &str, config: &serde_yaml_ng::Value) -> Option<String> {
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("pluginConfig:"))?;
    let indent = lines[start].len() - lines[start].trim_start().len();
    let mut end = start + 1;
    while end < lines.len() {
        let l = lines[end];
        let deeper = l.len() - l.trim_start().len() > indent;
        if l.trim().is_empty() || deeper {
            end += 1;
        } else {
            break;
        }
    }
    // Blank lines after the block belong to what follows.
    while end > start + 1 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    let pad = " ".repeat(indent);
    let mut block = String::new();
    let empty = config.as_mapping().is_some_and(|m| m.is_empty());
    if empty {
        block.push_str(&format!("{pad}pluginConfig: {{}}\n"));
    } else {
        block.push_str(&format!("{pad}pluginConfig:\n"));
        let mut yaml = String::new();
        emit(config, 0, &mut yaml);
        for line in yaml.lines() {
            block.push_str(&format!("{pad}  {line}\n"));
        }
    }
    let mut out: String = lines[..start].concat();
    out.push_str(&block);
    out.push_str(&lines[end..].concat());
    Some(out)
}

/// Block-style YAML for a JSON-like value. Strings are plain only when every YAML reader
/// (YAML 1.1 ones like Kubernetes' included) reads them back as the same string; otherwise
/// they are written as JSON strings, which are valid YAML double-quoted scalars.
fn emit(v: &serde_yaml_ng::Value, indent: usize, out: &mut String) {
    use serde_yaml_ng::Value as Y;
    let pad = " ".repeat(indent);
    match v {
        Y::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                out.push_str(&format!("{pad}{}:", scalar(k)));
                emit_child(v, indent, out);
            }
        }
        Y::Sequence(items) if !items.is_empty() => {
            for item in items {
                match item {
                    Y::Mapping(m) if !m.is_empty() => {
                        // `- key: value` with the rest of the mapping aligned after the dash.
                        let mut nested = String::new();
                        emit(item, indent + 2, &mut nested);
                        out.push_str(&format!("{pad}- {}", &nested[indent + 2..]));
                    }
                    // A list in a list: JSON, which is YAML flow style.
                    Y::Sequence(inner) if !inner.is_empty() => {
                        let json = serde_json::to_string(item).unwrap_or_default();
                        out.push_str(&format!("{pad}- {json}\n"));
                    }
                    _ => {
                        out.push_str(&format!("{pad}-"));
                        emit_child(item, indent, out);
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// After `key:` or `-`: a scalar or empty collection on the same line, else a nested block.
fn emit_child(v: &serde_yaml_ng::Value, indent: usize, out: &mut String) {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out);
        }
        Y::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            emit(v, indent, out);
        }
        other => out.push_str(&format!(" {}\n", scalar(other))),
    }
}

fn scalar(v: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => "null".to_string(),
        Y::Bool(b) => b.to_string(),
        Y::Number(n) => n.to_string(),
        Y::String(s) if is_plain(s) => s.clone(),
        Y::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Y::Mapping(_) => "{}".to_string(),
        Y::Sequence(_) => "[]".to_string(),
        Y::Tagged(t) => scalar(&t.value),
    }
}

fn is_plain(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
    ];
    let first = s.bytes().next();
    !s.is_empty()
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err()
        && first.is_some_and(|b| b.is_ascii_alphabetic() || b == b'/' || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emitted_yaml_reads_back_as_the_same_value() {
        let json = r##"{"a": {"b": [1, 2.5, {"c": "yes", "d": ["on", "", "1.0", "a: b", "#x"]}],
            "e": {}, "f": [], "g": null, "h": true, "i": "/data/*/id", "j": "x-user-id",
            "k": [[1], {"l": {"m": "n"}}], "null": "~", "12": "N"}}"##;
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(json).unwrap();
        let mut yaml = String::new();
        emit(&value, 0, &mut yaml);
        let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, value, "{yaml}");
        assert!(yaml.contains("c: \"yes\""), "{yaml}");
        assert!(yaml.contains("j: x-user-id"), "{yaml}");
    }

    #[test]
    fn only_the_plugin_config_block_is_replaced() {
        let doc = "spec:\n  # keep\n  pluginConfig:\n    a: 1\n\n    b: [1]\n  phase: AUTHZ\n";
        let config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(r#"{"z": 1, "a": {"b": [2]}}"#).unwrap();
        let out = replace_plugin_config(doc, &config).unwrap();
        assert_eq!(
            out,
            "spec:\n  # keep\n  pluginConfig:\n    z: 1\n    a:\n      b:\n      - 2\n  phase: AUTHZ\n"
        );
        let empty: serde_yaml_ng::Value = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(
            replace_plugin_config(&out, &empty).unwrap(),
            "spec:\n  # keep\n  pluginConfig: {}\n  phase: AUTHZ\n"
        );
    }
}
