//! The progress bar: bytes of input done (which gives the ETA), rows done
//! and rows per second. Shown only when stderr is a terminal, so logs and
//! pipes never fill with redraws.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether to draw a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// On stderr when stderr is a terminal; nothing otherwise.
    #[default]
    Auto,
    Hidden,
}

pub(crate) struct Progress {
    bar: ProgressBar,
    started: Instant,
    last_message: Option<Instant>,
}

impl Progress {
    /// `len`: input size in bytes, when known (a pipe has none: a spinner then).
    pub fn new(mode: ProgressMode, len: Option<u64>) -> Progress {
        let show = mode == ProgressMode::Auto && std::io::stderr().is_terminal();
        let bar = if !show {
            ProgressBar::hidden()
        } else {
            let target = ProgressDrawTarget::stderr_with_hz(10);
            let bar = ProgressBar::with_draw_target(len, target);
            let template = if len.is_some() {
                "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg} · ETA {eta}"
            } else {
                "{spinner} [{elapsed_precise}] {bytes} read · {msg}"
            };
            // The templates are constants; a bad one is a bug caught by the
            // first run, and a bar without a style still counts.
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
            }
            bar
        };
        Progress { bar, started: Instant::now(), last_message: None }
    }

    /// Input consumed up to `bytes`, `rows` rows done in all.
    pub fn update(&mut self, bytes: u64, rows: u64) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(bytes);
        // Formatting a message allocates; 10 times a second is plenty.
        let now = Instant::now();
        if self.last_message.is_some_and(|t| now - t < Duration::from_millis(100)) {
            return;
        }
        self.last_message = Some(now);
        let secs = (now - self.started).as_secs_f64().max(1e-9);
        self.bar.set_message(format!("{} rows · {} rows/s", group(rows), group((rows as f64 / secs) as u64)));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `1234567` → `1,234,567`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands() {
        assert_eq!(super::group(0), "0");
        assert_eq!(super::group(999), "999");
        assert_eq!(super::group(1_234_567), "1,234,567");
    }
}
