//! The shared table printer and the small formatting rules every subcommand
//! uses: kubectl-style column layout (upper-case headers, three spaces between
//! columns, no borders), ages as kubectl prints them, byte sizes, and colour
//! that is only ever emitted on a terminal.

use std::fmt::Write as _;
use std::time::Duration;

/// How text is coloured. Colour is a property of the output stream, decided
/// once in `main`: on only for a terminal without `NO_COLOR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paint {
    Plain,
    Ansi,
}

/// The meaning of a highlighted cell, mapped to a colour when painting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Normal,
    Good,
    Warn,
    Bad,
    Dim,
    Bold,
}

impl Paint {
    /// Colour when `is_terminal` and `NO_COLOR` is unset or empty
    /// (<https://no-color.org>).
    pub fn detect(is_terminal: bool, no_color: Option<&str>) -> Self {
        if is_terminal && no_color.is_none_or(str::is_empty) {
            Paint::Ansi
        } else {
            Paint::Plain
        }
    }

    pub fn paint(self, tone: Tone, text: &str) -> String {
        let code = match (self, tone) {
            (Paint::Plain, _) | (_, Tone::Normal) => return text.to_string(),
            (Paint::Ansi, Tone::Good) => "32",
            (Paint::Ansi, Tone::Warn) => "33",
            (Paint::Ansi, Tone::Bad) => "31",
            (Paint::Ansi, Tone::Dim) => "2",
            (Paint::Ansi, Tone::Bold) => "1",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// One cell: its text and how it is highlighted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub text: String,
    pub tone: Tone,
}

impl Cell {
    pub fn new(text: impl Into<String>, tone: Tone) -> Self {
        Self {
            text: text.into(),
            tone,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell::new(text, Tone::Normal)
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell::new(text, Tone::Normal)
    }
}

/// Rows under upper-case headers, laid out as `kubectl get` does.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(headers: &[S]) -> Self {
        Self {
            headers: headers
                .iter()
                .map(|h| h.as_ref().to_ascii_uppercase())
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    /// Column widths over the headers and every row.
    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                let w = cell.text.chars().count();
                match widths.get_mut(i) {
                    Some(cur) => *cur = (*cur).max(w),
                    None => widths.push(w),
                }
            }
        }
        widths
    }

    /// The whole table, header first, each line ending in `\n`.
    pub fn render(&self, paint: Paint) -> String {
        let widths = self.widths();
        let mut out = String::new();
        let header: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell::new(h.clone(), Tone::Bold))
            .collect();
        write_line(&mut out, &header, &widths, paint);
        for row in &self.rows {
            write_line(&mut out, row, &widths, paint);
        }
        out
    }

    /// Only the rows (for `--watch`, which prints the header once), laid out
    /// with the widths of this table.
    pub fn render_rows(&self, paint: Paint) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for row in &self.rows {
            write_line(&mut out, row, &widths, paint);
        }
        out
    }
}

fn write_line(out: &mut String, cells: &[Cell], widths: &[usize], paint: Paint) {
    let mut line = String::new();
    let last = cells.len().saturating_sub(1);
    for (i, cell) in cells.iter().enumerate() {
        let painted = paint.paint(cell.tone, &cell.text);
        if i == last {
            line.push_str(&painted);
        } else {
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.text.chars().count());
            let _ = write!(line, "{painted}{}   ", " ".repeat(pad));
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// An age as `kubectl get` prints it (`45s`, `3m20s`, `17m`, `5h12m`, `3d4h`, `120d`).
pub fn human_age(d: Duration) -> String {
    let secs = d.as_secs();
    let (m, h, day) = (60, 3600, 86400);
    if secs < 2 * m {
        format!("{secs}s")
    } else if secs < 10 * m {
        let s = secs % m;
        if s == 0 {
            format!("{}m", secs / m)
        } else {
            format!("{}m{s}s", secs / m)
        }
    } else if secs < 3 * h {
        format!("{}m", secs / m)
    } else if secs < 8 * h {
        let mins = (secs % h) / m;
        if mins == 0 {
            format!("{}h", secs / h)
        } else {
            format!("{}h{mins}m", secs / h)
        }
    } else if secs < 2 * day {
        format!("{}h", secs / h)
    } else if secs < 8 * day {
        let hours = (secs % day) / h;
        if hours == 0 {
            format!("{}d", secs / day)
        } else {
            format!("{}d{hours}h", secs / day)
        }
    } else if secs < 365 * 2 * day {
        format!("{}d", secs / day)
    } else {
        format!("{}y", secs / (365 * day))
    }
}

/// The age of something created at `then`, seen at `now`; `<unknown>` without a time.
pub fn age_since(then: Option<jiff::Timestamp>, now: jiff::Timestamp) -> String {
    match then {
        Some(t) => {
            let secs = now.as_second().saturating_sub(t.as_second()).max(0);
            human_age(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
        }
        None => "<unknown>".into(),
    }
}

/// Bytes in binary units with one decimal (`512B`, `1.5KiB`, `3.2GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    // Display only: the precision lost converting to f64 is far below the
    // one decimal shown.
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell_and_trailing_space_is_trimmed() {
        let mut t = Table::new(&["name", "device", "phase"]);
        t.push(vec!["llama".into(), "rbln".into(), "Running".into()]);
        t.push(vec!["a".into(), "furiosa".into(), "".into()]);
        assert_eq!(
            t.render(Paint::Plain),
            "NAME    DEVICE    PHASE\nllama   rbln      Running\na       furiosa\n"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert_eq!(Paint::detect(true, None), Paint::Ansi);
        assert_eq!(Paint::detect(true, Some("")), Paint::Ansi);
        assert_eq!(Paint::detect(true, Some("1")), Paint::Plain);
        assert_eq!(Paint::detect(false, None), Paint::Plain);
        let mut t = Table::new(&["a", "b"]);
        t.push(vec![Cell::new("x", Tone::Good), "y".into()]);
        let painted = t.render(Paint::Ansi);
        assert!(painted.contains("\x1b[32mx\x1b[0m   y"), "{painted:?}");
        assert!(!t.render(Paint::Plain).contains('\x1b'));
    }

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (300, "5m"),
            (1000, "16m"),
            (5 * 3600 + 12 * 60, "5h12m"),
            (20 * 3600, "20h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (120 * 86400, "120d"),
            (3 * 365 * 86400, "3y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_age(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(270 * 1024 * 1024), "270.0MiB");
        assert_eq!(human_bytes(3_435_973_837), "3.2GiB");
    }
}
