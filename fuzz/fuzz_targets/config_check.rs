#![no_main]

//! `edgegate check` from configuration text: `Config::parse` (TOML, every key, validation), then
//! `gateway::validate` (librdkafka's own check of the properties, compiling every converter
//! script, the data directory) on what parsed. Neither may panic; a refusal must name a key.
//!
//! What `validate` touches outside the process is confined, so that fuzzed text cannot make it
//! read or run anything: converter scripts resolve to copies of the shipped ones in a temporary
//! directory (any other name there does not exist), the brokers are a closed local port, and only
//! harmless librdkafka properties are passed on (others, such as `plugin.library.paths` or
//! `sasl.kerberos.kinit.cmd`, load libraries or run commands).

use std::path::PathBuf;
use std::sync::OnceLock;

use edgegate::config::{Config, ConfigError};

const DECODER: &str = include_str!("../../config/decoders/thingsboard.js");
const ENCODER: &str = include_str!("../../config/encoders/commands.js");

/// librdkafka properties passed on; any other name with a dot is dropped.
const SAFE_PROPERTIES: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.max.bytes",
    "compression.type",
    "compression.codec",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "client.id",
    "retries",
    "message.timeout.ms",
    "request.timeout.ms",
    "socket.timeout.ms",
];

struct Env {
    dir: tempfile::TempDir,
    path: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("edgegate-fuzz-config")
            .tempdir()
            .expect("a temporary directory");
        std::fs::write(dir.path().join("thingsboard.js"), DECODER).expect("decoder written");
        std::fs::write(dir.path().join("commands.js"), ENCODER).expect("encoder written");
        let path = dir.path().join("edgegate.toml");
        Env { dir, path }
    })
}

/// Names without a dot are not librdkafka's (it refuses them: the path worth fuzzing).
fn safe_property(key: &str) -> bool {
    SAFE_PROPERTIES.contains(&key) || !key.contains('.')
}

fn confine(config: &mut Config, env: &Env) {
    for converter in config.converters.values_mut() {
        let name = converter
            .script
            .file_name()
            .map_or_else(|| "missing.js".into(), |n| n.to_os_string());
        converter.script = env.dir.path().join(name);
    }
    config.kafka.bootstrap_servers = "127.0.0.1:1".into();
    config.kafka.properties.retain(|k, _| safe_property(k));
    config.kafka.properties_env.retain(|k, _| safe_property(k));
}

fn check_refusal(e: &ConfigError) {
    match e {
        ConfigError::Invalid { key, message, .. } => {
            assert!(!key.trim().is_empty(), "a refusal names no key: {message}");
        }
        ConfigError::Read { .. } => panic!("nothing was to be read: {e}"),
    }
    let _ = e.to_string();
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = env();
    let mut config = match Config::parse(text, &env.path) {
        Ok(config) => config,
        Err(e) => return check_refusal(&e),
    };
    let _ = config.memory_bounds();
    confine(&mut config, env);
    if let Err(e) = edgegate::gateway::validate(&config, &env.path) {
        check_refusal(&e);
    }
});
