//! Small charts written as SVG and rasterized to PNG: line charts, grouped bars and
//! heatmaps. SVG is the source; PNG is rendered from it with `resvg`, using the
//! system's fonts for text (without any installed font the PNG has no labels, and
//! a note says so; the SVG is always complete).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The plot area's width and height (a legend widens the picture, a long one makes
/// it taller).
const W: f64 = 570.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 70.0;
/// Legend rows: height, and the room before the label.
const ROW: f64 = 18.0;
const SWATCH: f64 = 44.0;

/// Distinguishable colours for series: Tableau's ten, then ten more from Kelly's
/// colours of maximum contrast that differ from them.
const PALETTE: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22", "#000000", "#f3c300", "#a1caf1", "#604e97", "#882d17", "#8db600",
    "#f99379", "#0067a5", "#654522", "#dcd300",
];

/// Marker shapes, cycled on a period prime to the palette's, so that no two of the
/// first 140 series share colour and shape.
const MARKERS: usize = 7;

pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Series `i`'s marker at (x, y), in its colour.
fn marker(svg: &mut Svg, i: usize, x: f64, y: f64) {
    let c = color(i);
    let r = 4.0;
    let shape = match i % MARKERS {
        0 => format!(
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="{:.1}" fill="{c}"/>"#,
            r - 0.5
        ),
        1 => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}"/>"#,
            x - r + 0.5,
            y - r + 0.5,
            2.0 * r - 1.0,
            2.0 * r - 1.0
        ),
        2 => format!(
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{c}"/>"#,
            y - r - 0.5,
            x - r,
            y + r - 0.5,
            x + r,
            y + r - 0.5
        ),
        3 => format!(
            r#"<polygon points="{x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1}" fill="{c}"/>"#,
            y - r - 0.5,
            x + r + 0.5,
            y + r + 0.5,
            x - r - 0.5
        ),
        4 => format!(
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{c}"/>"#,
            y + r + 0.5,
            x - r,
            y - r + 0.5,
            x + r,
            y - r + 0.5
        ),
        5 => format!(
            r#"<path d="M{:.1},{:.1}L{:.1},{:.1}M{:.1},{:.1}L{:.1},{:.1}" stroke="{c}" stroke-width="2.2"/>"#,
            x - r,
            y - r,
            x + r,
            y + r,
            x - r,
            y + r,
            x + r,
            y - r
        ),
        _ => format!(
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="{:.1}" fill="white" stroke="{c}" stroke-width="2"/>"#,
            r - 1.0
        ),
    };
    svg.s.push_str(&shape);
}

/// Width of `text` at the charts' font size (an estimate that errs wide: DejaVu Sans
/// at 12 px averages under 7 px a character).
fn text_width(text: &str) -> f64 {
    7.4 * text.chars().count() as f64
}

/// The legend's width for these labels (swatch, label, margins).
fn legend_width<S: AsRef<str>>(labels: &[S]) -> f64 {
    let widest = labels
        .iter()
        .map(|l| text_width(l.as_ref()))
        .fold(0.0, f64::max);
    SWATCH + widest + 30.0
}

/// The picture's height: the plot's, or the legend's when it is taller.
fn height_for(rows: usize) -> f64 {
    H.max(TOP + 10.0 + ROW * rows as f64 + 10.0)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Svg {
    s: String,
}

impl Svg {
    fn new(w: f64, h: f64, title: &str) -> Svg {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Liberation Sans, Arial, sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            w / 2.0,
            esc(title)
        );
        Svg { s }
    }
    fn text(&mut self, x: f64, y: f64, anchor: &str, t: &str) {
        let _ = write!(
            self.s,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{}</text>"#,
            esc(t)
        );
    }
    fn text_rot(&mut self, x: f64, y: f64, t: &str) {
        let _ = write!(
            self.s,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="middle" transform="rotate(-90 {x:.1} {y:.1})">{}</text>"#,
            esc(t)
        );
    }
    fn text_slant(&mut self, x: f64, y: f64, t: &str) {
        let _ = write!(
            self.s,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="end" font-size="11" transform="rotate(-30 {x:.1} {y:.1})">{}</text>"#,
            esc(t)
        );
    }
    #[allow(clippy::too_many_arguments)]
    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64, dash: bool) {
        let d = if dash {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = write!(
            self.s,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{stroke}" stroke-width="{width}"{d}/>"#
        );
    }
    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = write!(
            self.s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"/>"#
        );
    }
    fn finish(mut self) -> String {
        self.s.push_str("</svg>\n");
        self.s
    }
}

