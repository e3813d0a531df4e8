//! The documentation's links hold: every relative link in README.md and docs/ names a file that
//! exists, and every `#anchor` names a heading (or an `<a id>`) of its target page; every problem
//! `type` the filter can send names a section of docs/problems.md.

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    files.extend(
        walkdir::WalkDir::new(root().join("docs"))
            .into_iter()
            .filter_map(Result::ok)
            .map(|e| e.into_path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    files.sort();
    files
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

struct Page {
    links: Vec<String>,
    anchors: BTreeSet<String>,
}

fn read_page(path: &Path) -> Page {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let ids = regex::Regex::new(r#"<a id="([^"]+)">"#).unwrap();
    let mut anchors: BTreeSet<String> =
        ids.captures_iter(&text).map(|c| c[1].to_string()).collect();
    let mut links = Vec::new();
    let mut heading: Option<String> = None;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for event in Parser::new(&text) {
        match event {
            Event::Start(Tag::Link { dest_url, .. }) => links.push(dest_url.to_string()),
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                // A repeated heading gets `-1`, `-2`, ... as on GitHub.
                let n = seen.entry(base.clone()).or_insert(0);
                anchors.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            _ => {}
        }
    }
    Page { links, anchors }
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let page = read_page(&file);
        let shown = file.strip_prefix(root()).unwrap().display().to_string();
        for link in &page.links {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !target.exists() {
                broken.push(format!("{shown}: {link} (no such file)"));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if target.extension().is_some_and(|e| e == "md")
                && !read_page(&target).anchors.contains(anchor)
            {
                broken.push(format!("{shown}: {link} (no such heading)"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_slug_is_githubs() {
    assert_eq!(slug("Sticky canary (`canary`)"), "sticky-canary-canary");
    assert_eq!(slug("Why etcd, not Redis"), "why-etcd-not-redis");
    assert_eq!(slug("idempotency-missing-key"), "idempotency-missing-key");
}

#[test]
fn problem_docs_points_at_docs_problems_md() {
    assert!(
        handoff::problem::PROBLEM_DOCS.ends_with("/docs/problems.md#"),
        "{}",
        handoff::problem::PROBLEM_DOCS
    );
}

/// String literals in src/ shaped like a problem type (`drain-drained`) that are something else.
const NOT_PROBLEM_TYPES: &[&str] = &["idempotency-key"];

/// Each problem type the filter can send is a string literal in src/ named after its capability
/// (`Reply::problem(409, "idempotency-in-flight", ...)`, or a constant passed to it): each one
/// must be a section of docs/problems.md.
#[test]
fn every_problem_type_has_a_section_in_docs_problems_md() {
    let sections = read_page(&root().join("docs/problems.md")).anchors;
    let literal =
        regex::Regex::new(r#""((?:canary|translate|idempotency|drain|guard)-[a-z0-9-]+)""#)
            .unwrap();
    let mut missing = BTreeSet::new();
    let mut found = 0;
    for entry in walkdir::WalkDir::new(root().join("src"))
        .into_iter()
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        for c in literal.captures_iter(&text) {
            let name = &c[1];
            if NOT_PROBLEM_TYPES.contains(&name) {
                continue;
            }
            found += 1;
            if !sections.contains(name) {
                let shown = path.strip_prefix(root()).unwrap().display();
                missing.insert(format!("{name} ({shown})"));
            }
        }
    }
    assert!(
        found >= 10,
        "the scan of src/ found only {found} problem types"
    );
    assert!(
        missing.is_empty(),
        "problem types without a `## <name>` section in docs/problems.md (or, if the string is \
         not a problem type, add it to NOT_PROBLEM_TYPES):\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}
