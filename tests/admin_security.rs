//! The admin endpoint's security: bearer and basic authentication (401 with a challenge without
//! the right credentials, the probes open), HTTPS with a generated certificate, the command
//! line's credentials and certificate trust, and `check`'s warnings.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use support::tls::Certificates;
use support::*;

const TOKEN: &str = "t0ken-for-the-test";
const PASSWORD: &str = "pa:ss word";

/// One plain HTTP request; (status, headers and body). Status 0 when no HTTP came back.
fn request(port: u16, method: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn basic(user: &str, password: &str) -> String {
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {pair}")
}

/// A gateway with `admin` appended to its configuration; Kafka is unreachable (the endpoint
/// does not need it) and so is its MQTT broker.
fn gateway(dir: &Path, admin: &str, env: &[(&str, &str)]) -> (Gateway, PathBuf) {
    let config = write_config(dir, free_port(), "127.0.0.1:9", "uplink", admin);
    let gw = Gateway::start_with_env(&config, env);
    gw.wait_for("edgegate ready", Duration::from_secs(20));
    (gw, config)
}

/// `edgegate <args> --config <config>` with extra environment: (exit status, stdout, stderr).
fn cli(args: &[&str], config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = edgegate()
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn bearer_auth_guards_everything_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n[admin.auth]\ntype = \"bearer\"\ntoken_env = \"EG_ADMIN_TOKEN\"\n"
    );
    let env = [("EG_ADMIN_TOKEN", TOKEN)];
    let (_gw, config) = gateway(dir.path(), &admin, &env);
    let right = format!("Bearer {TOKEN}");
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/status/history"),
        ("GET", "/status/debug"),
        ("GET", "/"),
        ("GET", "/metrics"),
        ("POST", "/-/reload"),
    ] {
        for wrong in [
            None,
            Some("Bearer nope"),
            Some(&format!("Bearer {TOKEN}x")[..]),
        ] {
            let (status, text) = request(port, method, path, wrong);
            assert_eq!(status, 401, "{method} {path} with {wrong:?}: {text}");
            assert!(
                text.to_lowercase()
                    .contains("www-authenticate: bearer realm=\"edgegate\""),
                "{text}"
            );
        }
        if method == "GET" {
            assert_eq!(request(port, method, path, Some(&right)).0, 200, "{path}");
        }
    }
    // Probes carry no credentials.
    assert_eq!(request(port, "GET", "/healthz", None).0, 200);
    assert_eq!(request(port, "GET", "/readyz", None).0, 200);

    // The command line reads the same variable; another secret is refused, a missing one named.
    let (code, out, err) = cli(&["status", "--json"], &config, &env);
    assert!(code == 0 || code == 1, "{code}: {err}");
    assert!(out.contains("\"gw-test\""), "{out}");
    let (code, _, err) = cli(&["status"], &config, &[("EG_ADMIN_TOKEN", "wrong")]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    let out = edgegate()
        .args(["status", "--config"])
        .arg(&config)
        .env_remove("EG_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("admin.auth.token_env") && err.contains("EG_ADMIN_TOKEN is not set"),
        "{err}"
    );
    // `reload` goes through the same client.
    let (code, out, err) = cli(&["reload"], &config, &env);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cli(&["reload"], &config, &[("EG_ADMIN_TOKEN", "wrong")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
}

#[test]
fn basic_auth_is_what_a_browser_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n[admin.auth]\ntype = \"basic\"\nusername = \"tech\"\npassword_env = \"EG_ADMIN_PASSWORD\"\n"
    );
    let env = [("EG_ADMIN_PASSWORD", PASSWORD)];
    let (_gw, config) = gateway(dir.path(), &admin, &env);
    let (status, text) = request(port, "GET", "/", None);
    assert_eq!(status, 401, "{text}");
    assert!(
        text.to_lowercase()
            .contains("www-authenticate: basic realm=\"edgegate\""),
        "{text}"
    );
    for wrong in [
        basic("tech", "pa:ss wor"),
        basic("root", PASSWORD),
        basic("tech", ""),
        format!("Bearer {PASSWORD}"),
        "Basic not-base64!".to_owned(),
    ] {
        assert_eq!(
            request(port, "GET", "/status", Some(&wrong)).0,
            401,
            "{wrong}"
        );
    }
    let (status, page) = request(port, "GET", "/", Some(&basic("tech", PASSWORD)));
    assert_eq!(status, 200);
    assert!(page.contains("<title>edgegate status</title>"));
    assert_eq!(
        request(port, "GET", "/status", Some(&basic("tech", PASSWORD))).0,
        200
    );
    let (code, out, err) = cli(&["status"], &config, &env);
    assert!(code == 0 || code == 1, "{code}: {err}");
    assert!(out.contains("edgegate gw-test"), "{out}");
}

