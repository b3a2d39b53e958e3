//! `edgegate status` and `edgegate top`: the admin endpoint's `/status` in a terminal. The exit
//! status follows the health, for scripts: 0 ok, 1 warning, 2 critical, 3 unknown.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytesize::ByteSize;

use super::client::AdminClient;
use crate::config::load_admin;
use crate::status::Status;

/// The exit status when the gateway cannot be asked or its answer makes no sense.
pub const UNKNOWN: u8 = 3;
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Values a sparkline of `top` shows, one per frame.
const SPARK_WIDTH: usize = 60;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Clear the screen and go home, as `watch` does; no terminal library needed.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// The client for the gateway running with the configuration at `path`; only its `[admin]`
/// table is read.
pub fn client(path: &Path) -> Result<AdminClient, String> {
    let admin = load_admin(path).map_err(|e| e.to_string())?;
    let admin = admin.ok_or_else(|| super::client::ClientError::NoAdmin.to_string())?;
    AdminClient::for_admin(&admin, TIMEOUT).map_err(|e| e.to_string())
}

/// `GET /status`: the body as sent, and parsed.
pub fn fetch(client: &AdminClient) -> Result<(String, Status), String> {
    let answer = client.get("/status").map_err(|e| e.to_string())?;
    if answer.status != 200 {
        return Err(format!(
            "{}://{}/status answered HTTP {}: {}",
            client.scheme(),
            client.addr(),
            answer.status,
            printable(answer.body.trim())
        ));
    }
    let not_a_status = |e: serde_json::Error| {
        format!(
            "{}://{}/status is not a status: {e}",
            client.scheme(),
            client.addr()
        )
    };
    let mut value: serde_json::Value = serde_json::from_str(&answer.body).map_err(not_a_status)?;
    make_printable(&mut value);
    let status = serde_json::from_value(value.clone()).map_err(not_a_status)?;
    Ok((value.to_string(), status))
}

/// Device data (a converter's error message quoting the payload) and broker text reach the
/// terminal through the status: control characters become `\u{…}`, so none can move the
/// cursor, clear the screen or retitle the window.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn make_printable(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) if s.chars().any(char::is_control) => *s = printable(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(make_printable),
        serde_json::Value::Object(map) => map.values_mut().for_each(make_printable),
        _ => {}
    }
}

/// `edgegate status`: prints the status (or its JSON) to `out`; returns the exit status.
pub fn status(config: &Path, json: bool, out: &mut impl Write) -> u8 {
    let fetched = client(config).and_then(|c| fetch(&c));
    let (body, status) = match fetched {
        Ok(f) => f,
        Err(message) => {
            eprintln!("edgegate status: {message}");
            return UNKNOWN;
        }
    };
    let text = if json {
        format!("{}\n", body.trim_end())
    } else {
        render(&status)
    };
    // A closed pipe (`| head`) is the reader's choice; the health is still the answer.
    let _ = out.write_all(text.as_bytes());
    status.health.status.exit_code()
}

/// `edgegate top`: redraws every `interval` until interrupted, or `frames` times. Rates come
/// from the totals between two frames. Returns the exit status of the last frame's health.
pub fn top(config: &Path, interval: Duration, frames: Option<u64>, out: &mut impl Write) -> u8 {
    let client = match client(config) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("edgegate top: {message}");
            return UNKNOWN;
        }
    };
    let mut spark = Sparks::default();
    let mut code = UNKNOWN;
    let mut frame = 0u64;
    while frames.is_none_or(|n| frame < n) {
        if frame > 0 {
            std::thread::sleep(interval);
        }
        frame += 1;
        let text = match fetch(&client) {
            Ok((_, status)) => {
                spark.add(&status);
                code = status.health.status.exit_code();
                format!("{CLEAR}{}{}", render(&status), spark.render())
            }
            Err(message) => {
                code = UNKNOWN;
                format!("{CLEAR}edgegate top: {message}\n(retrying every {interval:?})\n")
            }
        };
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    code
}

/// The rate series `top` draws, computed from the totals of consecutive frames.
#[derive(Default)]
struct Sparks {
    last: Option<(Instant, u64, u64)>,
    ingest: VecDeque<f64>,
    delivery: VecDeque<f64>,
}

impl Sparks {
    fn add(&mut self, status: &Status) {
        let now = Instant::now();
        let (ingested, delivered) = (status.totals.ingested, status.totals.delivered);
        let (ingest, delivery) = match self.last {
            Some((at, i, d)) => {
                let secs = now.duration_since(at).as_secs_f64().max(0.001);
                (
                    ingested.saturating_sub(i) as f64 / secs,
                    delivered.saturating_sub(d) as f64 / secs,
                )
            }
            // The first frame has no frame before it: the gateway's own recent rates.
            None => (
                status.rates.ingest.unwrap_or(0.0),
                status.rates.delivery.unwrap_or(0.0),
            ),
        };
        self.last = Some((now, ingested, delivered));
        for (series, value) in [(&mut self.ingest, ingest), (&mut self.delivery, delivery)] {
            if series.len() == SPARK_WIDTH {
                series.pop_front();
            }
            series.push_back(value);
        }
    }

    fn render(&self) -> String {
        let line = |name: &str, series: &VecDeque<f64>| {
            let values: Vec<f64> = series.iter().copied().collect();
            let last = values.last().copied().unwrap_or(0.0);
            format!("{name:<9} {} {last:.1}/s\n", sparkline(&values))
        };
        format!(
            "\n{}{}",
            line("ingest", &self.ingest),
            line("delivery", &self.delivery)
        )
    }
}

