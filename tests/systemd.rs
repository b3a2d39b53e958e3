//! systemd integration through a real NOTIFY_SOCKET: READY=1 after start, WATCHDOG=1 pings while
//! the pipeline is healthy, and no pings once the forwarder is stalled.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::*;

/// A converter that hangs the forwarder on request (with a timeout far above the watchdog's).
const HANG: &str =
    "if (decodeToString(payload) === 'hang') { while (true) {} }\nreturn {deviceName: 'd'};";

struct NotifySocket {
    socket: UnixDatagram,
    pub path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket { socket, path }
    }

    /// Every datagram received during `window`.
    fn messages_for(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1024];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains(needle) {
                    return true;
                }
            }
        }
        false
    }
}

fn pings(messages: &[String]) -> usize {
    messages.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_then_pings_which_stop_while_the_forwarder_is_stalled() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hang.js"), HANG).unwrap();
    let config = write_config(
        dir.path(),
        mqtt.port,
        &kafka.bootstrap(),
        "uplink",
        "converter = \"hang\"\n[converters.hang]\nscript = \"hang.js\"\ntimeout = \"120s\"\n",
    );
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let mut gw = Gateway::start_with_env(
        &config,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(15)),
        "no READY=1; log:\n{}",
        gw.log()
    );
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let healthy = notify.messages_for(Duration::from_secs(2));
    assert!(pings(&healthy) >= 3, "healthy pipeline, pings: {healthy:?}");

    // One record the converter hangs on: the forwarder waits for it and stops making progress.
    let publisher = Publisher::connect(mqtt.port, "dev").await;
    publisher.publish("sensors/x", b"hang".to_vec()).await;
    gw.wait_for("watchdog: stage stalled", Duration::from_secs(10));
    let _ = notify.messages_for(Duration::from_millis(600));
    let stalled = notify.messages_for(Duration::from_secs(3));
    assert_eq!(pings(&stalled), 0, "pings while stalled: {stalled:?}");
    assert!(gw.log().contains("stage=\"converter\""), "{}", gw.log());
    gw.kill9();
}

/// `systemctl reload` (SIGHUP): RELOADING=1 with the monotonic time, then READY=1 once applied,
/// or once refused: either way the unit leaves the reloading state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_is_announced_to_systemd_and_ended_whether_applied_or_refused() {
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let gw = Gateway::start_with_env(&config, &[("NOTIFY_SOCKET", &socket)]);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(15)),
        "no READY=1; log:\n{}",
        gw.log()
    );
    let hup = || {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(gw.pid().unwrap() as i32, libc::SIGHUP) };
    };
    hup();
    let applied = notify.messages_for(Duration::from_secs(2));
    let reloading = applied.iter().position(|m| m.contains("RELOADING=1"));
    let ready = applied.iter().rposition(|m| m.contains("READY=1"));
    assert!(
        matches!((reloading, ready), (Some(a), Some(b)) if a < b),
        "{applied:?}"
    );
    assert!(
        applied.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "{applied:?}"
    );
    assert_eq!(gw.count("configuration reloaded"), 1, "{}", gw.log());

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("id = \"gw-test\"", "id = \"other\"")).unwrap();
    hup();
    let refused = notify.messages_for(Duration::from_secs(2));
    assert!(
        refused.iter().any(|m| m.contains("RELOADING=1")),
        "{refused:?}"
    );
    assert!(refused.iter().any(|m| m.contains("READY=1")), "{refused:?}");
    assert_eq!(gw.count("reload refused"), 1, "{}", gw.log());
}

/// `systemd-analyze`, if this machine has it (Debian's `systemd` package).
fn systemd_analyze() -> Option<std::process::Command> {
    let ok = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| std::process::Command::new("systemd-analyze"))
}

#[test]
fn the_unit_file_verifies_and_scores_at_most_2_5() {
    let Some(_) = systemd_analyze() else {
        panic!("systemd-analyze is required (apt-get install systemd)");
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("edgegate.service");
    let text = std::fs::read_to_string("systemd/edgegate.service").unwrap();
    // verify insists that ExecStart exists: point it at the binary under test.
    std::fs::write(
        &unit,
        text.replace("/usr/bin/edgegate", env!("CARGO_BIN_EXE_edgegate")),
    )
    .unwrap();
    let out = systemd_analyze()
        .unwrap()
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

    let out = systemd_analyze()
        .unwrap()
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let score: f64 = stdout
        .lines()
        .find_map(|l| l.split("exposure level for edgegate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{stdout}"));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{stdout}");
    for required in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=edgegate",
        "ConfigurationDirectory=edgegate",
        "SupplementaryGroups=dialout",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "DeviceAllow=char-ttyUSB rw",
        "MemoryMax=",
        "ExecReload=/usr/bin/edgegate reload --config /etc/edgegate/edgegate.toml --pid $MAINPID",
    ] {
        assert!(text.contains(required), "unit lacks {required}");
    }
}
