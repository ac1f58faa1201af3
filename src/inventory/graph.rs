//! `patchbook inventory graph` and the readable `inventory list`: the group tree in
//! the shape `ansible-inventory --graph` prints, the `depends_on` edges with groups
//! expanded, and a host table. Text only; it must not load or change anything.
use std::fmt::Write;

use super::Inventory;

pub fn render(inv: &Inventory) -> String {
    let mut lines = Vec::new();
    tree(inv, "all", 0, &mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    let edges: Vec<(String, String)> = inv
        .hosts()
        .iter()
        .flat_map(|h| {
            inv.dependencies_of(h)
                .into_iter()
                .map(move |d| (h.name.clone(), d))
        })
        .collect();
    out.push_str("dependencies:\n");
    if edges.is_empty() {
        out.push_str("  (none)\n");
    }
    for (from, to) in edges {
        let _ = writeln!(out, "  {from} -> {to}");
    }
    out
}

fn tree(inv: &Inventory, group: &str, depth: usize, lines: &mut Vec<String>) {
    let name = |text: String, depth: usize| {
        if depth == 0 {
            text
        } else {
            format!("{}--{text}", "  |".repeat(depth))
        }
    };
    lines.push(name(format!("@{group}:"), depth));
    let Some(g) = inv.groups().get(group) else {
        return;
    };
    for child in &g.children {
        tree(inv, child, depth + 1, lines);
    }
    if group != "all" {
        for h in &g.hosts {
            lines.push(name(h.clone(), depth + 1));
        }
    }
}

/// The host table for `patchbook inventory list`.
pub fn table(inv: &Inventory) -> String {
    let rows: Vec<[String; 5]> = inv
        .hosts()
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                format!("{}:{}", h.address, h.port),
                h.criticality.as_str().to_string(),
                h.groups.join(","),
                h.owners.join(","),
            ]
        })
        .collect();
    let header = ["HOST", "ADDRESS", "CRITICALITY", "GROUPS", "OWNER"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Written in place, a cell and its padding at a time: a line's worth of
    // formatted strings per host showed in the profile of a 100,000-host listing.
    let mut out = String::with_capacity(widths.iter().sum::<usize>() * (rows.len() + 1));
    for r in std::iter::once(&header).chain(&rows) {
        let start = out.len();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(c);
            out.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(c.chars().count()),
            ));
        }
        let kept = out[start..].trim_end().len();
        out.truncate(start + kept);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::native;
    use std::path::Path;

    #[test]
    fn graph_has_tree_and_edges() {
        let inv = native::parse(
            Path::new("t.toml"),
            r#"
[hosts.web01]
groups = ["web"]
depends_on = ["db"]
[hosts.db01]
groups = ["db"]
[groups.prod]
children = ["web", "db"]
"#,
        )
        .unwrap();
        let text = super::render(&inv);
        assert!(
            text.starts_with(
                "@all:\n  |--@ungrouped:\n  |--@prod:\n  |  |--@web:\n  |  |  |--web01\n"
            ),
            "{text}"
        );
        assert!(text.contains("dependencies:\n  web01 -> db01\n"), "{text}");
        let table = super::table(&inv);
        assert!(table.lines().next().unwrap().starts_with("HOST"));
        assert!(table.contains("web01"));
    }
}