/// Axis range with a little room, and "nice" tick values.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(mag * 10.0);
    let start = (lo / step).ceil() * step;
    let mut v = Vec::new();
    let mut t = start;
    while t <= hi + step * 1e-6 {
        v.push(((t / step).round() * step * 1e9).round() / 1e9);
        t += step;
    }
    v
}

fn fmt_tick(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // no "-0"
    if v.abs() >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if (v * 10.0).fract().abs() < 1e-9 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A series of points, drawn solid or dashed.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// A line chart with markers and a legend on the right.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((x1 - x0) * 0.05).max(1e-9);
    let (x0, x1) = (x0 - pad, x1 + pad);
    let (y0, y1) = match y_range {
        Some(r) => r,
        None => {
            let p = ((y1 - y0) * 0.08).max(1e-6);
            (y0 - p, y1 + p)
        }
    };
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    let right = legend_width(&names);
    let (w, h) = (W + right, height_for(series.len()));
    let pw = W - LEFT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
    let mut svg = Svg::new(w, h, title);
    for t in ticks(y0, y1, 6) {
        svg.line(LEFT, sy(t), LEFT + pw, sy(t), "#e0e0e0", 1.0, false);
        svg.text(LEFT - 6.0, sy(t) + 4.0, "end", &fmt_tick(t));
    }
    for t in ticks(x0, x1, 8) {
        svg.line(sx(t), TOP + ph, sx(t), TOP + ph + 5.0, "#444", 1.0, false);
        svg.text(sx(t), TOP + ph + 18.0, "middle", &fmt_tick(t));
    }
    svg.line(LEFT, TOP + ph, LEFT + pw, TOP + ph, "#444", 1.0, false);
    svg.line(LEFT, TOP, LEFT, TOP + ph, "#444", 1.0, false);
    svg.text(LEFT + pw / 2.0, H - 22.0, "middle", x_label);
    svg.text_rot(18.0, TOP + ph / 2.0, y_label);
    let lx = W + 10.0;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.len() > 1 {
            let d: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let dash = if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = write!(
                svg.s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                d.join(" ")
            );
        }
        for &(x, y) in &pts {
            marker(&mut svg, i, sx(x), sy(y));
        }
        let ly = TOP + 10.0 + ROW * i as f64;
        svg.line(lx + 4.0, ly, lx + 34.0, ly, c, 2.0, s.dashed);
        marker(&mut svg, i, lx + 19.0, ly);
        svg.text(lx + SWATCH, ly + 4.0, "start", &s.name);
    }
    svg.finish()
}

