//! Text tables (comfy-table): aligned columns without borders, easy to read
//! and to cut with `awk`; the last column may be long and is not padded.

use std::fmt;

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ContentArrangement};

#[derive(Debug)]
pub struct Table {
    inner: comfy_table::Table,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        let mut inner = comfy_table::Table::new();
        inner
            .load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header);
        for column in inner.column_iter_mut() {
            column.set_padding((0, 2));
            column.set_cell_alignment(CellAlignment::Left);
        }
        Self { inner }
    }

    pub fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.inner.add_row(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.inner.lines() {
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_borders() {
        let mut table = Table::new(["SEQ", "TYPE"]);
        table.row(["1".into(), "AccountOpened".into()]);
        table.row(["10".into(), "Deposited".into()]);
        assert_eq!(
            table.to_string(),
            "SEQ  TYPE\n1    AccountOpened\n10   Deposited\n"
        );
    }
}
