//! The module layering `src/lib.rs` states holds: every module of `src/`
//! depends only on modules below it, and no modules import each other in a
//! circle, at the level of the crate's modules and inside each folder
//! module. Read from the source files (`use crate::...`, `crate::x::...`,
//! `super::x`), outside comments and test modules (inline or `tests.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first, as `src/lib.rs` states them. A module may use
/// modules of lower layers only (and its own submodules).
const LAYERS: &[&[&str]] = &[
    &["shutdown"],
    &["nats", "metrics", "logging", "traces"],
    &["task", "config", "events"],
    &["membership"],
    &["daemon", "queue"],
    &["periodic"],
    &["registry"],
    &["external"],
    &["ops"],
    &["command", "builtin"],
    &["client"],
    &["bridge", "worker"],
    &["service"],
    &["cli"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` -> `["a", "b"]`; `src/a/mod.rs` -> `["a"]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or(text);
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths a piece of code names, resolved from `here`.
fn references(code: &str, here: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| {
                !p.is_empty() && p.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            })
            .collect()
    };
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", here[..here.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            // Not part of a longer name (`my_crate::`).
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let heads: Vec<Vec<String>> = if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                inner.split(',').map(|s| ident(s.trim())).collect()
            } else {
                vec![ident(rest)]
            };
            for head in heads.into_iter().filter(|h| !h.is_empty()) {
                let mut path = base.clone();
                path.extend(head);
                out.insert(path);
            }
        }
    }
    out
}

/// A cycle in `edges`, if any (as the list of nodes around it).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut done, &mut Vec::new()))
}

#[test]
fn modules_depend_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Inside each folder module: submodule -> sibling submodules it uses.
    let mut inner: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let here = module_path(&src, file);
        // A test module in its own file (`config/tests.rs`) is test code.
        if here.is_empty()
            || here == ["main"]
            || here == ["lib"]
            || here.last().is_some_and(|m| m == "tests")
        {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read file");
        for target in references(&code(&text), &here) {
            if target.is_empty() {
                continue;
            }
            if target[0] != here[0] {
                top.entry(here[0].clone())
                    .or_default()
                    .insert(target[0].clone());
            } else if here.len() > 1 && target.len() > 1 && target[1] != here[1] {
                inner
                    .entry(here[0].clone())
                    .or_default()
                    .entry(here[1].clone())
                    .or_default()
                    .insert(target[1].clone());
            }
        }
    }
    if let Some(cycle) = find_cycle(&top) {
        panic!(
            "modules import each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
    for (module, edges) in &inner {
        if let Some(cycle) = find_cycle(edges) {
            panic!("inside `{module}`: {}", cycle.join(" -> "));
        }
    }
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut upward = Vec::new();
    for (from, tos) in &top {
        let Some(from_layer) = layer(from) else {
            panic!("module `{from}` is in no layer of this test (and of src/lib.rs)");
        };
        for to in tos {
            match layer(to) {
                Some(to_layer) if to_layer < from_layer => {}
                _ => upward.push(format!("{from} -> {to}")),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "dependencies that do not go down: {upward:?}"
    );
}
