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
fn a_missing_kafka_ca_file_is_named_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let config = write(
        dir.path(),
        &format!(
            "{GOOD}\n[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\
             \"ssl.ca.location\" = \"{}\"\n",
            missing.display()
        ),
    );
    assert_rejected(&config, &["kafka.properties.ssl.ca.location"]);
}

#[test]
fn an_unparsable_log_level_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!("{GOOD}\n[log]\nlevel = \"edgegate=verbose\"\n"),
    );
    assert_rejected(&config, &["log.level", "target=level"]);
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
    // The variable is missing: a config error (exit 2), not a silent empty password.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(code) = gw.exit_code() {
            break code;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, 2, "{}", gw.log());
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

fn with_converter(dir: &Path, script: &str, source_converter: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("decoder.js"), script).unwrap();
    write(
        dir,
        &format!(
            "{GOOD}converter = \"{source_converter}\"\n\n[converters.tb]\nscript = \"decoder.js\"\nmetadata = {{ site = \"north\" }}\n"
        ),
    )
}

#[test]
fn check_reports_a_script_syntax_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_converter(dir.path(), "var a = 1;\n\nvar b = ;\nreturn a;\n", "tb");
    let script = dir.path().join("decoder.js").display().to_string();
    assert_rejected(
        &config,
        &["converters.tb", &format!("{script}:3:"), "SyntaxError"],
    );
}

#[test]
fn a_source_naming_a_missing_converter_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_converter(dir.path(), "return null;", "nope");
    assert_rejected(&config, &["sources.plant.converter", "converters.nope"]);
    let config = write(
        dir.path(),
        &format!("{GOOD}\n[converters.tb]\nscript = \"missing.js\"\n"),
    );
    assert_rejected(&config, &["converters.tb", "missing.js", "cannot read"]);
}

fn convert(args: &[&str], stdin: &[u8]) -> (Option<i32>, serde_json::Value, String) {
    use std::io::Write;
    let mut child = edgegate()
        .arg("convert")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn convert_runs_the_seed_decoder_like_thingsboards_test_function() {
    let seed = "config/decoders/thingsboard.js";
    let (code, out, err) = convert(
        &[
            "--script",
            seed,
            "--payload",
            "tests/fixtures/seed-payload.json",
        ],
        b"",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out["error"], serde_json::Value::Null);
    assert_eq!(out["output"][0]["deviceName"], "SN-111");
    assert_eq!(
        out["output"][0]["telemetry"][1]["values"]["temperature"],
        27.06
    );
    // --raw: the script's own value; the seed decoder leaves undefined fields out.
    let (code, out, _) = convert(
        &["--script", seed, "--payload", "-", "--raw"],
        br#"{"deviceName":"A","telemetry":{"t":1}}"#,
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        out["output"],
        serde_json::json!({"deviceName": "A", "telemetry": {"t": 1}})
    );
}

#[test]
fn convert_takes_base64_metadata_and_a_configured_converter() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_converter(
        dir.path(),
        "return {deviceName: metadata.site + '-' + metadata.topic, attributes: {p: payload}};",
        "tb",
    );
    let config = config.display().to_string();
    let (code, out, err) = convert(
        &[
            "--config",
            &config,
            "--converter",
            "tb",
            "--payload",
            "-",
            "--base64",
            "--metadata",
            "topic=t/1",
        ],
        b"AP8=\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out["output"][0]["deviceName"], "north-t/1");
    assert_eq!(
        out["output"][0]["attributes"]["p"],
        serde_json::json!([0, 255])
    );
}

#[test]
fn convert_exits_1_on_script_errors_and_2_on_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bad.js");
    std::fs::write(&script, "throw new RangeError('nope');").unwrap();
    let script = script.display().to_string();
    let (code, out, _) = convert(&["--script", &script, "--payload", "-"], b"x");
    assert_eq!(code, Some(1));
    assert_eq!(out["output"], serde_json::Value::Null);
    assert!(out["error"].as_str().unwrap().contains("RangeError: nope"));
    let (code, _, err) = convert(&["--script", &script, "--payload", "/nonexistent"], b"");
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = convert(&["--script", &script, "--payload", "-", "--base64"], b"%%%");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("base64"), "{err}");
    let (code, _, _) = convert(&["--payload", "-"], b"");
    assert_eq!(code, Some(2));
}

