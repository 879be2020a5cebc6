//! `lb top`: a live view of the daemon, refreshed every second. Per service and backend:
//! packets/s, new flows/s, health state, score, breaker, effective weight; the data plane's
//! drops per second by reason. Sorted by packet rate. `q` quits; `--once` prints one frame as
//! plain text, for scripts.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    widgets::{Block, Paragraph, Row, Table},
};
use serde_json::Value;

use crate::api::{self, Request};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One sample of what the view shows.
struct Sample {
    at: Instant,
    stats: Value,
    health: Value,
}

fn sample(socket: &Path) -> anyhow::Result<Sample> {
    let get = |r: &Request| -> anyhow::Result<Value> {
        let resp = api::call(socket, r, TIMEOUT)?;
        if !resp.ok {
            anyhow::bail!("{}", resp.error.unwrap_or_default());
        }
        Ok(resp.data)
    };
    Ok(Sample {
        at: Instant::now(),
        stats: get(&Request::Stats)?,
        health: get(&Request::Health { service: None })?,
    })
}

/// A row of the backend table.
pub struct Line {
    pub service: String,
    pub backend: String,
    pub pps: f64,
    pub flows_per_s: f64,
    pub state: String,
    pub score: f64,
    pub weight: String,
    pub breaker: String,
}

/// The backend rows, and the drops per second by reason.
type Frame = (Vec<Line>, Vec<(String, f64)>);

/// A frame from two samples.
fn frame(a: &Sample, b: &Sample) -> Frame {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let mut before: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for s in a.stats["services"].as_array().into_iter().flatten() {
        for bk in s["backends"].as_array().into_iter().flatten() {
            before.insert(
                (
                    s["name"].as_str().unwrap_or_default().into(),
                    bk["id"].as_str().unwrap_or_default().into(),
                ),
                (
                    bk["packets"].as_u64().unwrap_or(0),
                    bk["new_flows"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    let mut health: HashMap<(String, String), &Value> = HashMap::new();
    for s in b.health.as_array().into_iter().flatten() {
        for bk in s["backends"].as_array().into_iter().flatten() {
            health.insert(
                (
                    s["service"].as_str().unwrap_or_default().into(),
                    bk["id"].as_str().unwrap_or_default().into(),
                ),
                bk,
            );
        }
    }
    let mut lines = Vec::new();
    for s in b.stats["services"].as_array().into_iter().flatten() {
        for bk in s["backends"].as_array().into_iter().flatten() {
            let key = (
                s["name"].as_str().unwrap_or_default().to_string(),
                bk["id"].as_str().unwrap_or_default().to_string(),
            );
            let (p0, f0) = before.get(&key).copied().unwrap_or_default();
            let h = health.get(&key).copied().unwrap_or(&Value::Null);
            lines.push(Line {
                pps: bk["packets"].as_u64().unwrap_or(0).saturating_sub(p0) as f64 / secs,
                flows_per_s: bk["new_flows"].as_u64().unwrap_or(0).saturating_sub(f0) as f64 / secs,
                state: h["state"].as_str().unwrap_or("?").to_string(),
                score: h["health_score"].as_f64().unwrap_or(0.0),
                weight: format!("{}/{}", h["effective_weight"], h["weight"]),
                breaker: h["check"]["breaker"].as_str().unwrap_or("-").to_string(),
                service: key.0,
                backend: key.1,
            });
        }
    }
    lines.sort_by(|x, y| {
        y.pps
            .total_cmp(&x.pps)
            .then_with(|| (&x.service, &x.backend).cmp(&(&y.service, &y.backend)))
    });
    let mut drops = Vec::new();
    for (name, v) in b.stats["counters"].as_object().into_iter().flatten() {
        if name.starts_with("drop_") {
            let d = v
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(a.stats["counters"][name].as_u64().unwrap_or(0));
            if d > 0 {
                drops.push((name.clone(), d as f64 / secs));
            }
        }
    }
    (lines, drops)
}

const HEADER: [&str; 8] = [
    "service",
    "backend",
    "packets/s",
    "flows/s",
    "state",
    "score",
    "weight",
    "breaker",
];

fn cells(l: &Line) -> [String; 8] {
    [
        l.service.clone(),
        l.backend.clone(),
        format!("{:.0}", l.pps),
        format!("{:.0}", l.flows_per_s),
        l.state.clone(),
        format!("{:.2}", l.score),
        l.weight.clone(),
        l.breaker.clone(),
    ]
}

/// One frame as plain text (`--once`): two samples a second apart.
pub fn once(socket: &Path) -> anyhow::Result<String> {
    let a = sample(socket)?;
    std::thread::sleep(Duration::from_secs(1));
    let b = sample(socket)?;
    let (lines, drops) = frame(&a, &b);
    let rows: Vec<[String; 8]> = lines.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let fmt = |cols: &[String]| {
        cols.iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out.push_str(&fmt(&HEADER.map(String::from)));
    out.push('\n');
    for r in &rows {
        out.push_str(&fmt(r));
        out.push('\n');
    }
    if drops.is_empty() {
        out.push_str("drops/s: none\n");
    } else {
        let d: Vec<String> = drops.iter().map(|(n, r)| format!("{n}={r:.0}")).collect();
        out.push_str(&format!("drops/s: {}\n", d.join(" ")));
    }
    Ok(out)
}

/// The live view until `q` (or Esc, or Ctrl-C). Drawn only on a terminal: into a pipe or a
/// file its cursor moves and styles would be noise, so it refuses in one line there.
pub fn live(socket: &Path) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "lb top draws on a terminal and standard output is not one (fix: `lb top --once` prints a frame as plain text)"
        );
    }
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(e) => {
            // Raw mode may be on already: give the terminal back as it was.
            ratatui::restore();
            anyhow::bail!("cannot draw on the terminal: {e}");
        }
    };
    let result = (|| -> anyhow::Result<()> {
        let mut last = sample(socket)?;
        let mut shown: Option<Frame> = None;
        loop {
            let (lines, drops) = shown
                .as_ref()
                .map_or((&[][..], &[][..]), |(l, d)| (l.as_slice(), d.as_slice()));
            terminal.draw(|f| {
                let [top, bottom] =
                    Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(f.area());
                let rows = lines.iter().map(|l| Row::new(cells(l)));
                let widths = [
                    Constraint::Length(16),
                    Constraint::Length(16),
                    Constraint::Length(10),
                    Constraint::Length(8),
                    Constraint::Length(6),
                    Constraint::Length(6),
                    Constraint::Length(10),
                    Constraint::Length(9),
                ];
                let table = Table::new(rows, widths)
                    .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
                    .block(Block::bordered().title(" lb top: q quits "));
                f.render_widget(table, top);
                let d: Vec<String> = drops.iter().map(|(n, r)| format!("{n}={r:.0}")).collect();
                let text = if d.is_empty() {
                    "none".to_string()
                } else {
                    d.join("  ")
                };
                f.render_widget(
                    Paragraph::new(text).block(Block::bordered().title(" drops/s ")),
                    bottom,
                );
            })?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)?
                    && let Event::Key(k) = event::read()?
                    && k.kind == KeyEventKind::Press
                    && matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
            let next = sample(socket)?;
            shown = Some(frame(&last, &next));
            last = next;
        }
    })();
    ratatui::restore();
    result
}
