//! The command line: `check` and `run` on bad input, and MQTT connection problems.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use support::*;

const GOOD: &str = r#"
[gateway]
id = "gw-01"
data_dir = "DATA"

[kafka]
bootstrap_servers = "127.0.0.1:9"
topic = "t"

[sources.plant]
type = "mqtt"
topics = ["sensors/#"]
"#;

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("edgegate.toml");
    std::fs::write(
        &path,
        text.replace("DATA", &dir.join("data").display().to_string()),
    )
    .unwrap();
    path
}

fn edgegate_with(args: &[&str], config: &Path) -> Output {
    edgegate()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Both `check` and `run` exit 2 and name the file and every `needles` item on stderr.
fn assert_rejected(config: &Path, needles: &[&str]) {
    for cmd in ["check", "run"] {
        let out = edgegate_with(&[cmd], config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.contains(&config.display().to_string()),
            "{cmd}: file not named: {stderr}"
        );
        for n in needles {
            assert!(stderr.contains(n), "{cmd}: {n:?} not in: {stderr}");
        }
    }
}

#[test]
fn the_shipped_config_and_a_minimal_one_check_ok() {
    let out = edgegate_with(&["check"], Path::new("config/edgegate.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let out = edgegate_with(&["check"], &write(dir.path(), GOOD));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn version_is_printed() {
    let out = edgegate().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &GOOD.replace("topic = \"t\"", "topic = \"t\"\ntopik = \"u\""),
    );
    assert_rejected(&config, &["kafka.topik", ":9:", "unknown field"]);
}

#[test]
fn wrong_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &GOOD.replace(
            "topics = [\"sensors/#\"]",
            "topics = [\"sensors/#\"]\nport = \"high\"",
        ),
    );
    assert_rejected(&config, &["sources.plant.port", ":13:"]);
}

#[test]
fn missing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    assert_rejected(
        &dir.path().join("nope.toml"),
        &["cannot read", "No such file"],
    );
}

#[test]
fn unusable_data_dir_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be: unusable even for root, which ignores permissions.
    let blocker = dir.path().join("data");
    std::fs::write(&blocker, b"").unwrap();
    let config = write(dir.path(), GOOD);
    assert_rejected(&config, &["gateway.data_dir", "not a directory"]);
}

#[test]
fn weakened_acks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!("{GOOD}\n[kafka.properties]\nacks = 1\n").replace(
            "[sources.plant]\ntype = \"mqtt\"\ntopics = [\"sensors/#\"]\n",
            "",
        ),
    );
    assert_rejected(&config, &["kafka.properties.acks"]);
}

fn run_gateway(dir: &Path, mqtt_port: u16, extra: &str) -> Gateway {
    let config = write_config(dir, mqtt_port, "127.0.0.1:9", "uplink", extra);
    Gateway::start(&config)
}

#[test]
fn wrong_mqtt_credentials_give_one_clear_line_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("passwd");
    let status = std::process::Command::new(program("mosquitto_passwd"))
        .args(["-c", "-b"])
        .arg(&pwfile)
        .args(["edgegate", "right"])
        .status()
        .unwrap();
    assert!(status.success());
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\nlog_type all\n",
        pwfile.display()
    ));
    let mut gw = run_gateway(
        dir.path(),
        broker.port,
        "username = \"edgegate\"\npassword_env = \"EDGEGATE_TEST_MQTT_PW\"\n",
    );
    // The variable is missing: a config error, not a silent empty password.
    assert!(
        !gw.is_running() || {
            std::thread::sleep(Duration::from_millis(500));
            !gw.is_running()
        }
    );
    assert!(gw.log().contains("EDGEGATE_TEST_MQTT_PW"), "{}", gw.log());

    let config = write_config(
        dir.path(),
        broker.port,
        "127.0.0.1:9",
        "uplink",
        "username = \"edgegate\"\npassword = \"hunter2-wrong\"\n",
    );
    let mut gw = Gateway::start(&config);
    gw.wait_for(
        "not authorized (check username, password",
        Duration::from_secs(10),
    );
    // It keeps retrying (mosquitto sees several attempts) but logs the state change once.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while broker.log().matches("not authorised").count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no retries:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(gw.is_running());
    assert_eq!(gw.count("not authorized"), 1, "{}", gw.log());
    assert!(
        !gw.log().contains("hunter2"),
        "password leaked into the log"
    );
    assert_eq!(gw.terminate(), Some(0));
}

#[test]
fn unreachable_mqtt_broker_is_logged_and_retried_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut gw = run_gateway(dir.path(), port, "");
    gw.wait_for("mqtt disconnected", Duration::from_secs(10));
    assert!(gw.log().contains("Connection refused"), "{}", gw.log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        gw.count("mqtt disconnected"),
        1,
        "one line per state change:\n{}",
        gw.log()
    );
    let _broker = Mosquitto::start_on(port, "allow_anonymous true\n");
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    assert_eq!(gw.terminate(), Some(0));
}
