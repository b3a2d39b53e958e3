//! Kafka security end to end: mosquitto → edgegate → TLS → Tansu requiring SASL/SCRAM.
//!
//! Tansu 0.6 authenticates with SCRAM-SHA-256 and SCRAM-SHA-512 (no PLAIN: its SASL library is
//! built without it) and serves no TLS of its own, so TLS is a listener in front of it
//! (`support::tls`); librdkafka's side of both is the gateway's real configuration. Tansu answers a
//! wrong SCRAM password with the protocol's `e=invalid-proof` in a response without an error
//! code (and treats the connection as authenticated); librdkafka refuses to go on, reporting
//! the authentication error a Kafka broker's SaslAuthenticationFailed also gives.

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::{Certificates, TlsProxy};
use support::*;

const TOPIC: &str = "uplink";
const PASSWORD_VAR: &str = "EDGEGATE_KAFKA_PASSWORD";

/// A Tansu broker requiring SCRAM, reached only through TLS with a certificate of `certs.ca`.
struct SecureKafka {
    certs: Certificates,
    tls: TlsProxy,
    _tansu: Tansu,
}

impl SecureKafka {
    fn start(users: &[ScramUser<'_>], topics: &[&str]) -> SecureKafka {
        let certs = Certificates::generate();
        let tls_port = free_port();
        let topics: Vec<(&str, u32)> = topics.iter().map(|t| (*t, 2)).collect();
        let tansu = Tansu::start_authenticating(tls_port, users, &topics);
        let tls = TlsProxy::start_on(tls_port, &certs, tansu.port);
        SecureKafka {
            certs,
            tls,
            _tansu: tansu,
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.tls.port)
    }

    /// A client's settings: SASL_SSL with `mechanism`, trusting the broker's CA.
    fn client(&self, mechanism: &str, user: &str, password: &str) -> Vec<(String, String)> {
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", mechanism),
            ("sasl.username", user),
            ("sasl.password", password),
            ("ssl.ca.location", &self.certs.ca.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// The `[admin]` and Kafka security tables of a gateway configuration; the password comes from
/// `EDGEGATE_KAFKA_PASSWORD` (`properties_env`), as the README tells operators to do.
fn secured(admin: u16, protocol: &str, mechanism: Option<(&str, &str)>, ca: &Path) -> String {
    let mut extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[kafka.properties]\n\
         \"security.protocol\" = \"{protocol}\"\n\"ssl.ca.location\" = \"{}\"\n",
        ca.display()
    );
    if let Some((mechanism, user)) = mechanism {
        extra.push_str(&format!(
            "\"sasl.mechanisms\" = \"{mechanism}\"\n\"sasl.username\" = \"{user}\"\n\n\
             [kafka.properties_env]\n\"sasl.password\" = \"{PASSWORD_VAR}\"\n"
        ));
    }
    extra
}

fn sensor_topics() -> Vec<String> {
    (0..2).map(|i| format!("sensors/dev{i}")).collect()
}

/// Publishes `per_topic` messages to each sensor topic and waits for every PUBACK (sent by the
/// gateway once the record is durable).
async fn publish_all(mqtt: &Mosquitto, client_id: &str, per_topic: u64) {
    let topics = sensor_topics();
    let publisher = Publisher::connect(mqtt.port, client_id).await;
    for n in 0..per_topic {
        for t in &topics {
            publisher.publish(t, payload(t, n, 100)).await;
        }
    }
    publisher
        .wait_acked(per_topic * topics.len() as u64, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_and_512_over_tls_deliver_every_record() {
    // One user per mechanism, each with credentials for that mechanism only: a gateway that
    // did not use the configured mechanism would not get in.
    let users = [
        ScramUser {
            name: "gw256",
            password: "secret-256",
            mechanism: "scram256",
        },
        ScramUser {
            name: "gw512",
            password: "secret-512",
            mechanism: "scram512",
        },
    ];
    let kafka = SecureKafka::start(&users, &["uplink-256", "uplink-512"]);
    let mqtt = Mosquitto::start();
    let per_topic = 25;
    for (mechanism, user) in [("SCRAM-SHA-256", &users[0]), ("SCRAM-SHA-512", &users[1])] {
        let topic = format!("uplink-{}", &user.name[2..]);
        let dir = tempfile::tempdir().unwrap();
        let extra = secured(
            free_port(),
            "SASL_SSL",
            Some((mechanism, user.name)),
            &kafka.certs.ca,
        );
        let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), &topic, &extra);
        let mut gw = Gateway::start_with_env(&config, &[(PASSWORD_VAR, user.password)]);
        gw.wait_for("mqtt subscribed", Duration::from_secs(10));
        publish_all(&mqtt, &format!("pub-{}", user.name), per_topic).await;

        let client = kafka.client(mechanism, user.name, user.password);
        let expected = per_topic as usize * 2;
        let msgs = consume_distinct_with(
            &kafka.bootstrap(),
            &client,
            &topic,
            expected,
            Duration::from_secs(60),
        );
        assert_eq!(
            msgs.len(),
            expected,
            "{mechanism}: gateway log:\n{}",
            gw.log()
        );
        assert_complete_in_order(&msgs, &sensor_topics(), per_topic, false);
        assert_eq!(gw.count("kafka authentication failed"), 0, "{}", gw.log());
        assert_eq!(gw.terminate(), Some(0));
        // Each gateway's own subscription: stop it before the next one subscribes.
        drop(gw);
    }
    assert!(kafka.tls.handshakes() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_once_and_the_records_wait_for_the_fix() {
    let user = ScramUser {
        name: "edgegate",
        password: "right-password",
        mechanism: "scram512",
    };
    let kafka = SecureKafka::start(std::slice::from_ref(&user), &[TOPIC, "cmds"]);
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // The downlink's consumer is refused too, and says so once of its own.
    let extra = format!(
        "{}\n[downlink]\ntopics = [\"cmds\"]\n[[downlink.routes]]\nsource = \"plant\"\n\
         topic = \"devices/${{kafkaKey}}/rpc\"\n",
        secured(
            admin,
            "SASL_SSL",
            Some(("SCRAM-SHA-512", user.name)),
            &kafka.certs.ca,
        )
    );
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), TOPIC, &extra);
    let mut gw = Gateway::start_with_env(&config, &[(PASSWORD_VAR, "wrong-password")]);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));

    // Refused by Kafka, the gateway still takes every message: PUBACK after the fsync.
    let per_topic = 20;
    let total = per_topic * 2;
    publish_all(&mqtt, "pub-wrong", per_topic).await;
    let line = "kafka authentication failed";
    gw.wait_for(line, Duration::from_secs(30));
    wait_metric(
        admin,
        "edgegate_kafka_link_refused{reason=\"authentication\"}",
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    // librdkafka retries with backoff; after several more refused attempts of both clients the
    // cause is still logged once each.
    let attempts = kafka.tls.accepted();
    kafka
        .tls
        .wait_accepted(attempts + 10, Duration::from_secs(60));
    // The forwarder's line and the downlink consumer's, and nothing per retry.
    assert_eq!(gw.count(line), 2, "{}", gw.log());
    assert_eq!(gw.count("client=\"downlink consumer\""), 1, "{}", gw.log());
    assert_eq!(gw.count("cannot fetch"), 0, "{}", gw.log());
    assert_eq!(gw.count("librdkafka"), 0, "{}", gw.log());
    let logged = gw.log();
    let logged = logged.lines().find(|l| l.contains(line)).unwrap();
    assert!(logged.contains("ERROR"), "{logged}");
    assert!(logged.contains("sasl.password"), "{logged}");
    assert!(logged.contains("invalid-proof"), "{logged}");
    assert!(gw.is_running());
    assert_eq!(metric(admin, "edgegate_kafka_link_up"), 0.0);
    // The gauge follows the buffer every 2 s.
    wait_metric(
        admin,
        "edgegate_buffer_records",
        |v| v == total as f64,
        Duration::from_secs(10),
    );
    assert_eq!(metric(admin, "edgegate_records_out"), 0.0);
    let client = kafka.client("SCRAM-SHA-512", user.name, user.password);
    assert_eq!(topic_records(&kafka.bootstrap(), &client, TOPIC), 0);

    // The password fixed, a plain restart sends every buffered record.
    assert_eq!(gw.terminate(), Some(0));
    drop(gw);
    let gw = Gateway::start_with_env(&config, &[(PASSWORD_VAR, user.password)]);
    let msgs = consume_distinct_with(
        &kafka.bootstrap(),
        &client,
        TOPIC,
        total as usize,
        Duration::from_secs(60),
    );
    assert_eq!(msgs.len(), total as usize, "gateway log:\n{}", gw.log());
    assert_complete_in_order(&msgs, &sensor_topics(), per_topic, false);
    wait_metric(
        admin,
        "edgegate_buffer_records",
        |v| v == 0.0,
        Duration::from_secs(10),
    );
    assert_eq!(gw.count(line), 0, "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_is_refused_and_named() {
    let certs = Certificates::generate();
    let tls_port = free_port();
    let tansu = Tansu::start_advertising(free_port(), tls_port);
    tansu.create_topic(TOPIC, 2);
    let tls = TlsProxy::start_on(tls_port, &certs, tansu.port);
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // Trusting a CA that did not sign the broker's certificate.
    let extra = secured(admin, "SSL", None, &certs.other_ca);
    let config = write_config(
        dir.path(),
        mqtt.port,
        &format!("127.0.0.1:{tls_port}"),
        TOPIC,
        &extra,
    );
    let mut gw = Gateway::start(&config);
    gw.wait_for("mqtt subscribed", Duration::from_secs(10));
    let per_topic = 10;
    publish_all(&mqtt, "pub-untrusted", per_topic).await;

    let line = "kafka TLS handshake failed";
    gw.wait_for(line, Duration::from_secs(30));
    let attempts = tls.accepted();
    tls.wait_accepted(attempts + 5, Duration::from_secs(60));
    assert_eq!(gw.count(line), 1, "{}", gw.log());
    let logged = gw.log();
    let logged = logged.lines().find(|l| l.contains(line)).unwrap();
    assert!(logged.contains("ERROR"), "{logged}");
    assert!(logged.contains("not trusted"), "{logged}");
    assert!(logged.contains("ssl.ca.location"), "{logged}");
    assert!(logged.contains("certificate verify failed"), "{logged}");
    assert_eq!(tls.handshakes(), 0, "no handshake may succeed");
    assert_eq!(
        metric(admin, "edgegate_kafka_link_refused{reason=\"tls\"}"),
        1.0
    );
    wait_metric(
        admin,
        "edgegate_buffer_records",
        |v| v == 20.0,
        Duration::from_secs(10),
    );
    assert_eq!(metric(admin, "edgegate_records_out"), 0.0);
    let trusting = vec![
        ("security.protocol".to_owned(), "SSL".to_owned()),
        ("ssl.ca.location".to_owned(), certs.ca.display().to_string()),
    ];
    let bootstrap = format!("127.0.0.1:{tls_port}");
    assert_eq!(topic_records(&bootstrap, &trusting, TOPIC), 0);

    // Trusting the right CA, the restarted gateway sends them all.
    assert_eq!(gw.terminate(), Some(0));
    drop(gw);
    let text = std::fs::read_to_string(&config).unwrap();
    let fixed = text.replace(
        &certs.other_ca.display().to_string(),
        &certs.ca.display().to_string(),
    );
    std::fs::write(&config, fixed).unwrap();
    let gw = Gateway::start(&config);
    let msgs = consume_distinct_with(&bootstrap, &trusting, TOPIC, 20, Duration::from_secs(60));
    assert_eq!(msgs.len(), 20, "gateway log:\n{}", gw.log());
    assert_complete_in_order(&msgs, &sensor_topics(), per_topic, false);
}

/// Tansu 0.6 offers no PLAIN (Confluent Cloud's mechanism) and drops the connection at the
/// handshake; librdkafka reports a failed mechanism handshake, which the gateway reports like
/// refused credentials, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mechanism_the_broker_does_not_offer_is_an_authentication_failure() {
    let user = ScramUser {
        name: "edgegate",
        password: "secret",
        mechanism: "scram512",
    };
    let kafka = SecureKafka::start(std::slice::from_ref(&user), &[TOPIC]);
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let extra = secured(
        admin,
        "SASL_SSL",
        Some(("PLAIN", user.name)),
        &kafka.certs.ca,
    );
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), TOPIC, &extra);
    let gw = Gateway::start_with_env(&config, &[(PASSWORD_VAR, user.password)]);
    let line = "kafka authentication failed";
    gw.wait_for(line, Duration::from_secs(30));
    let attempts = kafka.tls.accepted();
    kafka
        .tls
        .wait_accepted(attempts + 5, Duration::from_secs(60));
    assert_eq!(gw.count(line), 1, "{}", gw.log());
    assert!(gw.log().contains("PLAIN"), "{}", gw.log());
}