#[test]
fn tls_serves_https_and_the_command_line_trusts_only_the_right_certificate() {
    let certs = Certificates::generate();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tls = |ca: Option<&Path>| {
        let ca = ca
            .map(|c| format!("ca_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n[admin.auth]\ntype = \"bearer\"\ntoken_env = \"EG_ADMIN_TOKEN\"\n\
             [admin.tls]\ncert = \"{}\"\nkey = \"{}\"\n{ca}",
            certs.server_cert_file.display(),
            certs.server_key_file.display()
        )
    };
    let env = [("EG_ADMIN_TOKEN", TOKEN)];
    let (_gw, config) = gateway(dir.path(), &tls(None), &env);
    // Plain HTTP gets no HTTP answer.
    let (status, _) = request(port, "GET", "/healthz", None);
    assert_eq!(status, 0);
    // Trusting exactly the configured certificate (no ca_file).
    let (code, out, err) = cli(&["status", "--json"], &config, &env);
    assert!(code == 0 || code == 1, "{code}: {err}");
    assert!(out.contains("\"gw-test\""), "{out}");
    // Trusting the CA that signed it, for the address it names (127.0.0.1).
    let other = dir.path().join("cli.toml");
    let with_ca = |ca: &Path| {
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replace(&tls(None), &tls(Some(ca)));
        std::fs::write(&other, text).unwrap();
        other.clone()
    };
    let (code, _, err) = cli(&["status"], &with_ca(&certs.ca), &env);
    assert!(code == 0 || code == 1, "{code}: {err}");
    // A CA that signed nothing of it: no answer trusted.
    let (code, _, err) = cli(&["status"], &with_ca(&certs.other_ca), &env);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("TLS with the admin endpoint"), "{err}");
    // Over TLS the credentials are still required.
    let (code, _, err) = cli(&["status"], &config, &[("EG_ADMIN_TOKEN", "wrong")]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
}

#[test]
fn check_warns_about_an_endpoint_open_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let check = |admin: &str, env: &[(&str, &str)]| {
        let config = write_config(dir.path(), 1883, "127.0.0.1:9", "uplink", admin);
        let (code, out, err) = cli(&["check"], &config, env);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(": ok"), "{out}");
        err
    };
    let open = check("[admin]\nlisten = \"0.0.0.0:9898\"\n", &[]);
    assert!(
        open.contains("warning") && open.contains("without authentication"),
        "{open}"
    );
    let auth = "[admin.auth]\ntype = \"bearer\"\ntoken_env = \"EG_ADMIN_TOKEN\"\n";
    let env = [("EG_ADMIN_TOKEN", TOKEN)];
    let clear = check(&format!("[admin]\nlisten = \"0.0.0.0:9898\"\n{auth}"), &env);
    assert!(
        clear.contains("warning") && clear.contains("clear text"),
        "{clear}"
    );
    assert!(!clear.contains("without authentication"), "{clear}");
    let local = check("[admin]\nlisten = \"127.0.0.1:9898\"\n", &[]);
    assert!(!local.contains("warning"), "{local}");
    // A missing secret is an invalid configuration, named by key.
    let config = write_config(
        dir.path(),
        1883,
        "127.0.0.1:9",
        "uplink",
        &format!("[admin]\nlisten = \"127.0.0.1:9898\"\n{auth}"),
    );
    let (code, _, err) = cli(&["check"], &config, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("admin.auth.token_env"), "{err}");
}
