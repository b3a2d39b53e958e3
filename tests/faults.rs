//! The host misbehaving under the gateway: a disk whose flushes take 200 ms (an SD card), and a
//! system clock stepped by hours (a board without a real-time clock syncing NTP after boot).
//! A full disk is in `tests/durability.rs`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// A preloaded library that makes every `fsync` and `fdatasync` take `EDGEGATE_TEST_SYNC_US`
/// microseconds longer, and counts them in the file `EDGEGATE_TEST_SYNC_COUNT` (one byte each).
const SLOW_SYNC_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
static void slow(void) {
    const char *us = getenv("EDGEGATE_TEST_SYNC_US");
    usleep(us ? atol(us) : 200000);
    const char *count = getenv("EDGEGATE_TEST_SYNC_COUNT");
    if (count) {
        int fd = open(count, O_WRONLY | O_APPEND | O_CREAT, 0600);
        if (fd >= 0) { (void)!write(fd, "s", 1); close(fd); }
    }
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow();
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow();
    return real(fd);
}
"#;

fn build_slow_sync(dir: &Path) -> PathBuf {
    let src = dir.join("slow_sync.c");
    let lib = dir.join("slow_sync.so");
    std::fs::write(&src, SLOW_SYNC_C).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    lib
}

/// Every flush of the buffer takes 200 ms longer. Group commit keeps the rate up (many records
/// per flush), every message arrives, and nothing times out or trips a watchdog on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_is_met_by_group_commit_without_spurious_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_slow_sync(dir.path());
    let syncs = dir.path().join("syncs");
    let mqtt = Mosquitto::start();
    let kafka = Tansu::start();
    kafka.create_topic("uplink", 1);
    let config = write_config(dir.path(), mqtt.port, &kafka.bootstrap(), "uplink", "");
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("EDGEGATE_TEST_SYNC_US", "200000"),
        ("EDGEGATE_TEST_SYNC_COUNT", syncs.to_str().unwrap()),
    ];
    let mut gw = Gateway::start_with_env(&config, &env);
    gw.wait_for("mqtt subscribed", Duration::from_secs(30));

    let topics = ["sensors/a".to_owned(), "sensors/b".to_owned()];
    let per_topic = 1500;
    let publisher = Publisher::connect(mqtt.port, "slow-disk").await;
    for n in 0..per_topic {
        for t in &topics {
            publisher.publish(t, payload(t, n, 200)).await;
        }
    }
    let total = 2 * per_topic as usize;
    publisher
        .wait_acked(total as u64, Duration::from_secs(60))
        .await;
    let msgs = consume_distinct(
        &kafka.bootstrap(),
        "uplink",
        total,
        Duration::from_secs(120),
    );
    let tally = assert_complete_in_order(&msgs, &topics, per_topic, false);
    let log = gw.log();
    assert_eq!(gw.terminate(), Some(0), "{}", gw.log());

    let flushes = std::fs::metadata(&syncs).map(|m| m.len()).unwrap_or(0) as usize;
    assert!(flushes > 0, "the preloaded library slowed no flush");
    assert!(
        flushes * 10 < total,
        "{flushes} slow flushes for {total} messages: commits are not grouped"
    );
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
    let scenario = format!("every fsync 200 ms slower ({flushes} flushes)");
    report(&scenario, tally, None);
}

/// libfaketime, preloaded, shifts the gateway's system clock (not its monotonic clock, which an
/// NTP step does not move either) by the offset in a file it rereads every second.
struct FakeClock {
    file: PathBuf,
    lib: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        let lib = glob_one("/usr/lib", "faketime/libfaketimeMT.so.1")
            .expect("libfaketime is needed (apt-get install faketime; scripts/prerequisites)");
        let clock = FakeClock {
            file: dir.join("faketime"),
            lib,
        };
        clock.set("+0");
        clock
    }

    fn set(&self, offset: &str) {
        std::fs::write(&self.file, offset).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", self.lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

/// `<root>/<any directory>/<tail>`, for the multiarch directory.
fn glob_one(root: &str, tail: &str) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path().join(tail))
        .find(|p| p.exists())
}