/// Grouped bars: one group per category, one bar per series in each group.
/// `values[s][g]` is series `s` in group `g`; None leaves a gap.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[String],
    values: &[Vec<Option<f64>>],
    y_range: Option<(f64, f64)>,
) -> String {
    let vmax = values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0f64, f64::max);
    let (y0, y1) = y_range.unwrap_or((0.0, if vmax > 0.0 { vmax * 1.1 } else { 1.0 }));
    let right = legend_width(series);
    let (w, h) = (W + right, height_for(series.len()));
    let pw = W - LEFT;
    let ph = H - TOP - BOTTOM;
    let sy = |y: f64| TOP + ph - ((y - y0) / (y1 - y0)).clamp(0.0, 1.0) * ph;
    let mut svg = Svg::new(w, h, title);
    svg.s.push_str(HATCH);
    for t in ticks(y0, y1, 6) {
        svg.line(LEFT, sy(t), LEFT + pw, sy(t), "#e0e0e0", 1.0, false);
        svg.text(LEFT - 6.0, sy(t) + 4.0, "end", &fmt_tick(t));
    }
    svg.text_rot(18.0, TOP + ph / 2.0, y_label);
    let gw = pw / groups.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    for (g, name) in groups.iter().enumerate() {
        let gx = LEFT + g as f64 * gw + gw * 0.1;
        for (s, row) in values.iter().enumerate() {
            if let Some(Some(v)) = row.get(g) {
                let top = sy(*v);
                bar(
                    &mut svg,
                    s,
                    gx + s as f64 * bw,
                    top,
                    (bw - 1.0).max(0.5),
                    TOP + ph - top,
                );
            }
        }
        svg.text_slant(LEFT + g as f64 * gw + gw / 2.0, TOP + ph + 14.0, name);
    }
    svg.line(LEFT, TOP + ph, LEFT + pw, TOP + ph, "#444", 1.0, false);
    svg.line(LEFT, TOP, LEFT, TOP + ph, "#444", 1.0, false);
    for (i, s) in series.iter().enumerate() {
        let ly = TOP + 10.0 + ROW * i as f64;
        bar(&mut svg, i, W + 14.0, ly - 6.0, 24.0, 12.0);
        svg.text(W + SWATCH, ly + 4.0, "start", s);
    }
    svg.finish()
}

/// Horizontal bars on a logarithmic axis (values must be positive; others are left
/// out), a label beside each bar: for costs that span orders of magnitude. Bar `i`
/// takes series colour `first_color + i` (to match a chart beside it).
pub fn hbar_log(
    title: &str,
    x_label: &str,
    labels: &[String],
    values: &[f64],
    first_color: usize,
) -> String {
    let left = labels.iter().map(|l| text_width(l)).fold(0.0, f64::max) + 24.0;
    let (w, rh) = (left + 360.0, 24.0);
    let ph = rh * labels.len().max(1) as f64;
    let h = TOP + ph + BOTTOM;
    let pos: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0).collect();
    let lo = pos.iter().copied().fold(f64::INFINITY, f64::min).min(1.0);
    let hi = pos.iter().copied().fold(0.0, f64::max).max(10.0);
    let (e0, e1) = (lo.log10().floor(), hi.log10().ceil());
    let pw = w - left - 40.0;
    let sx = |v: f64| left + (v.log10() - e0) / (e1 - e0).max(1e-9) * pw;
    let mut svg = Svg::new(w, h, title);
    let mut e = e0;
    while e <= e1 + 1e-9 {
        let x = sx(10f64.powf(e));
        svg.line(x, TOP, x, TOP + ph, "#e0e0e0", 1.0, false);
        svg.text(x, TOP + ph + 16.0, "middle", &fmt_tick(10f64.powf(e)));
        e += 1.0;
    }
    for (i, (l, &v)) in labels.iter().zip(values).enumerate() {
        let y = TOP + i as f64 * rh;
        svg.text(left - 8.0, y + rh / 2.0 + 4.0, "end", l);
        if v > 0.0 {
            let x = sx(v);
            svg.rect(
                left,
                y + 4.0,
                (x - left).max(1.0),
                rh - 8.0,
                color(first_color + i),
            );
            svg.text(x + 4.0, y + rh / 2.0 + 4.0, "start", &fmt_tick(v));
        }
    }
    svg.line(left, TOP, left, TOP + ph, "#444", 1.0, false);
    svg.text(left + pw / 2.0, h - 24.0, "middle", x_label);
    svg.finish()
}

