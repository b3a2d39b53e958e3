//! The status page in a real browser: headless Chromium (Debian's `chromium` package) loads
//! `GET /` of a running gateway with traffic, runs its script, and the rendered DOM shows the
//! gateway's values; a screenshot goes to `target/test-artefacts/status-page.png`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

/// A payload that would run if the page ever inserted device data as HTML.
const HOSTILE: &str =
    "a bad one<img src=x onerror=\"document.body.setAttribute('data-xss','ran')\">";

/// Debian's Chromium; the test fails (it does not skip) without it.
fn chromium() -> PathBuf {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|name| program(name))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "headless Chromium is needed for this test and was not found on PATH: \
             install Debian's package (apt-get install chromium; scripts/prerequisites does) \
             or set EDGEGATE_CHROMIUM to the binary"
        )
    })
}

/// Chromium with a fresh profile, nothing fetched but the page, `args` added.
fn browse(url: &str, profile: &Path, args: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            // Scripts run and the page's requests complete within this much virtual time.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text inside the element with `id` (its first text, tags stripped).
fn element_text(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').map_or(0, |i| i + 1);
    let end = rest[start..].find('<').map_or(rest.len(), |i| start + i);
    rest[start..end].trim().to_owned()
}

/// The row of a table with `data-<kind>="<name>"`, tags stripped, cells joined by '|'.
fn row(dom: &str, kind: &str, name: &str) -> String {
    let marker = format!("data-{kind}=\"{name}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} row in the page:\n{dom}"));
    let rest = &dom[at..];
    let end = rest.find("</tr>").unwrap_or(rest.len());
    let mut cells = String::new();
    let mut in_tag = false;
    for c in rest[..end].chars() {
        match c {
            '<' => {
                in_tag = true;
                cells.push('|');
            }
            '>' => in_tag = false,
            c if !in_tag => cells.push(c),
            _ => {}
        }
    }
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_the_gateways_status_in_chromium() {
    let browser = chromium();
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 1);
    let dir = tempfile::tempdir().unwrap();
    let (config, admin) = meter_config(dir.path(), mqtt.port, &kafka.bootstrap());
    let gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(20));
    let publisher = Publisher::connect(mqtt.port, "page-device").await;
    publish_delivered(
        &publisher,
        admin,
        "sensors/a",
        40,
        60,
        Duration::from_secs(60),
    )
    .await;
    // Device data is hostile: the page must show it as text, never run it.
    publisher
        .publish("sensors/a", HOSTILE.as_bytes().to_vec())
        .await;
    wait_metric(
        admin,
        "edgegate_converter_errors_total",
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    // A second history point (the first is taken at start), so the plots have lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while http_get(admin, "/status/history").1.matches("t_ms").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second history point"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let url = format!("http://127.0.0.1:{admin}/");
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(&url, profile.path(), &["--dump-dom"]);
    assert_eq!(element_text(&dom, "gateway-id"), "gw-test", "{dom}");
    assert_eq!(element_text(&dom, "link-state"), "up");
    assert!(dom.contains("class=\"big state-up\""), "{dom}");
    // A converter error within the last 15 minutes: a warning, with its reason listed.
    assert_eq!(element_text(&dom, "health"), "warning");
    assert!(
        dom.contains("converter errors in the last 15 minutes: 1"),
        "{dom}"
    );
    assert_eq!(element_text(&dom, "backlog-records"), "0");
    let plant = row(&dom, "source", "plant");
    assert!(plant.contains("|mqtt|"), "{plant}");
    assert!(plant.contains("|connected|"), "{plant}");
    assert!(plant.contains("|41|"), "records: {plant}");
    let tb = row(&dom, "converter", "tb");
    assert!(tb.contains("exception 1"), "{tb}");
    assert!(tb.contains("bad payload: a bad one"), "{tb}");
    assert!(element_text(&dom, "memory").starts_with("RSS "), "{dom}");
    assert_eq!(element_text(&dom, "dropped"), "converter_exception 1");
    // The debug events: the newest first, In / Out / Metadata / Error as ThingsBoard shows them.
    let debug = &dom[dom.find("id=\"debug\"").unwrap()..];
    assert!(debug.contains("a bad one"), "{debug}");
    assert!(debug.contains("Error: bad payload"), "{debug}");
    assert!(debug.contains("sensors/a#39#"), "{debug}");
    assert!(debug.contains("meter-1"), "{debug}");
    assert!(
        debug.contains("&quot;topic&quot;:&quot;sensors/a&quot;")
            || debug.contains("\"topic\":\"sensors/a\""),
        "{debug}"
    );
    // Both plots drew their lines.
    for plot in ["plot-backlog", "plot-rates"] {
        let svg = &dom[dom.find(&format!("id=\"{plot}\"")).unwrap()..];
        let svg = &svg[..svg.find("</svg>").unwrap()];
        assert!(svg.contains("<polyline"), "{plot}: {svg}");
    }
    assert!(
        element_text(&dom, "error").is_empty() || dom.contains("id=\"error\" hidden"),
        "{dom}"
    );
    assert!(
        !dom.contains("data-xss=\"ran\""),
        "device data ran as HTML: {dom}"
    );
    assert!(dom.contains("&lt;img src=x onerror="), "{dom}");

    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    browse(
        &url,
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000",
        ],
    );
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot from {}: {e}", browser.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
