use super::*;
use crate::config::Config;

fn healthy() -> Status {
    Status {
        gateway: GatewayStatus {
            id: "gw".into(),
            version: "0".into(),
            started: rfc3339(0),
            uptime_seconds: 1,
            ready: true,
        },
        health: Health {
            status: HealthLevel::Ok,
            reasons: vec![],
        },
        link: LinkStatus {
            state: "up".into(),
            reason: None,
            since: rfc3339(0),
            for_seconds: 1,
        },
        backlog: Backlog {
            records: 0,
            bytes: 0,
            oldest_capture: None,
            oldest_age_seconds: None,
            drain_seconds: Some(0.0),
            max_age_seconds: None,
        },
        rates: RatesStatus {
            ingest: None,
            delivery: None,
        },
        totals: TotalsStatus {
            ingested: 0,
            delivered: 0,
            dropped: 0,
        },
        sources: [(
            "plant".to_owned(),
            SourceStatus {
                kind: "mqtt".into(),
                connected: true,
                ingest_rate: None,
                records_total: 0,
                restarts: 0,
            },
        )]
        .into(),
        converters: BTreeMap::new(),
        downlink: None,
        disk: Disk {
            buffer_bytes: 0,
            buffer_max_bytes: 1000,
            free_bytes: Some(1 << 30),
            min_free_bytes: 1 << 20,
        },
        memory: Memory {
            rss_bytes: Some(10),
            budget_bytes: 100,
        },
        dropped: BTreeMap::new(),
    }
}

#[test]
fn health_is_the_worst_problem_and_names_every_one() {
    let ok = judge(&healthy(), Troubles::default(), None);
    assert_eq!((ok.status, ok.reasons.len()), (HealthLevel::Ok, 0));

    let mut down = healthy();
    down.link.state = "down".into();
    down.sources.get_mut("plant").unwrap().connected = false;
    let h = judge(&down, Troubles::default(), None);
    assert_eq!(h.status, HealthLevel::Warning);
    assert_eq!(h.reasons.len(), 2, "{:?}", h.reasons);

    let mut full = down.clone();
    full.disk.buffer_bytes = 950;
    let recent = Troubles {
        converter_errors: 3,
        ..Troubles::default()
    };
    let h = judge(&full, recent, None);
    assert_eq!(h.status, HealthLevel::Critical);
    assert!(
        h.reasons[0].contains("95% of buffer.max_bytes"),
        "{:?}",
        h.reasons
    );
    assert!(h
        .reasons
        .iter()
        .any(|r| r.contains("converter errors in the last 15 minutes: 3")));

    let mut refused = healthy();
    refused.link.state = "refused".into();
    assert_eq!(
        judge(&refused, Troubles::default(), None).status,
        HealthLevel::Critical
    );
    let stalled = judge(&healthy(), Troubles::default(), Some("stalled".into()));
    assert_eq!(stalled.status, HealthLevel::Critical);
}

#[test]
fn memory_and_disk_bounds_are_judged() {
    let mut s = healthy();
    s.memory.rss_bytes = Some(85);
    assert_eq!(
        judge(&s, Troubles::default(), None).status,
        HealthLevel::Warning
    );
    s.memory.rss_bytes = Some(101);
    assert_eq!(
        judge(&s, Troubles::default(), None).status,
        HealthLevel::Critical
    );
    let mut s = healthy();
    s.disk.free_bytes = Some(1);
    assert_eq!(
        judge(&s, Troubles::default(), None).status,
        HealthLevel::Critical
    );
}

#[test]
fn times_round_trip_and_exit_codes_follow_health() {
    let ms = 1_780_000_000_000;
    assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
    let codes: Vec<u8> = [HealthLevel::Ok, HealthLevel::Warning, HealthLevel::Critical]
        .into_iter()
        .map(HealthLevel::exit_code)
        .collect();
    assert_eq!(codes, [0, 1, 2]);
    assert!(drop_reasons().any(|r| r == "buffer_full"));
}

const CONFIG: &str = r#"
[gateway]
id = "gw"
data_dir = "/nonexistent/edgegate-status-test"
[kafka]
bootstrap_servers = "127.0.0.1:9"
topic = "t"
[sources.plant]
type = "mqtt"
topics = ["sensors/#"]
[sources.rs485]
type = "serial"
path = "/dev/null"
[downlink]
topics = ["cmds"]
[[downlink.routes]]
match = { transport = "mqtt" }
source = "plant"
topic = "devices/${deviceName}/rpc"
[[downlink.routes]]
source = "rs485"
[converters.dec]
script = "dec.js"
"#;

#[test]
fn counters_are_read_per_configured_source_converter_and_route_without_creating_series() {
    let config = Config::parse(CONFIG, Path::new("t.toml")).unwrap();
    let metrics = Metrics::new();
    metrics.source_in("plant").inc_by(7);
    metrics.source_in("removed").inc_by(100);
    metrics.converter_failed("dec", "exception", "TypeError: x".into());
    metrics.converter_failed("dec", "timeout", "timed out".into());
    let dl = &metrics.downlink;
    crate::metrics::DownlinkMetrics::route(&dl.received, "0:plant").inc_by(3);
    crate::metrics::DownlinkMetrics::route(&dl.received, "none").inc();
    crate::metrics::DownlinkMetrics::route(&dl.delivered, "1:rs485").inc_by(2);
    crate::metrics::DownlinkMetrics::route(&dl.dead_lettered, "none").inc();
    dl.lag.set(5);
    let before = metrics.encode();

    let now = totals(&metrics, &config);
    assert_eq!(now.per_source["plant"], 7);
    assert_eq!(now.per_source["rs485"], 0);
    assert!(
        !now.per_source.contains_key("removed"),
        "only configured sources"
    );
    assert_eq!(now.troubles.converter_errors, 2);
    assert_eq!(now.troubles.dead_lettered, 1);
    let d = downlink(&metrics, &config).unwrap();
    assert_eq!(
        (d.lag, d.received, d.delivered, d.dead_lettered),
        (5, 4, 2, 1)
    );
    let c = &converters(&metrics, &config)["dec"];
    assert_eq!(c.errors_total, 2);
    assert_eq!(c.errors["exception"], 1);
    let last = c.last_error.as_ref().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.message.as_str()),
        ("timeout", "timed out")
    );
    assert!(metrics.dropped_by_reason().is_empty());
    assert_eq!(metrics.encode(), before, "reading created series");
}

/// An outage is a warning until it lasts an hour; records near `buffer.max_age` are critical
/// (they are about to be dropped).
#[test]
fn a_long_outage_and_records_near_max_age_are_critical() {
    let mut down = healthy();
    down.link.state = "down".into();
    down.link.for_seconds = 600;
    assert_eq!(
        judge(&down, Troubles::default(), None).status,
        HealthLevel::Warning
    );
    down.link.for_seconds = 3600;
    assert_eq!(
        judge(&down, Troubles::default(), None).status,
        HealthLevel::Critical
    );

    let mut aging = healthy();
    aging.backlog.max_age_seconds = Some(1000.0);
    aging.backlog.oldest_age_seconds = Some(500.0);
    assert_eq!(
        judge(&aging, Troubles::default(), None).status,
        HealthLevel::Ok
    );
    aging.backlog.oldest_age_seconds = Some(850.0);
    let h = judge(&aging, Troubles::default(), None);
    assert_eq!(h.status, HealthLevel::Critical);
    assert!(
        h.reasons[0].contains("85% of buffer.max_age"),
        "{:?}",
        h.reasons
    );
}
