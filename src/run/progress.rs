//! What a run shows while it works: a one-line bar on a terminal, plain log
//! lines elsewhere (a pipe, a file, a daemon job's `worker.log`, which
//! `mezod logs --follow` prints: carriage-return redraws would fill it).
//!
//! Rates and times left are measured from this process's own steps: after a
//! resume the steps done before it took no time here, and counting them made
//! a run that had 28 s left say `114.6/s … ETA 1s`.  Evaluations report their
//! own progress, so a long one is not minutes of silence.  Log lines written
//! while the bar is up go through [`LogWriter`], which lifts the bar for them
//! (a line written under it would be erased by the next redraw).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Width of the bar itself, in columns.
pub const BAR_WIDTH: usize = 16;
/// The bar's line: elapsed time, the bar, then a status made by [`step_status`]
/// or [`eval_status`] (at most [`STATUS_WIDTH`] columns: the line fits 80).
const TEMPLATE: &str = "{elapsed_precise} {bar:16} {msg}";
/// Columns left for the status after the elapsed time and the bar.
pub const STATUS_WIDTH: usize = 80 - 8 - 1 - BAR_WIDTH - 1;
/// Plain training lines: at every 5 % of the run, and at least this often.
const STEP_LINE_EVERY: Duration = Duration::from_secs(60);
/// Plain evaluation lines: this often while an evaluation runs.
const EVAL_LINE_EVERY: Duration = Duration::from_secs(10);

/// The pace of work started in this process: `first` of `total` units were
/// done when it started at `start`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    first: u64,
    total: u64,
    start: Instant,
}

impl Pace {
    pub fn new(first: u64, total: u64, start: Instant) -> Self {
        Self {
            first,
            total,
            start,
        }
    }

    /// Units per second and the time left at `position`, from the units this
    /// process did; `None` until it has done one.
    pub fn at(&self, position: u64, now: Instant) -> (Option<f64>, Option<Duration>) {
        let done_here = position.saturating_sub(self.first);
        let secs = now.saturating_duration_since(self.start).as_secs_f64();
        if done_here == 0 || secs <= 0.0 {
            return (None, None);
        }
        let rate = done_here as f64 / secs;
        let left = self.total.saturating_sub(position) as f64 / rate;
        (Some(rate), Some(Duration::from_secs_f64(left.min(1e9))))
    }
}

/// `m:ss`, or `h:mm:ss` from an hour on.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// A rate as people read it: `4.55/s`, or `12.3 s/it` below one a second.
fn rate_text(rate: Option<f64>, unit: &str) -> String {
    match rate {
        None => "-".into(),
        Some(r) if r >= 1.0 => format!("{r:.1}/s"),
        Some(r) => format!("{:.1} s/{unit}", 1.0 / r),
    }
}

/// A rate in words for log lines: `4.55 steps/s`, or `12.3 s/step`.
fn rate_words(rate: Option<f64>, unit: &str) -> String {
    match rate {
        None => format!("- {unit}s/s"),
        Some(r) if r >= 1.0 => format!("{r:.2} {unit}s/s"),
        Some(r) => format!("{:.1} s/{unit}", 1.0 / r),
    }
}

fn eta_text(eta: Option<Duration>) -> String {
    eta.map_or("-".into(), clock)
}

/// A loss in at most 10 columns.
fn loss_text(loss: f64) -> String {
    if loss.is_finite() && loss.abs() < 1e4 {
        format!("{loss:.4}")
    } else {
        format!("{loss:.2e}")
    }
}

/// The bar's status while training: `120/300 4.6/s ETA 0:39 loss 0.6931`.
pub fn step_status(position: u64, total: u64, pace: &Pace, now: Instant, loss: f64) -> String {
    let (rate, eta) = pace.at(position, now);
    format!(
        "{position}/{total} {} ETA {} loss {}",
        rate_text(rate, "step"),
        eta_text(eta),
        loss_text(loss)
    )
}

