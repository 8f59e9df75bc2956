//! Progress of long work — a backfill or catch-up, a state restore — with what is left, the
//! rate and an ETA: a bar when stderr is a terminal, else a log line now and then. Work that
//! ends within a moment shows nothing.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Work shorter than this shows no progress.
const MOMENT: Duration = Duration::from_secs(2);
/// How often a log line reports progress when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One piece of long work, counted in `unit`s.
pub struct Progress {
    what: String,
    unit: &'static str,
    started: Instant,
    done: u64,
    total: u64,
    bar: Option<ProgressBar>,
    logged: Option<Instant>,
}

impl Progress {
    pub fn start(what: impl Into<String>, unit: &'static str) -> Progress {
        Progress { what: what.into(), unit, started: Instant::now(), done: 0, total: 0, bar: None, logged: None }
    }

    /// `by` more done, `left` still to do (the total may grow: input keeps arriving).
    pub fn advance(&mut self, by: u64, left: u64) {
        self.done += by;
        self.total = self.done + left;
        let elapsed = self.started.elapsed();
        if elapsed < MOMENT {
            return;
        }
        if std::io::stderr().is_terminal() {
            let (rate, eta) = (self.rate(), self.eta());
            let bar = self.bar.get_or_insert_with(|| bar(&self.what, self.unit));
            bar.set_length(self.total);
            bar.set_position(self.done);
            bar.set_message(format!("{rate:.0} {}/s, ETA {eta}", self.unit));
        } else if self.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            self.logged = Some(Instant::now());
            tracing::info!("{}", self.line());
        }
    }

    /// The work is done: the bar goes, and a summary is logged if progress was shown.
    pub fn finish(self) {
        let shown = self.bar.is_some() || self.logged.is_some();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if shown {
            let took = self.started.elapsed().as_secs_f64();
            tracing::info!(
                "{}: done, {} {} in {took:.1} s ({:.0} {}/s)",
                self.what,
                self.done,
                self.unit,
                self.done as f64 / took.max(1e-6),
                self.unit
            );
        }
    }

    /// `what: done of total units (p%), left, rate, ETA`.
    fn line(&self) -> String {
        let percent = 100.0 * self.done as f64 / (self.total.max(1)) as f64;
        format!(
            "{}: {} of {} {} ({percent:.0}%), {} left, {:.0} {}/s, ETA {}",
            self.what,
            self.done,
            self.total,
            self.unit,
            self.total - self.done,
            self.rate(),
            self.unit,
            self.eta()
        )
    }

    /// Units per second since the work started (the bar's own estimate would start late).
    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-6)
    }

    fn eta(&self) -> String {
        match self.rate() > 0.0 {
            true => format!("{:.0} s", (self.total - self.done) as f64 / self.rate()),
            false => "unknown".into(),
        }
    }
}

fn bar(what: &str, unit: &str) -> ProgressBar {
    let template = format!("{what} [{{bar:40}}] {{human_pos}}/{{human_len}} {unit} ({{msg}})");
    let style = ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> ");
    ProgressBar::new(0).with_style(style)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_what_is_left_the_rate_and_when_it_ends() {
        let mut progress = Progress::start("catching up", "records");
        progress.started -= Duration::from_secs(10);
        (progress.done, progress.total) = (1_000, 4_000);
        assert_eq!(progress.line(), "catching up: 1000 of 4000 records (25%), 3000 left, 100 records/s, ETA 30 s");
    }
}
