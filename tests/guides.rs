//! The README and the guides under `docs/` (issue 26, part 6): the README
//! stays a five-minute read (at most 300 lines, the two commands first) and
//! links to every guide, each guide opens with a table of contents of its
//! sections, and every relative link and `#anchor` in them resolves, with
//! GitHub's anchors. `openapi` checks the routes and `curl` examples they
//! name against the OpenAPI document.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The repository's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The design notes: a record of decisions as they were taken, whose routes
/// and commands are history, so not a guide the examples are checked in.
const DESIGN_NOTES: &str = "docs/design-notes.md";

/// The README and every guide (each `docs/*.md` but the design notes), as
/// (path from the root, text), the README first, then by name.
pub(crate) fn readme_and_guides() -> Vec<(String, String)> {
    let mut guides: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|e| {
            e.expect("a docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .filter(|path| path != DESIGN_NOTES)
        .collect();
    guides.sort();
    let mut all = vec!["README.md".to_owned()];
    all.extend(guides);
    all.into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(root().join(&path))
                .unwrap_or_else(|e| panic!("read {path}: {e}"));
            (path, text)
        })
        .collect()
}

/// The README, the guides and the design notes: every file a link may
/// point into.
fn every_document() -> Vec<(String, String)> {
    let mut all = readme_and_guides();
    let notes = std::fs::read_to_string(root().join(DESIGN_NOTES)).expect("read the design notes");
    all.push((DESIGN_NOTES.to_owned(), notes));
    all
}