/// The bar's status while evaluating: `dev 48/200 37.2/s ETA 0:04`.
pub fn eval_status(split: &str, done: usize, total: usize, pace: &Pace, now: Instant) -> String {
    let (rate, eta) = pace.at(done as u64, now);
    format!(
        "{split} {done}/{total} {} ETA {}",
        rate_text(rate, "example"),
        eta_text(eta)
    )
}

/// The bar on the screen now, for [`LogWriter`].
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn set_active(bar: Option<&ProgressBar>) {
    *ACTIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar.cloned();
}

/// Log output that lifts the progress bar off the screen while a line is
/// written, so that lines and bar never overwrite each other
/// (`tracing_subscriber`'s writer for the engine).  Its errors are the
/// caller's: `mezod_core::cli` drops a line that cannot be written, and
/// notes a reader that has gone.
#[derive(Default, Clone, Copy)]
pub struct LogWriter;

/// One write through [`LogWriter`] into `inner`.
pub struct SuspendingWriter<W: Write> {
    pub inner: W,
}

impl<W: Write> SuspendingWriter<W> {
    /// `write` into `inner` with the bar off the screen, if one is up.
    /// [`ACTIVE_BAR`]'s lock is let go first: only the bar's own is held
    /// while the line is written (`suspend`), as while it draws.
    fn lifted<T>(&mut self, write: impl FnOnce(&mut W) -> T) -> T {
        let bar = ACTIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) if !bar.is_finished() => bar.suspend(|| write(&mut self.inner)),
            _ => write(&mut self.inner),
        }
    }
}

impl<W: Write> Write for SuspendingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lifted(|w| w.write(buf))
    }
    /// A whole line under one lift (the bar is not redrawn between pieces).
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.lifted(|w| w.write_all(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = SuspendingWriter<std::io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        SuspendingWriter {
            inner: std::io::stderr(),
        }
    }
}

/// How a run shows its progress.
pub struct Progress {
    /// The bar (a terminal), or `None` for plain lines.
    bar: Option<ProgressBar>,
    pace: Pace,
    total: u64,
    /// Plain lines: the last one, and every how many steps one is due.
    last_line: Instant,
    every: u64,
}

impl Progress {
    /// Progress of steps `done..total` of a run: a bar when `terminal`
    /// (stderr is one), plain log lines otherwise.
    pub fn new(terminal: bool, done: u64, total: u64) -> Self {
        let bar = terminal.then(|| Self::bar_on(ProgressDrawTarget::stderr(), done, total));
        Self::with_bar(bar, done, total)
    }