const TB_ENCODER: &str = "tests/fixtures/encoders/thingsboard.js";

fn thingsboard_encoder_args(msg: &str) -> Vec<&str> {
    vec![
        "--encoder",
        "--script",
        TB_ENCODER,
        "--msg",
        msg,
        "--metadata",
        "ss_serialNumber=SN-1",
        "--metadata",
        "deviceType=thermostat",
        "--metadata",
        "deviceName=T1",
    ]
}

#[test]
fn convert_runs_the_thingsboard_documentation_encoder_like_its_test_function() {
    // {"temperatureUploadFrequency":60,"humidityUploadFrequency":30}
    let msg = "tests/fixtures/encoders/thingsboard-msg.json";
    let (code, out, err) = convert(&thingsboard_encoder_args(msg), b"");
    assert_eq!(code, Some(0), "{err}");
    let expected = serde_json::json!({
        "contentType": "JSON",
        "data": r#"{"tempFreq":60,"humFreq":30,"devSerialNumber":"SN-1"}"#,
        "metadata": {"topic": "thermostat/T1/upload"}
    });
    assert_eq!(
        out,
        serde_json::json!({"output": [expected.clone()], "error": null})
    );
    // --raw: the script's own value, here the same object unwrapped; the msg from stdin.
    let mut args = thingsboard_encoder_args("-");
    args.push("--raw");
    let (code, raw, err) = convert(
        &args,
        br#"{"temperatureUploadFrequency":60,"humidityUploadFrequency":30}"#,
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(raw["output"], expected);
    // Node.js, where installed, runs the same body to the same result.
    let node = std::process::Command::new("node")
        .arg("-e")
        .arg(format!(
            "const Encoder = new Function('msg', 'metadata', 'msgType', 'integrationMetadata', {});\n\
             console.log(JSON.stringify(Encoder({{temperatureUploadFrequency: 60, humidityUploadFrequency: 30}},\n\
               {{ss_serialNumber: 'SN-1', deviceType: 'thermostat', deviceName: 'T1'}}, 'RPC_CALL_FROM_SERVER_TO_DEVICE', {{}})));",
            serde_json::Value::from(std::fs::read_to_string(TB_ENCODER).unwrap())
        ))
        .output();
    match node {
        Ok(node) if node.status.success() => {
            let by_node: serde_json::Value = serde_json::from_slice(&node.stdout).unwrap();
            assert_eq!(by_node, expected);
        }
        Ok(node) => panic!("node failed: {}", String::from_utf8_lossy(&node.stderr)),
        Err(e) => eprintln!("node not run ({e}); compared with the expected output only"),
    }
}

fn with_encoder(dir: &Path, script: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("encoder.js"), script).unwrap();
    write(
        dir,
        &format!(
            "{GOOD}\n[converters.commands]\ntype = \"encoder\"\nscript = \"encoder.js\"\nmetadata = {{ site = \"north\" }}\n"
        ),
    )
}

#[test]
fn convert_runs_a_configured_encoder_with_its_integration_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_encoder(
        dir.path(),
        "return [{contentType: 'TEXT', data: msgType + ' ' + msg,\n\
         metadata: {to: integrationMetadata.integrationName + '@' + integrationMetadata.gatewayId + '/' + integrationMetadata.site}},\n\
         {contentType: 'BINARY', data: 'AP8=', metadata: {n: 7}}];",
    );
    let config = config.display().to_string();
    let args = [
        "--config",
        &config,
        "--converter",
        "commands",
        "--encoder",
        "--msg",
        "-",
        "--msg-type",
        "ATTRIBUTES_UPDATED",
    ];
    let (code, out, err) = convert(&args, b"reboot");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out["output"],
        serde_json::json!([
            {"contentType": "TEXT", "data": "ATTRIBUTES_UPDATED reboot",
             "metadata": {"to": "commands@gw-01/north"}},
            {"contentType": "BINARY", "data": "AP8=", "metadata": {"n": "7"}}
        ])
    );
    // An encoder table is not a decoder, and the other way round: bad arguments.
    let (code, _, err) = convert(
        &[
            "--config",
            &config,
            "--converter",
            "commands",
            "--payload",
            "-",
        ],
        b"x",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is an encoder"), "{err}");
}

