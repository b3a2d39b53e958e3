use super::*;

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
