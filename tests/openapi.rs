//! The OpenAPI document at `GET /openapi.json`: it is OpenAPI 3.1, open
//! without a token, every route it lists is served (none answers "no such
//! route"), every route the README and the guides under `docs/` name is in
//! it, and every `curl` example of theirs sends a body its schema accepts and
//! query parameters it lists. The property-based check of the bridge against
//! it (schemathesis) is `api_tester`.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::guides::readme_and_guides;
use crate::harness::{BmwProcess, TestEnv, http};

/// The document as `bmw run` serves it, with a token configured (the
/// document needs none).
async fn served_document(bmw: &BmwProcess) -> Value {
    let (status, doc) = http(
        Method::GET,
        &format!("{}/openapi.json", bmw.base_url()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    doc
}

/// Every `(method, path)` the document lists.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut all = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "delete", "put", "patch"] {
            if item.get(method).is_some() {
                all.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_lists_every_route_and_each_is_served() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &["--api-token", "secret-token-1"]).await;
    let doc = served_document(&bmw).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    // Every reference resolves (schemathesis, in `api_tester`, validates the
    // rest of the document when it loads it).
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 20, "{refs:?}");
    for pointer in refs {
        let target = pointer.strip_prefix('#').expect("a local reference");
        assert!(doc.pointer(target).is_some(), "{pointer} does not resolve");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]})
    );

    // Every documented operation is served: with the token and an empty
    // object, each answers something other than "no such route" (404
    // envelope from the fallback) or 405.
    let client = reqwest::Client::new();
    let ops = operations(&doc);
    assert!(ops.len() >= 16, "{ops:?}");
    for (method, path) in &ops {
        let response = client
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", bmw.base_url()),
            )
            .bearer_auth("secret-token-1")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        // An event stream is endless: its status is what counts here.
        let streaming = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
        let body = if streaming {
            String::new()
        } else {
            response.text().await.unwrap()
        };
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !body.contains("no such route"),
            "{method} {path} is documented but not served: {status} {body}"
        );
        // Each operation documents the status it answered.
        let documented = &doc["paths"][path][method.to_lowercase()]["responses"];
        assert!(
            documented.get(status.to_string()).is_some(),
            "{method} {path} answered {status}, not documented: {body}"
        );
    }

    // Every route the README and the guides name is documented.
    let mut named = 0;
    for (file, text) in readme_and_guides() {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for method in ["GET", "POST", "DELETE"] {
            for piece in text.split(&format!("`{method} /")).skip(1) {
                let path = format!("/{}", piece.split(['`', '?']).next().unwrap());
                assert!(
                    ops.contains(&(method.to_owned(), path.clone())),
                    "{file} names {method} {path}, which the document does not list"
                );
                named += 1;
            }
        }
    }
    assert!(named >= 8, "route mentions found: {named}");
}

/// Every `$ref` in `value`.
fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => refs.push(r.clone()),
                    _ => collect_refs(v, refs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

/// A `curl` command of the README or a guide: its method, path, query
/// parameter names and body.
#[derive(Debug)]
struct Example {
    method: String,
    path: String,
    query: Vec<String>,
    body: Option<String>,
}

/// The words of a shell command line starting at `text`: single and double
/// quotes (which may span lines), backslash-newline joins, up to an unquoted
/// newline or `#`.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '\n' | '#' => break,
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    w.push(q);
                }
            }
            other => word.get_or_insert_with(String::new).push(other),
        }
    }
    words.extend(word);
    words
}

/// Every `curl` to the bridge in the shell blocks of the README and the
/// guides, with the file it is in.
fn readme_examples() -> Vec<(String, Example)> {
    let mut examples = Vec::new();
    let documents = readme_and_guides();
    for (file, block) in documents
        .iter()
        .flat_map(|(file, text)| text.split("```bash").skip(1).map(move |b| (file, b)))
    {
        let block = block.split("```").next().unwrap();
        for (at, _) in block.match_indices("curl ") {
            let words = shell_words(&block[at..]);
            let mut method = None;
            let mut url = None;
            let mut body = None;
            let mut i = 1;
            while i < words.len() {
                let w = &words[i];
                if let Some(m) = w.strip_prefix("-X").filter(|m| !m.is_empty()) {
                    method = Some(m.to_owned());
                } else if w == "-X" || w == "--request" {
                    method = words.get(i + 1).cloned();
                    i += 1;
                } else if ["-d", "--data", "--data-raw"].contains(&w.as_str()) {
                    body = words.get(i + 1).cloned();
                    i += 1;
                } else if w == "--header" || w == "-H" {
                    i += 1;
                } else if w.starts_with("http") {
                    url = Some(w.clone());
                }
                i += 1;
            }
            let Some(url) = url.filter(|u| u.contains(":10211/")) else {
                continue;
            };
            let target = &url[url.find(":10211").unwrap() + 6..];
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            examples.push((
                file.clone(),
                Example {
                    method: method
                        .unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_owned()),
                    path: path.to_owned(),
                    query: query
                        .split('&')
                        .filter(|p| !p.is_empty())
                        .map(|p| p.split('=').next().unwrap().to_owned())
                        .collect(),
                    body,
                },
            ));
        }
    }
    examples
}

/// `schema` with the document's components beside it, so that its
/// `#/components/...` references resolve.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    jsonschema::draft202012::new(&root).expect("a valid JSON Schema")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_examples_match_the_document() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let doc = served_document(&bmw).await;
    let examples = readme_examples();
    assert!(examples.len() >= 20, "{examples:#?}");
    let mut bodies = 0;
    for (file, example) in &examples {
        let operation = &doc["paths"][&example.path][example.method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{file}: example {example:?}: the document has no such operation"
        );
        let params: Vec<&str> = operation["parameters"]
            .as_array()
            .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
            .unwrap_or_default();
        for name in &example.query {
            assert!(
                params.contains(&name.as_str()),
                "{file}: example {example:?}: query parameter {name} is not documented"
            );
        }
        let Some(body) = &example.body else { continue };
        let body: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{file}: example {example:?}: not JSON: {e}"));
        let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{file}: example {example:?}: no body documented"
        );
        let validator = validator(&doc, schema);
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{file}: example {example:?} does not match its schema: {errors:?}"
        );
        bodies += 1;
    }
    assert!(bodies >= 15, "bodies checked: {bodies}");

    // And the schema refuses what the parser refuses: an unknown option, a
    // kind without a type prefix.
    let create =
        &doc["paths"]["/bmw/task/"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let validator = validator(&doc, create);
    assert!(validator.is_valid(&json!({"kind": "daemon:demo:demo"})));
    assert!(!validator.is_valid(&json!({"kind": "daemon:demo:demo", "options": {"queu": "x"}})));
    assert!(!validator.is_valid(&json!({"kind": "demo"})));
    assert!(!validator.is_valid(&json!({"kind": "daemon:demo:demo", "options": {"retry": "ten"}})));
}