#[test]
fn convert_encoder_exits_1_naming_a_missing_key_or_the_line_that_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("enc.js");
    std::fs::write(
        &script,
        "return [{contentType: 'JSON', data: '{}'}, {data: 'x'}];",
    )
    .unwrap();
    let script = script.display().to_string();
    let args = ["--encoder", "--script", &script, "--msg", "-"];
    let (code, out, err) = convert(&args, b"{}");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(out["output"], serde_json::Value::Null);
    let error = out["error"].as_str().unwrap();
    assert!(error.contains("result[1].contentType: missing"), "{error}");

    std::fs::write(
        &script,
        "var a = 1;\nreturn {contentType: 'TEXT', data: a +};\n",
    )
    .unwrap();
    let (code, out, err) = convert(&args, b"{}");
    assert_eq!(code, Some(1), "{err}");
    let error = out["error"].as_str().unwrap();
    assert!(error.contains(&format!("{script}:2:")), "{error}");
    assert!(error.contains("SyntaxError"), "{error}");
}

#[test]
fn check_reports_an_encoder_syntax_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_encoder(dir.path(), "var a = 1;\n\nvar b = ;\nreturn null;\n");
    let script = dir.path().join("encoder.js").display().to_string();
    assert_rejected(
        &config,
        &[
            "converters.commands",
            &format!("{script}:3:"),
            "SyntaxError",
        ],
    );
}

fn serial_source(settings: &str) -> String {
    format!("{GOOD}\n[sources.rs485]\ntype = \"serial\"\n{settings}\n")
}

#[test]
fn bad_serial_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &serial_source("path = \"/dev/ttyUSB0\"\nframing = \"carrier-pigeon\""),
    );
    assert_rejected(
        &config,
        &["sources.rs485.framing", "carrier-pigeon", ":17:"],
    );
    let config = write(
        dir.path(),
        &serial_source("path = \"/dev/ttyUSB0\"\nframing = { mode = \"fixed\", size = 0 }"),
    );
    assert_rejected(&config, &["sources.rs485.framing", "size above 0"]);
    let config = write(dir.path(), &serial_source("baud_rate = 9600"));
    assert_rejected(&config, &["sources.rs485", "path"]);
    let config = write(
        dir.path(),
        &serial_source(
            "path = \"/dev/ttyUSB0\"\nframing = { mode = \"delimiter\", delimiter_hex = \"zz\" }",
        ),
    );
    assert_rejected(&config, &["sources.rs485.framing", "not hex"]);
}

/// A TLS file that exists but cannot be read (here a directory) stops the gateway at start with
/// exit 2 naming the key: `run` checks as `check` does, so it never gets as far as a source
/// failing later (which would also end it with exit 2, also while another source runs fine).
#[test]
fn an_unreadable_tls_file_stops_the_gateway_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let not_a_file = dir.path().join("ca-dir");
    std::fs::create_dir(&not_a_file).unwrap();
    let extra = format!(
        "[sources.secure]\ntype = \"mqtt\"\nport = {}\ntopics = [\"a/#\"]\n[sources.secure.tls]\nca_file = \"{}\"\n",
        broker.port,
        not_a_file.display()
    );
    let mut gw = run_gateway(dir.path(), broker.port, &extra);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(code) = gw.exit_code() {
            break code;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, 2, "{}", gw.log());
    assert!(
        gw.log().contains("sources.secure.tls.ca_file: cannot read"),
        "{}",
        gw.log()
    );
}