/// The lines of `text` outside fenced code blocks (the fences too).
fn prose_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The headings of `text` outside fenced code blocks, with their level.
fn headings(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for line in prose_lines(text) {
        let level = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&level) && line[level..].starts_with(' ') {
            out.push((level, line[level + 1..].trim().to_owned()));
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation dropped (letters,
/// digits, `-` and `_` kept), spaces made `-`.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of `text`'s headings, a repeated one with GitHub's `-1`,
/// `-2`... after it.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (_, heading) in headings(text) {
        let base = anchor(&heading);
        let mut candidate = base.clone();
        let mut n = 0;
        while all.contains(&candidate) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
        all.insert(candidate);
    }
    all
}

/// The targets of the markdown links and images of `text`, outside code
/// blocks and code spans.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(text) {
        // Code spans out: the pieces between backticks at odd places.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, piece)| piece)
            .collect::<Vec<_>>()
            .join(" ");
        for piece in prose.split("](").skip(1) {
            if let Some(end) = piece.find(')') {
                targets.push(piece[..end].to_owned());
            }
        }
    }
    targets
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let documents = every_document();
    let mut checked = 0;
    let mut broken = Vec::new();
    for (path, text) in &documents {
        let dir = Path::new(path).parent().unwrap_or(Path::new(""));
        for target in link_targets(text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if file.is_empty() {
                PathBuf::from(path)
            } else {
                normalize(&dir.join(file))
            };
            if !root().join(&linked).exists() {
                broken.push(format!("{path}: ({target}): no file {}", linked.display()));
                continue;
            }
            if fragment.is_empty() {
                continue;
            }
            let linked_text = std::fs::read_to_string(root().join(&linked)).unwrap();
            if !anchors(&linked_text).contains(fragment) {
                broken.push(format!("{path}: ({target}): no heading #{fragment}"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 100, "relative links checked: {checked}");
}

/// `a/../b` as `b`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn the_readme_is_short_and_links_to_every_guide() {
    let documents = readme_and_guides();
    let (_, readme) = &documents[0];
    let lines = readme.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines, more than 300");
    // Its first two commands: one starts the service (`service` runs it),
    // one runs the test suite.
    let first_block = readme.split("```bash\n").nth(1).expect("a bash block");
    let mut commands = first_block.lines();
    let (run, test) = (commands.next().unwrap(), commands.next().unwrap());
    assert!(run.starts_with("cargo run --release -- run "), "{run}");
    assert!(test.starts_with("cargo test "), "{test}");
    assert!(
        documents.len() >= 10,
        "guides: {:?}",
        documents.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    for (path, _) in &documents[1..] {
        assert!(
            readme.contains(&format!("]({path})")),
            "README.md does not link to {path}"
        );
    }
    assert!(readme.contains(&format!("]({DESIGN_NOTES})")));
}

#[test]
fn every_guide_opens_with_a_table_of_contents() {
    for (path, text) in &readme_and_guides()[1..] {
        let sections: Vec<_> = headings(text)
            .into_iter()
            .filter(|(level, _)| (2..=3).contains(level))
            .collect();
        assert!(sections.len() >= 2, "{path}: sections {sections:?}");
        let head = &text[..text.find("\n## ").expect("a section")];
        assert!(head.starts_with("# "), "{path} starts with its title");
        for (_, heading) in sections {
            let link = format!("](#{})", anchor(&heading));
            assert!(
                head.contains(&link),
                "{path}: the contents do not link to {heading:?}"
            );
        }
    }
}

#[test]
fn anchors_are_github_s() {
    assert_eq!(anchor("The seed's walkthrough"), "the-seeds-walkthrough");
    assert_eq!(anchor("What `always` costs"), "what-always-costs");
    assert_eq!(
        anchor("Producer paths: commands on `bmw.task.create`"),
        "producer-paths-commands-on-bmwtaskcreate"
    );
    assert_eq!(anchor("Full run (2026-11-25)"), "full-run-2026-11-25");
    let twice = anchors("## A\n\n## A\n```\n## not a heading\n```\n");
    assert_eq!(twice, BTreeSet::from(["a".to_owned(), "a-1".to_owned()]));
}

/// One setting as `bmw <role> --help` shows it: its flag, environment
/// variable and the default its help names, if any.
#[derive(Debug)]
struct HelpSetting {
    flag: String,
    env: Option<String>,
    default: Option<String>,
}

/// The settings `bmw <role> --help` lists (every role takes every setting).
fn help_settings(role: &str) -> Vec<HelpSetting> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bmw"))
        .args([role, "--help"])
        .output()
        .expect("run bmw --help");
    assert!(out.status.success(), "bmw {role} --help failed");
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    let mut settings = Vec::new();
    let mut lines = help.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(flag) = trimmed
            .split([' ', '['])
            .find(|word| word.starts_with("--"))
            .filter(|_| trimmed.starts_with('-'))
        else {
            continue;
        };
        // The description: the indented lines up to the next flag.
        let mut text = String::new();
        while let Some(next) = lines.peek() {
            if next.trim_start().starts_with('-') || next.trim().is_empty() {
                break;
            }
            text.push_str(next.trim());
            text.push(' ');
            lines.next();
        }
        let bracket = |name: &str| {
            let start = text.find(&format!("[{name}: "))? + name.len() + 3;
            let rest = &text[start..];
            let end = rest.find([']', ';', '='])?;
            Some(rest[..end].trim().to_owned())
        };
        settings.push(HelpSetting {
            flag: flag.to_owned(),
            env: bracket("env"),
            default: bracket("default"),
        });
    }
    settings
}

#[test]
fn every_setting_is_in_the_configuration_guide_with_its_env_var_and_default() {
    let guide = std::fs::read_to_string(root().join("docs/configuration.md")).expect("read guide");
    let rows: Vec<&str> = guide.lines().filter(|l| l.starts_with("| `--")).collect();
    let settings = help_settings("worker");
    assert!(settings.len() > 40, "too few settings found: {settings:?}");
    let mut wrong = Vec::new();
    for setting in settings
        .iter()
        .filter(|s| !["--help", "--version"].contains(&s.flag.as_str()))
    {
        let Some(row) = rows.iter().find(|row| {
            let first = row.replace("\\|", "/");
            let first = first.split('|').nth(1).unwrap_or("");
            first.contains(&format!("`{}`", setting.flag))
                || first.contains(&format!("`{}[", setting.flag))
                || first.contains(&format!("`{}`,", setting.flag))
        }) else {
            wrong.push(format!("{}: no row in the settings table", setting.flag));
            continue;
        };
        // `\|` is a bar inside a cell, not a cell's end.
        let unescaped = row.replace("\\|", "/");
        let cells: Vec<&str> = unescaped.split('|').map(str::trim).collect();
        if let Some(env) = &setting.env
            && !cells[2].contains(&format!("`{env}`"))
        {
            wrong.push(format!(
                "{}: the guide's env cell lacks `{env}`",
                setting.flag
            ));
        }
        if let Some(default) = &setting.default
            && !cells[3].contains(default.as_str())
        {
            wrong.push(format!(
                "{}: --help says the default is `{default}`, the guide `{}`",
                setting.flag, cells[3]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the settings table and --help disagree:\n{}",
        wrong.join("\n")
    );
}
