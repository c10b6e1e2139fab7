//! Where the CLI writes: stdout gets the result (one JSON document with
//! `--json`), stderr the errors and warnings; progress bars only on a
//! terminal and never with `--json`.

use std::fmt::Display;
use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;

use crate::table::Table;

pub struct Out<'w> {
    /// `--json`: one JSON document on stdout, whatever happens.
    pub json: bool,
    /// stdout is a terminal: progress bars are drawn (on stderr).
    pub terminal: bool,
    out: &'w mut dyn Write,
    err: &'w mut dyn Write,
}

impl std::fmt::Debug for Out<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out").field("json", &self.json).finish()
    }
}

impl<'w> Out<'w> {
    pub fn new(json: bool, terminal: bool, out: &'w mut dyn Write, err: &'w mut dyn Write) -> Self {
        Self {
            json,
            terminal,
            out,
            err,
        }
    }

    /// A JSON document, pretty-printed.
    pub fn doc(&mut self, value: &impl Serialize) -> anyhow::Result<()> {
        serde_json::to_writer_pretty(&mut *self.out, value)?;
        writeln!(self.out)?;
        Ok(())
    }

    /// Bytes exactly as received (a wire reply), on one line.
    pub fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(bytes)?;
        writeln!(self.out)?;
        Ok(())
    }

    /// stdout itself, for writers of their own (completion scripts).
    pub fn stdout(&mut self) -> &mut dyn Write {
        &mut *self.out
    }

    pub fn line(&mut self, text: impl Display) -> anyhow::Result<()> {
        writeln!(self.out, "{text}")?;
        Ok(())
    }

    pub fn table(&mut self, table: &Table) -> anyhow::Result<()> {
        write!(self.out, "{table}")?;
        Ok(())
    }

    /// A line on stderr (errors, warnings). Nothing to do if it fails.
    pub fn warn(&mut self, text: impl Display) {
        let _ = writeln!(self.err, "{text}");
    }

    /// A progress bar of `len` steps on stderr, with rate and ETA; hidden
    /// unless stdout is a terminal and the output is not JSON.
    pub fn progress(&self, len: u64, unit: &str) -> ProgressBar {
        let target = if self.terminal && !self.json {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let template =
            format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{rate}}  ETA {{eta}}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("#>.");
        let bar = ProgressBar::with_draw_target(Some(len), target).with_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// Draws `bar` at its end and leaves it, the cursor on the next line.
    pub fn finish(&mut self, bar: &ProgressBar) {
        bar.finish();
        if !bar.is_hidden() {
            self.warn("");
        }
    }

    /// Leaves `bar` where it stopped (a failure follows), the cursor on the
    /// next line.
    pub fn abandon(&mut self, bar: &ProgressBar) {
        bar.abandon();
        if !bar.is_hidden() {
            self.warn("");
        }
    }
}
