//! Samples, their summary (median, min, max) and the one markdown table.

use std::fmt::Write as _;

/// Repeated measurements of one figure.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(pub(crate) Vec<f64>);

impl Samples {
    pub(crate) fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub(crate) fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub(crate) fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// The p-th percentile (0-100) of `values` (nearest rank).
pub(crate) fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Whether smaller or larger is better, for a target.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// No target.
    None,
    /// Met when the median is at most this.
    AtMost(f64),
    /// Met when the median is under this.
    Below(f64),
    /// Met when the median is at least this.
    AtLeast(f64),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) unit: &'static str,
    pub(crate) samples: Samples,
    /// The ratio column, already written (`0.42 × publish`), or empty.
    pub(crate) ratio: String,
    pub(crate) target: Target,
    /// Target text shown when there is one.
    pub(crate) target_text: String,
    /// Shown instead of numbers (e.g. "n/a (async tasks not built yet)").
    pub(crate) note: Option<String>,
    /// Runs that did not complete (not in the samples); any means missed.
    pub(crate) failed_runs: usize,
}

impl Row {
    pub(crate) fn new(figure: impl Into<String>, unit: &'static str, samples: Samples) -> Row {
        Row {
            figure: figure.into(),
            unit,
            samples,
            ratio: String::new(),
            target: Target::None,
            target_text: String::new(),
            note: None,
            failed_runs: 0,
        }
    }

    pub(crate) fn na(figure: impl Into<String>, note: &str) -> Row {
        let mut row = Row::new(figure, "", Samples::default());
        row.note = Some(note.to_owned());
        row
    }

    pub(crate) fn ratio(mut self, ratio: String) -> Row {
        self.ratio = ratio;
        self
    }

    pub(crate) fn target(mut self, target: Target, text: impl Into<String>) -> Row {
        self.target = target;
        self.target_text = text.into();
        self
    }

    pub(crate) fn failed_runs(mut self, n: usize) -> Row {
        self.failed_runs = n;
        self
    }

    /// `Some(true)` met, `Some(false)` missed, `None` no target.
    pub(crate) fn met(&self) -> Option<bool> {
        let m = self.samples.median();
        match self.target {
            Target::None => None,
            _ if self.note.is_some() => None,
            _ if self.failed_runs > 0 => Some(false),
            Target::AtMost(t) => Some(m <= t),
            Target::Below(t) => Some(m < t),
            Target::AtLeast(t) => Some(m >= t),
        }
    }
}

/// A number with a sensible precision for its size.
pub(crate) fn num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.is_infinite() {
        "∞".into()
    } else if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        // thousands separators
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn with_unit(v: f64, unit: &str) -> String {
    if unit.is_empty() {
        num(v)
    } else {
        format!("{} {unit}", num(v))
    }
}

/// The markdown table.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| figure | value (median) | min | max | runs | ratio to baseline | target | met |\n",
    );
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        if let Some(note) = &r.note {
            let target = if r.target_text.is_empty() {
                "-"
            } else {
                &r.target_text
            };
            let _ = writeln!(
                out,
                "| {} | {note} | - | - | - | - | {target} | - |",
                r.figure
            );
            continue;
        }
        let met = match r.met() {
            None => "-",
            Some(true) => "met",
            Some(false) => "**missed**",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.figure,
            with_unit(r.samples.median(), r.unit),
            num(r.samples.min()),
            num(r.samples.max()),
            if r.failed_runs > 0 {
                format!("{} (+{} failed)", r.samples.0.len(), r.failed_runs)
            } else {
                r.samples.0.len().to_string()
            },
            if r.ratio.is_empty() { "-" } else { &r.ratio },
            if r.target_text.is_empty() {
                "-"
            } else {
                &r.target_text
            },
            met,
        );
    }
    out
}
