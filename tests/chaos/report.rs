//! One row per scenario, printed as a Markdown table row (and appended to
//! `chaos-report.md` in Cargo's test scratch directory, so a whole run's
//! table can be pasted into `docs/operations.md`).

use std::io::Write;
use std::time::Duration;

/// What one scenario measured.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    pub(crate) fault: String,
    pub(crate) load: String,
    pub(crate) lost: usize,
    pub(crate) duplicated: usize,
    pub(crate) duplicate_bound: String,
    pub(crate) double_run: Duration,
    pub(crate) daemon_runs: usize,
    pub(crate) restarts: usize,
    pub(crate) recovery: Duration,
    pub(crate) ticks: String,
}

pub(crate) const HEADER: &str = "| scenario | fault | load | lost | duplicated (bound) | longest double run (daemon runs seen) | instance restarts | recovery | periodic ticks ran / due |\n\
                          | --- | --- | --- | --- | --- | --- | --- | --- | --- |";

impl Row {
    pub(crate) fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} ({}) | {:.2} s ({}) | {} | {:.1} s | {} |",
            self.scenario,
            self.fault,
            self.load,
            self.lost,
            self.duplicated,
            self.duplicate_bound,
            self.double_run.as_secs_f64(),
            self.daemon_runs,
            self.restarts,
            self.recovery.as_secs_f64(),
            self.ticks
        )
    }

    /// Prints the row under the header and appends it to the report file.
    pub(crate) fn publish(&self) {
        let row = self.markdown();
        eprintln!("{HEADER}\n{row}");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.md");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(file, "{row}");
        }
    }
}