    /// A bar drawn to `target` (a terminal; tests draw to one in memory).
    pub fn bar_on(target: ProgressDrawTarget, done: u64, total: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total), target).with_position(done);
        bar.set_style(ProgressStyle::with_template(TEMPLATE).expect("a valid template"));
        bar
    }

    /// Progress shown on `bar`, or in plain lines without one.
    pub fn with_bar(bar: Option<ProgressBar>, done: u64, total: u64) -> Self {
        set_active(bar.as_ref());
        let now = Instant::now();
        Self {
            bar,
            pace: Pace::new(done, total, now),
            total,
            last_line: now,
            every: (total / 20).max(1),
        }
    }

    /// Steps start now (evaluations before the first step do not count in
    /// the pace; later ones do, as they recur until the end).
    pub fn start_steps(&mut self, done: u64) {
        self.pace = Pace::new(done, self.total, Instant::now());
        self.last_line = Instant::now();
    }

    /// Step `n` of the run is done with `loss` (loss+) and `grad`.
    pub fn step(&mut self, n: u64, loss: f64, grad: f64) {
        let now = Instant::now();
        match &self.bar {
            Some(bar) => {
                bar.set_position(n);
                bar.set_message(step_status(n, self.total, &self.pace, now, loss));
            }
            None => {
                let due = n.is_multiple_of(self.every)
                    || n == self.total
                    || now.duration_since(self.last_line) >= STEP_LINE_EVERY;
                if due {
                    self.last_line = now;
                    let (rate, eta) = self.pace.at(n, now);
                    tracing::info!(
                        "step {n}/{}: loss {}, projected grad {grad:+.4e}, {}, elapsed {}, ETA {}",
                        self.total,
                        loss_text(loss),
                        rate_words(rate, "step"),
                        clock(now.duration_since(self.pace.start)),
                        eta_text(eta)
                    );
                }
            }
        }
    }

    /// Progress of an evaluation of `examples` examples of `split` at `step`:
    /// the bar counts examples until it ends; without a bar, a line as it
    /// starts and one every few seconds.
    pub fn evaluation(&self, split: &str, step: u64, examples: usize) -> EvalProgress {
        let now = Instant::now();
        let restore = self.bar.as_ref().map(|b| {
            (
                b.length().unwrap_or(self.total),
                b.position(),
                b.message().to_string(),
            )
        });
        match &self.bar {
            Some(bar) => {
                bar.set_length(examples as u64);
                bar.set_position(0);
                bar.set_message(format!("{split} 0/{examples}"));
            }
            None => tracing::info!("step {step}: evaluating {examples} {split} examples"),
        }
        EvalProgress {
            bar: self.bar.clone(),
            split: split.to_string(),
            step,
            total: examples,
            pace: Pace::new(0, examples as u64, now),
            last_line: now,
            restore,
        }
    }

    /// Training ended: the bar goes.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Stopped by a signal: the bar stays where it was.
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

impl Drop for Progress {
    /// Whatever ended the run (an error too), the bar stops being redrawn
    /// and log lines no longer lift it.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        set_active(None);
    }
}

/// One evaluation's progress (see [`Progress::evaluation`]).
pub struct EvalProgress {
    bar: Option<ProgressBar>,
    split: String,
    step: u64,
    total: usize,
    pace: Pace,
    last_line: Instant,
    /// The training bar's length, position and status, put back when it ends.
    restore: Option<(u64, u64, String)>,
}

impl EvalProgress {
    /// `done` of the examples are evaluated.
    pub fn update(&mut self, done: usize) {
        let now = Instant::now();
        match &self.bar {
            Some(bar) => {
                bar.set_position(done as u64);
                bar.set_message(eval_status(&self.split, done, self.total, &self.pace, now));
            }
            None if now.duration_since(self.last_line) >= EVAL_LINE_EVERY && done < self.total => {
                self.last_line = now;
                let (rate, eta) = self.pace.at(done as u64, now);
                tracing::info!(
                    "step {}: {} {done}/{} examples ({:.0} %), {}, ETA {}",
                    self.step,
                    self.split,
                    self.total,
                    100.0 * done as f64 / self.total.max(1) as f64,
                    rate_words(rate, "example"),
                    eta_text(eta)
                );
            }
            None => {}
        }
    }
}

