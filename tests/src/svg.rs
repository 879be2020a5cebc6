//! The one SVG writer the reports share: the bench's data-plane chart
//! (`bench::report`, bars) and the soak's plot (`soak`, lines over time).

use std::fmt::Write as _;

/// An SVG document on a white background, written element by element.
pub struct Svg {
    text: String,
}

impl Svg {
    pub fn new(width: f64, height: f64) -> Self {
        let mut text = String::new();
        let _ = writeln!(
            text,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
        );
        let _ = writeln!(text, r#"<rect width="100%" height="100%" fill="white"/>"#);
        Self { text }
    }

    /// Text at (x, y); `attrs` are extra attributes (`fill="#555"`, `text-anchor="end"`).
    pub fn text(&mut self, x: f64, y: f64, attrs: &str, text: &str) {
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {attrs}")
        };
        let _ = writeln!(
            self.text,
            r#"<text x="{}" y="{}"{attrs}>{}</text>"#,
            num(x),
            num(y),
            xml(text)
        );
    }

    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = writeln!(
            self.text,
            r#"<rect x="{}" y="{}" width="{w:.1}" height="{}" fill="{fill}"/>"#,
            num(x),
            num(y),
            num(h)
        );
    }

    /// A line; `dash` is a `stroke-dasharray` ("4 3"), if any.
    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str, dash: Option<&str>) {
        let dash = dash
            .map(|d| format!(r#" stroke-dasharray="{d}""#))
            .unwrap_or_default();
        let _ = writeln!(
            self.text,
            r#"<line x1="{x1:.1}" y1="{}" x2="{x2:.1}" y2="{}" stroke="{stroke}"{dash}/>"#,
            num(y1),
            num(y2)
        );
    }

    /// A line through `points`.
    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: &str) {
        let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            self.text,
            r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="1.5"/>"#,
            pts.join(" ")
        );
    }

    pub fn finish(mut self) -> String {
        self.text.push_str("</svg>\n");
        self.text
    }
}

/// A coordinate as written: whole numbers without a fraction, others to 0.1.
fn num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

pub fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