/// One character per value, scaled to the largest: ▁ for nothing, █ for the peak.
pub fn sparkline(values: &[f64]) -> String {
    let max = values.iter().copied().fold(0.0, f64::max);
    values
        .iter()
        .map(|&v| {
            if max <= 0.0 || !v.is_finite() {
                return SPARKS[0];
            }
            let level = (v / max * (SPARKS.len() - 1) as f64).round();
            SPARKS[(level.max(0.0) as usize).min(SPARKS.len() - 1)]
        })
        .collect()
}

fn bytes(n: u64) -> String {
    ByteSize::b(n).to_string()
}

fn seconds(s: f64) -> String {
    let whole = Duration::from_secs(s.max(0.0).round() as u64);
    humantime::format_duration(whole).to_string()
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}/s"))
}

/// The status for a terminal, one topic per line.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let g = &s.gateway;
    let _ = writeln!(
        o,
        "edgegate {} {} · up {} · health {}",
        g.id,
        g.version,
        seconds(g.uptime_seconds as f64),
        s.health.status.as_str().to_uppercase()
    );
    for reason in &s.health.reasons {
        let _ = writeln!(o, "  ! {reason}");
    }
    let l = &s.link;
    let why = l
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "link        {} since {} ({}){why}",
        l.state,
        l.since,
        seconds(l.for_seconds as f64)
    );
    render_backlog(&mut o, s);
    let _ = writeln!(
        o,
        "rates       ingest {}, delivery {}",
        rate(s.rates.ingest),
        rate(s.rates.delivery)
    );
    render_sources(&mut o, s);
    render_converters(&mut o, s);
    if let Some(d) = &s.downlink {
        let _ = writeln!(
            o,
            "downlink    lag {} · received {} · delivered {} · failed {} · dead-lettered {}",
            d.lag, d.received, d.delivered, d.failed, d.dead_lettered
        );
    }
    let d = &s.disk;
    let free = d.free_bytes.map_or_else(|| "-".to_owned(), bytes);
    let _ = writeln!(
        o,
        "disk        buffer {} of {} · free {free} (reserve {})",
        bytes(d.buffer_bytes),
        bytes(d.buffer_max_bytes),
        bytes(d.min_free_bytes)
    );
    let rss = s.memory.rss_bytes.map_or_else(|| "-".to_owned(), bytes);
    let _ = writeln!(
        o,
        "memory      RSS {rss} of {} budget",
        bytes(s.memory.budget_bytes)
    );
    let dropped: Vec<String> = s.dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let dropped = if dropped.is_empty() {
        "none".to_owned()
    } else {
        dropped.join(" · ")
    };
    let _ = writeln!(o, "dropped     {dropped}");
    o
}

fn render_backlog(o: &mut String, s: &Status) {
    let b = &s.backlog;
    let oldest = b
        .oldest_capture
        .as_ref()
        .map(|t| {
            let age = b.oldest_age_seconds.map(seconds).unwrap_or_default();
            format!(", oldest captured {t} ({age} ago)")
        })
        .unwrap_or_default();
    let drain = match b.drain_seconds {
        Some(0.0) => String::new(),
        Some(d) => format!(", drains in ~{}", seconds(d)),
        None => ", not draining now".to_owned(),
    };
    let _ = writeln!(
        o,
        "backlog     {} records, {}{oldest}{drain}",
        b.records,
        bytes(b.bytes)
    );
}

fn render_sources(o: &mut String, s: &Status) {
    for (i, (name, src)) in s.sources.iter().enumerate() {
        let label = if i == 0 { "sources" } else { "" };
        let state = if src.connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let _ = writeln!(
            o,
            "{label:<11} {name} ({}) {state} · {} · {} records · {} restarts",
            src.kind,
            rate(src.ingest_rate),
            src.records_total,
            src.restarts
        );
    }
}

fn render_converters(o: &mut String, s: &Status) {
    for (i, (name, c)) in s.converters.iter().enumerate() {
        let label = if i == 0 { "converters" } else { "" };
        let errors: Vec<String> = c.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let errors = if errors.is_empty() {
            "no errors".to_owned()
        } else {
            format!("errors: {}", errors.join(", "))
        };
        let _ = writeln!(
            o,
            "{label:<11} {name} ({}, debug {}) {errors}",
            c.kind, c.debug
        );
        if let Some(e) = &c.last_error {
            let _ = writeln!(
                o,
                "{:<11}   last error {} ({}): {}",
                "", e.at, e.kind, e.message
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_devices_cannot_reach_the_terminal() {
        let hostile = "bad \u{1b}]0;PWNED\u{7}\u{1b}[2J\u{9b}31m ok\nnext";
        let shown = printable(hostile);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert!(shown.contains("\\u{1b}]0;PWNED") && shown.contains("ok\nnext"));
        let mut value =
            serde_json::json!({"converters": {"tb": {"last_error": {"message": hostile}}}});
        make_printable(&mut value);
        assert!(!value.to_string().contains('\u{9b}'));
    }

    #[test]
    fn sparklines_scale_to_the_peak() {
        assert_eq!(sparkline(&[0.0, 0.0]), "▁▁");
        assert_eq!(sparkline(&[0.0, 50.0, 100.0]), "▁▅█");
        assert_eq!(sparkline(&[]), "");
    }
}
