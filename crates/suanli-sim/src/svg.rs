//! Small, dependency-free SVG line charts for the report: linear or logarithmic axes, a legend,
//! one colour per series (solid or dashed). Numbers are written with fixed precision, so the
//! same data always gives the same file.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// Legend text.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// Index into the palette.
    pub colour: usize,
}

/// A chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Logarithmic x axis (values below `x_floor` are drawn at it).
    pub x_log: bool,
    /// Logarithmic y axis.
    pub y_log: bool,
    /// Smallest value shown on a logarithmic axis.
    pub log_floor: f64,
    /// Fixed y range, or `None` to fit the data.
    pub y_range: Option<(f64, f64)>,
    /// The lines.
    pub lines: Vec<Line>,
    /// A vertical mark at this x, with its label (for example, where a measurement starts).
    pub marker: Option<(f64, String)>,
}

const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    floor: f64,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool, floor: f64) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            let v = if log { v.max(floor) } else { v };
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil().max(lo.log10() + 1.0));
        } else {
            lo = lo.min(0.0);
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 5.0);
            hi = (hi / step).ceil() * step;
        }
        Axis { log, lo, hi, floor }
    }

    /// Position in 0..=1 along the axis.
    fn at(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.floor).max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            (a..=b).map(|e| 10f64.powi(e)).collect()
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut t = (self.lo / step).ceil() * step;
            let mut out = Vec::new();
            while t <= self.hi + step * 1e-9 {
                out.push(t);
                t += step;
            }
            out
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * p
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders a chart as an SVG document.
pub fn render(chart: &Chart) -> String {
    let xs = chart
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0));
    let x = Axis::fit(xs, chart.x_log, chart.log_floor);
    let y = match chart.y_range {
        Some((lo, hi)) => Axis {
            log: chart.y_log,
            lo,
            hi,
            floor: chart.log_floor,
        },
        None => {
            let ys = chart
                .lines
                .iter()
                .flat_map(|l| l.points.iter().map(|p| p.1));
            Axis::fit(ys, chart.y_log, chart.log_floor)
        }
    };
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let px = |v: f64| LEFT + x.at(v).clamp(0.0, 1.0) * pw;
    let py = |v: f64| TOP + (1.0 - y.at(v).clamp(0.0, 1.0)) * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(&chart.title)
    );
    for t in x.ticks() {
        let p = px(t);
        let _ = writeln!(
            o,
            r##"<line x1="{p:.1}" y1="{TOP}" x2="{p:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{p:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            label(t)
        );
    }
    for t in y.ticks() {
        let p = py(t);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{p:.1}" x2="{:.1}" y2="{p:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            p + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 12.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        escape(&chart.y_label)
    );
    if let Some((at, text)) = &chart.marker {
        let p = px(*at);
        let _ = writeln!(
            o,
            r##"<line x1="{p:.1}" y1="{TOP}" x2="{p:.1}" y2="{:.1}" stroke="#444" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"##,
            TOP + ph,
            p + 4.0,
            TOP + ph - 8.0,
            escape(text)
        );
    }
    for (i, line) in chart.lines.iter().enumerate() {
        let colour = PALETTE[line.colour % PALETTE.len()];
        let dash = if line.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let points: Vec<String> = line
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b)))
            .collect();
        if points.len() == 1 {
            let _ = writeln!(
                o,
                r#"<circle cx="{}" cy="{}" r="3" fill="{colour}"/>"#,
                points[0].split(',').next().unwrap_or("0"),
                points[0].split(',').nth(1).unwrap_or("0")
            );
        } else if !points.is_empty() {
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                points.join(" ")
            );
        }
        let ly = TOP + 14.0 + i as f64 * 16.0;
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 10.0,
            LEFT + 34.0,
            LEFT + 40.0,
            ly + 4.0,
            escape(&line.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_deterministic_svg_with_its_lines_and_labels() {
        let chart = Chart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: false,
            y_log: true,
            log_floor: 0.01,
            y_range: None,
            lines: vec![Line {
                name: "a & b".into(),
                points: vec![(0.0, 0.5), (10.0, 200.0)],
                dashed: true,
                colour: 1,
            }],
            marker: Some((4.0, "from here".into())),
        };
        let svg = render(&chart);
        assert_eq!(svg, render(&chart));
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains("a &amp; b"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("stroke-dasharray"));
        // The marker is a vertical line at x = 4 of 0..10 (the plot spans 70..740), labelled.
        assert!(
            svg.contains(r#"<line x1="338.0" y1="40" x2="338.0""#),
            "{svg}"
        );
        assert!(svg.contains(">from here</text>"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(3.3), 5.0);
        assert_eq!(nice_step(1200.0), 2000.0);
        assert_eq!(label(25_000.0), "25k");
        assert_eq!(label(0.25), "0.25");
    }
}
