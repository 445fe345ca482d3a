//! [`render`]: an answer of `bmw task` as a plain-text table for a person
//! (`--table`), where JSON is what scripts read. A list of objects becomes
//! one line per object under a header of their scalar fields (nested values
//! are left out: `--table` is for looking, JSON for everything), the
//! naming ones first; one object becomes `key  value` lines; anything else
//! is printed as JSON.

use serde_json::{Map, Value};

/// The text of `answer` as a table, ending with a newline.
pub fn render(answer: &Value) -> String {
    match answer {
        Value::Array(rows) if rows.iter().all(Value::is_object) => rows_table(rows),
        Value::Object(fields) => fields_table(fields),
        other => format!("{other}\n"),
    }
}

/// Columns shown first when present: what names a task.
const FIRST: [&str; 5] = ["uni_id", "task_id", "kind", "queue", "state"];

/// A cell: strings without quotes, null as `-`, nested values as `{...}`/`[...]`.
fn cell(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.replace(['\n', '\t'], " ")),
        Value::Null => Some("-".into()),
        Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

fn rows_table(rows: &[Value]) -> String {
    // Columns: every field that is a scalar in some row, names first, then
    // in the order of the keys.
    let mut columns: Vec<&str> = Vec::new();
    for row in rows.iter().filter_map(Value::as_object) {
        for (key, value) in row {
            if cell(value).is_some() && !columns.contains(&key.as_str()) {
                columns.push(key);
            }
        }
    }
    columns.sort_by_key(|c| (FIRST.iter().position(|f| f == c).unwrap_or(FIRST.len()), *c));
    if columns.is_empty() {
        return if rows.is_empty() {
            "(none)\n".into()
        } else {
            format!("{}\n", Value::Array(rows.to_vec()))
        };
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .filter_map(Value::as_object)
        .map(|row| {
            columns
                .iter()
                .map(|c| row.get(*c).and_then(cell).unwrap_or_default())
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(columns.clone());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn fields_table(fields: &Map<String, Value>) -> String {
    let width = fields.keys().map(|k| k.chars().count()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(key, value)| {
            let text = cell(value).unwrap_or_else(|| value.to_string());
            format!("{key:<width$}  {text}\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_get_a_header_of_their_scalar_fields() {
        let rows = json!([
            {"uni_id": "a", "kind": "daemon:x", "payload": {"n": 1}, "retries": 0},
            {"uni_id": "bbb", "kind": "daemon:y", "worker_id": null},
        ]);
        assert_eq!(
            render(&rows),
            "uni_id  kind      retries  worker_id\n\
             a       daemon:x  0\n\
             bbb     daemon:y           -\n"
        );
        assert_eq!(render(&json!([])), "(none)\n");
    }

    #[test]
    fn one_object_is_key_value_lines() {
        let answer = json!({"result": true, "data": {"task_id": "t"}});
        assert_eq!(
            render(&answer),
            "data    {\"task_id\":\"t\"}\nresult  true\n"
        );
    }
}
