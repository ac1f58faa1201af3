//! "Did you mean": the names close to one a user mistyped (a function or option
//! key in a playbook, a group or host in a selector). One rule for every layer,
//! so `check` and a selector that matched nothing agree on what is close.
//!
//! It owns the closeness rule only; each caller chooses its candidates and words
//! its own message. Distances count a swap of two neighbouring letters (`wbe` for
//! `web`) as one edit, as a typo is.

/// Edits between `a` and `b`: insertions, deletions, substitutions and swaps of
/// two neighbouring characters (optimal string alignment).
pub fn edit_distance(a: &str, b: &str) -> usize {
    strsim::osa_distance(a, b)
}

/// Up to `n` candidates close enough to `name` to be what was meant, closest
/// first: a few edits away (about one in three characters, case ignored), or
/// `name` cut short. `name` itself is never suggested.
pub fn nearest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
    n: usize,
) -> Vec<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let lower = name.to_lowercase();
    let mut close: Vec<(usize, &str)> = candidates
        .filter(|c| *c != name)
        .filter_map(|c| {
            let d = edit_distance(&lower, &c.to_lowercase());
            let prefix = name.len() >= 3 && c.starts_with(name);
            (d <= limit || prefix).then_some((d, c))
        })
        .collect();
    close.sort_unstable();
    close.dedup();
    close.into_iter().take(n).map(|(_, c)| c).collect()
}

/// The one candidate closest to `name`, when one is close enough (see [`nearest`]).
pub fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    nearest(name, candidates, 1).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_count_once_and_prefixes_are_suggested() {
        assert_eq!(edit_distance("wbe", "web"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let groups = ["web", "db", "pilot", "webfront"];
        assert_eq!(did_you_mean("wbe", groups.iter().copied()), Some("web"));
        assert_eq!(did_you_mean("PILTO", groups.iter().copied()), Some("pilot"));
        assert_eq!(
            nearest("webf", groups.iter().copied(), 3),
            vec!["web", "webfront"]
        );
        assert_eq!(did_you_mean("zzz", groups.iter().copied()), None);
    }
}
