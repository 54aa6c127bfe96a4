//! SVG charts for `graft advise --plot` and the HTML report: line charts (with error bars and
//! tooltips), grouped bar charts and a confusion-matrix heat map. The markup is self-contained
//! (no scripts, fonts or links to fetch), so a page that inlines it works offline.

use std::fmt::Write;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 50.0;

/// One line of a [`LineChart`].
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// CSS colour.
    pub color: &'static str,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Half-height of an error bar per point, when known.
    pub errors: Option<Vec<f64>>,
    /// A point drawn larger and in red.
    pub highlight: Option<usize>,
    /// Hover text per point (empty: none).
    pub tooltips: Vec<String>,
}

/// A line chart with axes, grid, ticks and legend.
#[derive(Debug, Clone, Default)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis.
    pub y_label: String,
    /// `(min, max)` of the x axis.
    pub x_range: (f64, f64),
    /// `(min, max)` of the y axis.
    pub y_range: (f64, f64),
    /// Tick positions and their labels on the x axis.
    pub x_ticks: Vec<(f64, String)>,
    /// The lines.
    pub series: Vec<Series>,
}

impl LineChart {
    /// The chart as an `<svg>` element.
    pub fn to_svg(&self) -> String {
        let (x0, x1) = widen(self.x_range);
        let (y0, y1) = widen(self.y_range);
        let x = |v: f64| LEFT + (v - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT);
        let y = |v: f64| TOP + (1.0 - (v - y0) / (y1 - y0)) * (HEIGHT - TOP - BOTTOM);
        let mut svg = frame(&self.title, &self.x_label, &self.y_label);
        svg.push_str(&grid(y0, y1, y));
        for (value, label) in &self.x_ticks {
            let tx = x(*value);
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{b}" y2="{}" stroke="#000"/><text x="{tx:.1}" y="{}" text-anchor="middle">{}</text>"##,
                HEIGHT - BOTTOM + 5.0,
                HEIGHT - BOTTOM + 18.0,
                escape(label),
                b = HEIGHT - BOTTOM,
            );
        }
        svg.push_str(&axes());
        for (k, series) in self.series.iter().enumerate() {
            let points: Vec<String> = series
                .points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                points.join(" "),
                series.color
            );
            for (i, &(px, py)) in series.points.iter().enumerate() {
                let (cx, cy) = (x(px), y(py));
                if let Some(e) = series.errors.as_ref().and_then(|e| e.get(i)) {
                    let _ = writeln!(
                        svg,
                        r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="{}"/>"#,
                        y((py + e).min(y1)),
                        y((py - e).max(y0)),
                        series.color
                    );
                }
                let highlighted = series.highlight == Some(i);
                let tooltip = series
                    .tooltips
                    .get(i)
                    .map(|t| format!("<title>{}</title>", escape(t)))
                    .unwrap_or_default();
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="{}" fill="{}">{tooltip}</circle>"##,
                    if highlighted { 6 } else { 3 },
                    if highlighted { "#d62728" } else { series.color }
                );
            }
            svg.push_str(&legend_entry(k, series.color, &series.name));
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A grouped bar chart: one group of bars per category, one bar per `(name, colour, values)`
/// set, values on a fixed `y_range`.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[String],
    sets: &[(&str, &'static str, Vec<f64>)],
    y_range: (f64, f64),
) -> String {
    let (y0, y1) = widen(y_range);
    let y = |v: f64| TOP + (1.0 - (v - y0) / (y1 - y0)) * (HEIGHT - TOP - BOTTOM);
    let mut svg = frame(title, "", y_label);
    svg.push_str(&grid(y0, y1, y));
    let slot = (WIDTH - LEFT - RIGHT) / categories.len().max(1) as f64;
    let bar = slot * 0.8 / sets.len().max(1) as f64;
    for (c, category) in categories.iter().enumerate() {
        let start = LEFT + slot * c as f64 + slot * 0.1;
        for (k, (name, color, values)) in sets.iter().enumerate() {
            let value = values.get(c).copied().unwrap_or(0.0).clamp(y0, y1);
            let top = y(value);
            let left = start + bar * k as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: {value:.4}</title></rect>"#,
                bar.max(1.0) - 1.0,
                (HEIGHT - BOTTOM - top).max(0.0),
                escape(category),
                escape(name),
            );
            // The value above its bar, or inside its top when the bar reaches the legend's row.
            let (label_y, fill) = if top - 3.0 < TOP + 4.0 {
                (top + 12.0, "white")
            } else {
                (top - 3.0, "#222")
            };
            let _ = writeln!(
                svg,
                r#"<text class="value" x="{:.1}" y="{label_y:.1}" text-anchor="middle" font-size="10" fill="{fill}">{value:.2}</text>"#,
                left + bar / 2.0,
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            start + slot * 0.4,
            HEIGHT - BOTTOM + 18.0,
            escape(category)
        );
    }
    for (k, (name, color, _)) in sets.iter().enumerate() {
        svg.push_str(&legend_entry(k, color, name));
    }
    svg.push_str(&axes());
    svg.push_str("</svg>\n");
    svg
}

/// A confusion matrix as a heat map: rows are true classes, columns predictions, each cell
/// shaded by its share of the row and labelled with its count.
pub fn heat_map(title: &str, labels: &[String], counts: &[Vec<u64>]) -> String {
    let n = labels.len().max(1);
    let label_width = 90.0;
    let cell = ((WIDTH - label_width - RIGHT) / n as f64).min(90.0);
    let height = TOP + label_width + cell * n as f64 + 10.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="{WIDTH}" height="{height}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>
"#,
        WIDTH / 2.0,
        escape(title)
    );
    let (x0, y0) = (label_width, TOP + label_width);
    for (j, label) in labels.iter().enumerate() {
        let cx = x0 + cell * (j as f64 + 0.5);
        let _ = writeln!(
            svg,
            r#"<text transform="translate({cx:.1} {}) rotate(-45)" text-anchor="start">{}</text>"#,
            y0 - 6.0,
            escape(label)
        );
    }
    for (i, row) in counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let ry = y0 + cell * i as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            ry + cell / 2.0 + 4.0,
            escape(&labels[i])
        );
        for (j, &count) in row.iter().enumerate() {
            let share = if total > 0 {
                count as f64 / total as f64
            } else {
                0.0
            };
            let shade = (255.0 - share * 200.0).round() as u8;
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{ry:.1}" width="{cell:.1}" height="{cell:.1}" fill="rgb({shade},{shade},255)" stroke="#fff"><title>true {}, predicted {}: {count}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{}">{count}</text>"##,
                x0 + cell * j as f64,
                escape(&labels[i]),
                escape(&labels[j]),
                x0 + cell * (j as f64 + 0.5),
                ry + cell / 2.0 + 4.0,
                if share > 0.6 { "#fff" } else { "#000" }
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// A y range for accuracies from the tenth at or below `lowest` (at most 0.9) up to 1.
pub fn accuracy_range(lowest: f64) -> (f64, f64) {
    (((lowest * 10.0).floor() / 10.0).clamp(0.0, 0.9), 1.0)
}

/// Escapes text for XML and HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The opening of a chart: size, background, title and axis labels.
fn frame(title: &str, x_label: &str, y_label: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        WIDTH / 2.0,
        escape(title),
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 12.0,
        escape(x_label),
        (TOP + HEIGHT - BOTTOM) / 2.0,
        escape(y_label)
    )
}