/// Two charts side by side in one picture (each a whole SVG, placed as is).
pub fn side_by_side(title: &str, a: &str, b: &str) -> String {
    let size = |svg: &str| -> (f64, f64) {
        let get = |k: &str| {
            svg.split(&format!(" {k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (get("width"), get("height"))
    };
    let ((aw, ah), (bw, bh)) = (size(a), size(b));
    let (w, h) = (aw + bw, ah.max(bh) + 30.0);
    let mut svg = Svg::new(w, h, title);
    let inner = |s: &str, x: f64| {
        s.trim_end()
            .replacen("<svg ", &format!(r#"<svg x="{x:.0}" y="30" "#), 1)
    };
    svg.s.push_str(&inner(a, 0.0));
    svg.s.push_str(&inner(b, aw));
    svg.finish()
}

/// Diagonal white stripes laid over the bars of the second round of colours.
const HATCH: &str = r##"<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="2" height="6" fill="white" fill-opacity="0.7"/></pattern></defs>"##;

/// Series `i`'s bar: its colour, striped from the second round of the palette on.
fn bar(svg: &mut Svg, i: usize, x: f64, y: f64, w: f64, h: f64) {
    svg.rect(x, y, w, h, color(i));
    if i >= PALETTE.len() {
        svg.rect(x, y, w, h, "url(#hatch)");
    }
}

/// A colour from a perceptually ordered dark-blue → green → yellow ramp, t in [0, 1].
pub fn ramp(t: f64) -> String {
    const STOPS: &[(f64, [f64; 3])] = &[
        (0.0, [48.0, 18.0, 84.0]),
        (0.25, [52.0, 96.0, 141.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [250.0, 231.0, 35.0]),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let i = STOPS
        .iter()
        .rposition(|s| s.0 <= t)
        .unwrap_or(0)
        .min(STOPS.len() - 2);
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let f = (t - a.0) / (b.0 - a.0);
    let c: Vec<u8> = (0..3)
        .map(|k| (a.1[k] + (b.1[k] - a.1[k]) * f).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// A heatmap of `values[row][col]` (None: no data, drawn grey), with a colour bar.
/// Cells are annotated with their values when there are few enough.
#[allow(clippy::too_many_arguments)]
pub fn heatmap(
    title: &str,
    x_label: &str,
    y_label: &str,
    cols: &[String],
    rows: &[String],
    values: &[Vec<Option<f64>>],
    range: (f64, f64),
    annotate: bool,
) -> String {
    // Room for the row labels beside the axis title; a row at least 15 px high.
    let widest = rows.iter().map(|r| text_width(r)).fold(0.0, f64::max);
    let left = (widest + 40.0).max(110.0);
    let pw = W - 70.0;
    let ph = (H - TOP - BOTTOM).max(15.0 * rows.len() as f64);
    let (w, h) = (left + pw + 80.0, TOP + ph + BOTTOM);
    let cw = pw / cols.len().max(1) as f64;
    let rh = ph / rows.len().max(1) as f64;
    let mut svg = Svg::new(w, h, title);
    let norm = |v: f64| (v - range.0) / (range.1 - range.0).max(1e-12);
    for (r, row) in values.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let (x, y) = (left + c as f64 * cw, TOP + r as f64 * rh);
            match v {
                Some(v) => {
                    svg.rect(x, y, cw + 0.3, rh + 0.3, &ramp(norm(*v)));
                    if annotate && cw > 26.0 && rh > 13.0 {
                        let ink = if norm(*v) > 0.6 { "#000" } else { "#fff" };
                        let _ = write!(
                            svg.s,
                            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="{ink}">{}</text>"#,
                            x + cw / 2.0,
                            y + rh / 2.0 + 3.5,
                            fmt_tick((v * 100.0).round() / 100.0)
                        );
                    }
                }
                None => svg.rect(x, y, cw + 0.3, rh + 0.3, "#d0d0d0"),
            }
        }
    }
    let every =
        |n: usize, need: f64, space: f64| ((need / space).ceil() as usize).max(1).min(n.max(1));
    let widest = cols.iter().map(|c| c.chars().count()).max().unwrap_or(1) as f64;
    let cstep = every(cols.len(), widest * 7.5 + 8.0, cw);
    for (c, name) in cols.iter().enumerate().step_by(cstep) {
        svg.text(
            left + c as f64 * cw + cw / 2.0,
            TOP + ph + 16.0,
            "middle",
            name,
        );
    }
    let rstep = every(rows.len(), 14.0, rh);
    for (r, name) in rows.iter().enumerate().step_by(rstep) {
        svg.text(
            left - 6.0,
            TOP + r as f64 * rh + rh / 2.0 + 4.0,
            "end",
            name,
        );
    }
    svg.text(left + pw / 2.0, h - 22.0, "middle", x_label);
    svg.text_rot(16.0, TOP + ph / 2.0, y_label);
    let bx = left + pw + 30.0;
    for k in 0..50 {
        let t = k as f64 / 49.0;
        svg.rect(
            bx,
            TOP + ph - (k as f64 + 1.0) * ph / 50.0,
            16.0,
            ph / 50.0 + 0.5,
            &ramp(t),
        );
    }
    svg.text(bx + 22.0, TOP + 8.0, "start", &fmt_tick(range.1));
    svg.text(bx + 22.0, TOP + ph, "start", &fmt_tick(range.0));
    svg.finish()
}

/// Write `stem.svg` and `stem.png` next to each other; returns both paths. The files
/// are written to temporaries and renamed, so a failure leaves no half-written chart.
pub fn save(svg: &str, stem: &Path) -> Result<Vec<PathBuf>, String> {
    // Not `with_extension`: stems may contain dots (`tasks_at_0.5`).
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", stem.display()));
    let (svg_path, png_path) = (with("svg"), with("png"));
    let png = render_png(svg)?;
    write_atomic(&svg_path, svg.as_bytes())?;
    write_atomic(&png_path, &png)?;
    Ok(vec![svg_path, png_path])
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn fontdb() -> std::sync::Arc<resvg::usvg::fontdb::Database> {
    static DB: std::sync::OnceLock<std::sync::Arc<resvg::usvg::fontdb::Database>> =
        std::sync::OnceLock::new();
    DB.get_or_init(|| {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_system_fonts();
        std::sync::Arc::new(db)
    })
    .clone()
}

/// Rasterize an SVG at twice its size.
pub fn render_png(svg: &str) -> Result<Vec<u8>, String> {
    let opt = resvg::usvg::Options {
        fontdb: fontdb(),
        ..Default::default()
    };
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| format!("chart: {e}"))?;
    let size = tree.size().to_int_size();
    let scale = 2.0;
    let mut pixmap = resvg::tiny_skia::Pixmap::new(
        (size.width() as f32 * scale) as u32,
        (size.height() as f32 * scale) as u32,
    )
    .ok_or("chart: empty image")?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| format!("chart: {e}"))
}

/// Whether PNG charts will have text (some font is installed).
pub fn have_fonts() -> bool {
    !fontdb().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_valid_svg_that_renders_to_png() {
        let s = vec![
            Series {
                name: "a".into(),
                points: vec![(0.35, 0.5), (0.5, 0.7), (1.0, 0.9)],
                dashed: false,
            },
            Series {
                name: "full <ref>".into(),
                points: vec![(0.35, 0.9), (1.0, 0.9)],
                dashed: true,
            },
        ];
        let line = line_chart("t", "budget", "score", &s, Some((0.0, 1.0)));
        assert!(line.contains("full &lt;ref&gt;"));
        let bars = bar_chart(
            "b",
            "score",
            &["x".into(), "y".into()],
            &["m".into()],
            &[vec![Some(0.5), None]],
            None,
        );
        let heat = heatmap(
            "h",
            "len",
            "depth",
            &["4k".into(), "8k".into()],
            &["0".into()],
            &[vec![Some(1.0), None]],
            (0.0, 1.0),
            true,
        );
        for svg in [line, bars, heat] {
            let png = render_png(&svg).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        }
    }

    #[test]
    fn ramp_runs_from_dark_to_light() {
        assert_eq!(ramp(0.0), "#301254");
        assert_eq!(ramp(1.0), "#fae723");
        assert_eq!(ramp(f64::NAN), ramp(0.0));
    }

    #[test]
    fn ticks_are_round_numbers_inside_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert!(ticks(3.0, 97.0, 6)
            .iter()
            .all(|&t| (3.0..=97.0).contains(&t)));
    }
}
