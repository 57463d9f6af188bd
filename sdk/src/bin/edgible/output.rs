//! How results are shown: aligned tables and `field: value` details for people, the API's JSON
//! for programs.

use std::fmt::Write as _;

use serde::Serialize;

/// The `--output` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The objects as the API returns them.
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode the answer as JSON: {0}")]
pub struct OutputError(#[from] serde_json::Error);

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), OutputError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "a row needs one cell per column");
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|header| header.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let headers = self.headers.iter().map(|header| header.to_string()).collect::<Vec<_>>();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let _ = write!(line, "{cell:<width$}");
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `label: value` lines with the values aligned, for one object.
#[derive(Debug, Default)]
pub struct Details {
    lines: Vec<(&'static str, String)>,
}

impl Details {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn field(&mut self, label: &'static str, value: impl ToString) -> &mut Self {
        self.lines.push((label, value.to_string()));
        self
    }

    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(label, _)| label.len() + 1).max().unwrap_or(0);
        let mut text = String::new();
        for (label, value) in &self.lines {
            let _ = writeln!(text, "{:<width$}  {value}", format!("{label}:"));
        }
        text
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// A list for a table cell: `a, b`, or `-` when empty.
pub fn list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let joined = items.into_iter().map(|item| item.to_string()).collect::<Vec<_>>().join(", ");
    if joined.is_empty() { "-".to_owned() } else { joined }
}

/// An optional value for a table cell, `-` when absent.
pub fn optional<T: ToString>(value: Option<T>) -> String {
    value.map(|value| value.to_string()).unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_line_ends() {
        let mut table = Table::new(&["NAME", "ID", "NOTE"]);
        table.row(vec!["web".into(), "1234".into(), "-".into()]);
        table.row(vec!["a-longer-name".into(), "1".into(), "x".into()]);
        assert_eq!(table.render(), "NAME           ID    NOTE\nweb            1234  -\na-longer-name  1     x\n");
    }

    #[test]
    fn details_align_values() {
        let mut details = Details::new();
        details.field("name", "web").field("hostnames", "a.example.test");
        assert_eq!(details.render(), "name:       web\nhostnames:  a.example.test\n");
    }
}