#[test]
fn a_downlink_that_would_consume_the_uplink_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let downlink = "[downlink]\ntopics = [\"cmds\", \"t\"]\n\
                    [[downlink.routes]]\nsource = \"plant\"\ntopic = \"d/${deviceName}\"\n";
    let config = write(dir.path(), &format!("{GOOD}{downlink}"));
    assert_rejected(
        &config,
        &["downlink.topics[1]", "allow_loop", "edgegate.toml:14:"],
    );
    let allowed = downlink.replace("[downlink]\n", "[downlink]\nallow_loop = true\n");
    let out = edgegate_with(&["check"], &write(dir.path(), &format!("{GOOD}{allowed}")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unfillable = downlink.replace("d/${deviceName}", "d/${deviceName");
    assert_rejected(
        &write(
            dir.path(),
            &format!("{GOOD}{unfillable}").replace(", \"t\"", ""),
        ),
        &["downlink.routes[0].topic", "unclosed"],
    );
}

/// Converters see dates in UTC, as ThingsBoard's servers do, unless the service's TZ says
/// otherwise (README, "ThingsBoard uplink converters").
#[test]
fn converters_run_in_utc_unless_tz_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("dates.js");
    std::fs::write(
        &script,
        "return {deviceName: 'd', attributes: {offset: new Date(2026, 0, 1).getTimezoneOffset(),\n\
           midnight: new Date(2026, 0, 1).getTime(), text: new Date(0).toString()}};",
    )
    .unwrap();
    let payload = dir.path().join("payload");
    std::fs::write(&payload, "x").unwrap();
    let run = |tz: Option<&str>| {
        let mut command = edgegate();
        command
            .args(["convert", "--raw", "--script"])
            .arg(&script)
            .arg("--payload")
            .arg(&payload);
        match tz {
            Some(tz) => command.env("TZ", tz),
            None => command.env_remove("TZ"),
        };
        let out = command.output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["output"]["attributes"].clone()
    };
    let utc = run(None);
    assert_eq!(utc["offset"], 0);
    assert_eq!(utc["midnight"], 1_767_225_600_000_u64);
    // QuickJS names the zone only when TZ names it: main() set TZ=UTC.
    assert_eq!(
        utc["text"],
        "Thu Jan 01 1970 00:00:00 GMT+0000 (Coordinated Universal Time)"
    );
    let berlin = run(Some("Europe/Berlin"));
    assert_eq!(berlin["offset"], -60);
    assert_eq!(berlin["midnight"], 1_767_222_000_000_u64);
}

/// librdkafka refuses some settings only for a consumer: `check` (and so a reload) builds the
/// downlink's consumer, rather than accepting a file the gateway cannot run.
#[test]
fn kafka_properties_the_downlink_consumer_refuses_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let downlink =
        "[downlink]\ntopics = [\"cmds\"]\n[[downlink.routes]]\nsource = \"plant\"\ntopic = \"x\"\n";
    let good = write(dir.path(), &format!("{GOOD}\n{downlink}"));
    let out = edgegate_with(&["check"], &good);
    assert!(out.status.success(), "{out:?}");
    let bad = GOOD.replace(
        "[kafka]\n",
        "[kafka]\nproperties = { \"session.timeout.ms\" = \"400000\" }\n",
    );
    assert_ne!(bad, GOOD);
    let config = write(dir.path(), &format!("{bad}\n{downlink}"));
    assert_rejected(&config, &["kafka.properties", "session.timeout.ms"]);
}

/// The source reads its TLS files at every connect: one that exists but cannot be read (here a
/// directory) fails `check`, not the running gateway.
#[test]
fn an_unreadable_mqtt_tls_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!(
            "{GOOD}\n[sources.plant.tls]\nca_file = \"{}\"\n",
            dir.path().display()
        ),
    );
    assert_rejected(&config, &["sources.plant.tls.ca_file", "cannot read"]);
}