/// The clock jumps 3 hours forward with records buffered and `max_age = "20s"`: they are not
/// dropped at the jump, nor after a restart, but 20 s after they were captured, by the time that
/// really passed; the age gauge does not jump either. A step back does not drop anything. Capture times are the
/// clock's when each record arrived: a step does not rewrite them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_neither_expire_records_early_nor_rewrite_capture_times() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(dir.path());
    let mqtt = Mosquitto::start();
    let admin = free_port();
    let extra = format!("[buffer]\nmax_age = \"20s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let config = write_config(dir.path(), mqtt.port, "127.0.0.1:9", "t", &extra);
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut gw = Gateway::start_with_env(&config, &env);
    gw.wait_for("mqtt subscribed", Duration::from_secs(30));
    let publisher = Publisher::connect(mqtt.port, "clock").await;
    let captured = Instant::now();
    for n in 1..=50 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 100))
            .await;
    }
    let stored = |v: f64| v >= 50.0;
    wait_metric(
        admin,
        "edgegate_buffer_records",
        stored,
        Duration::from_secs(30),
    );

    clock.set("+10800");
    gw.wait_for("system clock stepped forward", Duration::from_secs(30));
    let max_age = "edgegate_records_dropped_total{reason=\"max_age\"}";
    next_housekeeping(admin);
    assert_eq!(metric(admin, max_age), 0.0, "dropped at the jump");
    let age = metric(admin, "edgegate_buffer_oldest_age_seconds");
    assert!(age < 60.0, "oldest record {age} s old after the jump");
    // A restart does not forget the step (the clock stays 3 h ahead; nothing steps again).
    assert_eq!(gw.terminate(), Some(0), "{}", gw.log());
    gw.restart();
    gw.wait_for_count("edgegate ready", 2, Duration::from_secs(30));
    next_housekeeping(admin);
    assert_eq!(metric(admin, max_age), 0.0, "dropped after the restart");
    assert_eq!(metric(admin, "edgegate_buffer_records"), 50.0);

    wait_metric(admin, max_age, |v| v >= 50.0, Duration::from_secs(60));
    let expired_after = captured.elapsed();
    assert!(
        expired_after >= Duration::from_secs(19),
        "expired {expired_after:?} after capture, max_age is 20s"
    );

    // Records captured on the new clock, then a step back: nothing is dropped early.
    for n in 51..=60 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 100))
            .await;
    }
    let stored = |v: f64| v >= 10.0;
    wait_metric(
        admin,
        "edgegate_buffer_records",
        stored,
        Duration::from_secs(30),
    );
    clock.set("+0");
    gw.wait_for("system clock stepped back", Duration::from_secs(30));
    // A pass after the step: what was captured in the clock's future has no age now.
    let no_age = |v: f64| v == 0.0;
    wait_metric(
        admin,
        "edgegate_buffer_oldest_age_seconds",
        no_age,
        Duration::from_secs(10),
    );
    assert_eq!(metric(admin, max_age), 50.0);
    assert_eq!(gw.terminate(), Some(0), "{}", gw.log());

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for captured_ms in captured_times(&config) {
        let ahead = captured_ms.saturating_sub(now_ms);
        assert!(
            (10_700_000..10_900_000).contains(&ahead),
            "captured at {captured_ms}, {ahead} ms ahead of the real clock, not 3 h"
        );
    }
}

/// Returns once the buffer's housekeeping ran again (its age gauge moved).
fn next_housekeeping(admin: u16) {
    let age = metric(admin, "edgegate_buffer_oldest_age_seconds");
    wait_metric(
        admin,
        "edgegate_buffer_oldest_age_seconds",
        |v| v != age,
        Duration::from_secs(10),
    );
}

fn captured_times(config: &Path) -> Vec<u64> {
    let times: Vec<u64> = buffer_export(config)
        .iter()
        .map(|v| v["captured_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(times.len(), 10, "the records captured after the jump");
    times
}