/// Horizontal grid lines with their labels at round values of `[y0, y1]`, placed by `y`.
fn grid(y0: f64, y1: f64, y: impl Fn(f64) -> f64) -> String {
    let mut svg = String::new();
    for tick in ticks(y0, y1) {
        let ty = y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
            tick_label(tick)
        );
    }
    svg
}

/// Legend entry `k`, in a row between the title and the plot.
fn legend_entry(k: usize, color: &str, name: &str) -> String {
    let x = LEFT + 170.0 * k as f64;
    format!(
        "<rect x=\"{x:.1}\" y=\"{}\" width=\"12\" height=\"8\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>\n",
        TOP - 12.0,
        x + 16.0,
        TOP - 4.0,
        escape(name)
    )
}

fn axes() -> String {
    format!(
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"#000\"/><line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{b}\" stroke=\"#000\"/>\n",
        WIDTH - RIGHT,
        b = HEIGHT - BOTTOM
    )
}

/// A range with non-zero width.
fn widen((lo, hi): (f64, f64)) -> (f64, f64) {
    if hi - lo > 1e-12 {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Round tick values covering `[lo, hi]`, about five of them (steps of 1, 2 or 5 times a power
/// of ten).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(magnitude * 10.0);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_label(v: f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let labels = |lo, hi| {
            ticks(lo, hi)
                .into_iter()
                .map(tick_label)
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(0.6, 1.0), ["0.6", "0.7", "0.8", "0.9", "1"]);
        assert_eq!(labels(0.0, 2.3), ["0", "0.5", "1", "1.5", "2"]);
    }

    #[test]
    fn charts_are_complete_svg_with_one_mark_per_value() {
        let chart = LineChart {
            title: "t <1>".into(),
            x_range: (1.0, 3.0),
            y_range: (0.0, 1.0),
            series: vec![Series {
                name: "val".into(),
                color: "#1f77b4",
                points: vec![(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)],
                highlight: Some(2),
                ..Series::default()
            }],
            ..LineChart::default()
        }
        .to_svg();
        assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
        assert!(chart.contains("t &lt;1&gt;"));
        assert_eq!(chart.matches("<circle").count(), 3);
        assert_eq!(chart.matches("#d62728").count(), 1);
        let bars = bar_chart(
            "b",
            "",
            &["a".into(), "b".into()],
            &[("p", "#111", vec![0.5, 1.0]), ("r", "#222", vec![0.2, 0.4])],
            (0.0, 1.0),
        );
        assert_eq!(bars.matches("<title>").count(), 4);
        assert_eq!(bars.matches("class=\"value\"").count(), 4);
        assert!(bars.contains(">0.50</text>") && bars.contains(">0.40</text>"));
        let map = heat_map("m", &["x".into(), "y".into()], &[vec![3, 1], vec![0, 4]]);
        assert_eq!(map.matches("<rect x=").count(), 4);
        assert!(map.contains("true x, predicted y: 1"));
    }
}