impl Drop for EvalProgress {
    fn drop(&mut self) {
        if let (Some(bar), Some((length, position, status))) = (&self.bar, self.restore.take()) {
            bar.set_length(length);
            bar.set_position(position);
            bar.set_message(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_time_left_count_only_this_processs_steps() {
        let start = Instant::now();
        // Resumed at step 280 of 300; two steps here in two seconds.
        let pace = Pace::new(280, 300, start);
        assert_eq!(pace.at(280, start + Duration::from_secs(1)), (None, None));
        let (rate, eta) = pace.at(282, start + Duration::from_secs(2));
        assert_eq!(rate, Some(1.0));
        assert_eq!(eta, Some(Duration::from_secs(18)));
        let now = start + Duration::from_secs(2);
        assert_eq!(
            step_status(282, 300, &pace, now, 0.5),
            "282/300 1.0/s ETA 0:18 loss 0.5000"
        );
        // Slow steps read as seconds per step.
        let (rate, _) = pace.at(281, start + Duration::from_secs(8));
        assert_eq!(rate_text(rate, "step"), "8.0 s/step");
        assert_eq!(rate_words(rate, "step"), "8.0 s/step");
        assert_eq!(rate_words(Some(4.554), "step"), "4.55 steps/s");
    }

    #[test]
    fn clocks_read_as_minutes_then_hours() {
        assert_eq!(clock(Duration::from_secs(59)), "0:59");
        assert_eq!(clock(Duration::from_secs(3599)), "59:59");
        assert_eq!(clock(Duration::from_secs(3 * 3600 + 62)), "3:01:02");
    }

    #[test]
    fn the_bar_line_fits_80_columns() {
        let start = Instant::now();
        let worst = [
            // A long run, resumed, slow, with a large loss.
            step_status(
                123_456,
                999_999,
                &Pace::new(0, 999_999, start),
                start + Duration::from_secs(99 * 3600),
                -1234.5678,
            ),
            step_status(
                999_998,
                999_999,
                &Pace::new(999_990, 999_999, start),
                start + Duration::from_secs(7000),
                f64::NAN,
            ),
            step_status(
                1,
                999_999,
                &Pace::new(0, 999_999, start),
                start + Duration::from_secs(900),
                1.0e9,
            ),
            eval_status(
                "dev",
                99_999,
                100_000,
                &Pace::new(0, 100_000, start),
                start + Duration::from_secs(3),
            ),
            eval_status(
                "test",
                1,
                100_000,
                &Pace::new(0, 100_000, start),
                start + Duration::from_secs(600),
            ),
        ];
        for status in worst {
            assert!(
                status.chars().count() <= STATUS_WIDTH,
                "{status:?} is {} columns, {STATUS_WIDTH} fit",
                status.chars().count()
            );
        }
        assert_eq!(
            TEMPLATE,
            format!("{{elapsed_precise}} {{bar:{BAR_WIDTH}}} {{msg}}")
        );
    }

    /// A terminal in memory that log lines are also written to.
    struct Screen(indicatif::InMemoryTerm);

    impl Write for Screen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            use indicatif::TermLike;
            // A terminal's line discipline returns the carriage with each newline.
            let text = String::from_utf8_lossy(buf).replace('\n', "\r\n");
            self.0.write_str(&text)?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_and_evaluation_progress_share_the_terminal_with_the_bar() {
        let term = indicatif::InMemoryTerm::new(10, 80);
        let bar = Progress::bar_on(ProgressDrawTarget::term_like(Box::new(term.clone())), 0, 40);
        let mut progress = Progress::with_bar(Some(bar), 0, 40);
        for n in 1..=20 {
            progress.step(n, 0.75, 1e-3);
        }
        let line = "INFO mezod::run: step 20: dev accuracy 0.7500 (loss 0.6100)\n";
        {
            let mut eval = progress.evaluation("dev", 20, 64);
            eval.update(32);
            std::thread::sleep(Duration::from_millis(60));
            eval.update(48);
            let shown = term.contents();
            assert!(shown.contains("dev 48/64"), "{shown}");
            SuspendingWriter {
                inner: Screen(term.clone()),
            }
            .write_all(line.as_bytes())
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(60));
        progress.step(21, 0.5, 1e-3);
        let shown = term.contents();
        let rows: Vec<&str> = shown.lines().filter(|r| !r.trim().is_empty()).collect();
        // The log line stands alone on its row, and no stale copy of the bar
        // is left above it: the bar is lifted while the line is written.
        assert_eq!(rows.len(), 2, "{shown}");
        assert_eq!(rows[0], line.trim_end(), "{shown}");
        let last = rows[1];
        assert!(
            last.contains("21/40") && last.contains("loss 0.5000"),
            "{shown}"
        );
        assert!(rows.iter().all(|r| r.chars().count() <= 80));
        progress.finish();
    }
}
