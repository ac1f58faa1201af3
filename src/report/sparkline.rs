//! Small per-host sparklines of `monitor()` samples: Unicode blocks for Markdown,
//! an inline SVG for HTML. Points are `(phase, value)`; the change sits between
//! the last `baseline` point and the first `after` one. It draws only; it must
//! not judge a sample.

const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn range(points: &[(String, f64)]) -> (f64, f64) {
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// `▁▂▂|▇█▇`: the baseline, a bar at the change, then the window after it.
pub fn blocks(points: &[(String, f64)]) -> String {
    let (lo, hi) = range(points);
    let mut out = String::new();
    let mut seen_after = false;
    for (phase, v) in points {
        if phase != "baseline" && !seen_after {
            seen_after = true;
            out.push('|');
        }
        let i = if hi > lo {
            // v lies in [lo, hi], so the rounded level is in 0..=7.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let level = (((v - lo) / (hi - lo)) * 7.0).round() as usize;
            level
        } else {
            0
        };
        out.push(BLOCKS[i.min(7)]);
    }
    out
}

/// An inline SVG polyline 120×24 with a dashed line at the change.
pub fn svg(points: &[(String, f64)]) -> String {
    let (w, h) = (120.0, 24.0);
    let (lo, hi) = range(points);
    let n = points.len().max(2) - 1;
    let x = |i: usize| i as f64 * w / n as f64;
    let y = |v: f64| {
        if hi > lo {
            h - 2.0 - (v - lo) / (hi - lo) * (h - 4.0)
        } else {
            h / 2.0
        }
    };
    let line: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, (_, v))| format!("{:.1},{:.1}", x(i), y(*v)))
        .collect();
    let change = points
        .iter()
        .position(|(p, _)| p != "baseline")
        .filter(|i| *i > 0)
        .map(|i| {
            let cx = (x(i - 1) + x(i)) / 2.0;
            format!("<line x1=\"{cx:.1}\" y1=\"0\" x2=\"{cx:.1}\" y2=\"{h}\" stroke=\"#999\" stroke-dasharray=\"2,2\"/>")
        })
        .unwrap_or_default();
    format!(
        "<svg class=\"sparkline\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">{change}<polyline fill=\"none\" stroke=\"#0a6\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        line.join(" ")
    )
}

/// Plain numbers as `after` points, for a series with no change in it.
pub fn series(values: &[u64]) -> Vec<(String, f64)> {
    values
        .iter()
        .map(|v| ("after".to_string(), *v as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_change_and_scales() {
        let p = |phase: &str, v: f64| (phase.to_string(), v);
        let pts = [
            p("baseline", 0.0),
            p("baseline", 0.0),
            p("after", 7.0),
            p("after", 3.5),
        ];
        assert_eq!(blocks(&pts), "▁▁|█▅");
        let s = svg(&pts);
        assert!(
            s.contains("stroke-dasharray") && s.contains("0.0,22.0"),
            "{s}"
        );
        assert_eq!(blocks(&[p("after", 1.0)]), "|▁");
    }
}
