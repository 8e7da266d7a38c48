//! Tables, colour and structured output for `kubectl nixops`.

use std::io::IsTerminal;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use super::{Format, PluginError, Result};

/// Colour for a cell: what the state means to the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Good,
    Busy,
    Bad,
}

/// Whether standard output gets ANSI colours: only on a terminal, and not
/// when NO_COLOR is set (https://no-color.org) or TERM is dumb.
pub fn colour_enabled() -> bool {
    std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").as_deref() != Ok("dumb")
}

/// A table cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub text: String,
    pub tone: Tone,
}

impl Cell {
    pub fn plain(text: impl Into<String>) -> Self {
        Self { text: text.into(), tone: Tone::Plain }
    }
    pub fn toned(text: impl Into<String>, tone: Tone) -> Self {
        Self { text: text.into(), tone }
    }
}

/// Renders rows under `headers`, columns padded as kubectl does (three
/// spaces), colouring toned cells when `colour`.
pub fn table(headers: &[&str], rows: &[Vec<Cell>], colour: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.text.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<(String, Tone)>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, (text, tone)) in cells.into_iter().enumerate() {
            let pad = if i == last { 0 } else { widths[i] - text.chars().count() + 3 };
            let code = match (colour, tone) {
                (false, _) | (_, Tone::Plain) => None,
                (true, Tone::Good) => Some("32"),
                (true, Tone::Busy) => Some("33"),
                (true, Tone::Bad) => Some("31"),
            };
            match code {
                Some(code) => out.push_str(&format!("\x1b[{code}m{text}\x1b[0m")),
                None => out.push_str(&text),
            }
            out.push_str(&" ".repeat(pad));
        }
        out.push('\n');
    };
    line(headers.iter().map(|h| (h.to_string(), Tone::Plain)).collect(), &mut out);
    for row in rows {
        line(row.iter().map(|c| (c.text.clone(), c.tone)).collect(), &mut out);
    }
    out
}

/// Prints `value` as JSON or YAML; false when the format is a table.
pub fn structured<T: Serialize>(format: Option<Format>, value: &T) -> Result<bool> {
    let text = match format {
        Some(Format::Json) => serde_json::to_string_pretty(value).map_err(|e| PluginError::Failed(e.to_string()))?,
        Some(Format::Yaml) => serde_yaml_ng::to_string(value).map_err(|e| PluginError::Failed(e.to_string()))?,
        _ => return Ok(false),
    };
    println!("{}", text.trim_end());
    Ok(true)
}

/// How long ago `time` was, as kubectl prints ages: 42s, 5m, 3h, 2d.
pub fn age(time: Option<&Time>, now: Timestamp) -> String {
    let Some(time) = time else { return "-".into() };
    let seconds = now.duration_since(time.0).as_secs().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Bytes in binary units: 12.3 GiB.
pub fn bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", units[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_colour_only_when_asked() {
        let rows = vec![vec![Cell::plain("web-1"), Cell::toned("True", Tone::Good)]];
        let plain = table(&["NAME", "READY"], &rows, false);
        assert_eq!(plain, "NAME    READY\nweb-1   True\n");
        let coloured = table(&["NAME", "READY"], &rows, true);
        assert!(coloured.contains("\x1b[32mTrue\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn ages_and_sizes_read_like_kubectls() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let at = |s: i64| Time(Timestamp::from_second(s).unwrap());
        assert_eq!(age(Some(&at(1_000_000 - 30)), now), "30s");
        assert_eq!(age(Some(&at(1_000_000 - 600)), now), "10m");
        assert_eq!(age(Some(&at(1_000_000 - 3 * 86_400)), now), "3d");
        assert_eq!(age(None, now), "-");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
    }
}
