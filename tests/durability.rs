//! Power-cut durability, read from the system calls the gateway makes (under `strace`): a PUBACK
//! leaves edgegate only after every file that holds the record was synced after it was written:
//! the buffer's log (`fdatasync`; sled's own flush only calls `sync_file_range`, which a power cut
//! can undo) and any blob file sled would write a value over ~128 KiB to, with the `blobs`
//! directory that names it (sled never syncs either; the buffer stores records in smaller pieces
//! so that it never makes one). A `kill -9` test cannot tell.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// The system calls the check needs, in the order they completed. Files are named by what they
/// are in the buffer: `db` (the log), `blobs/<n>`, or `blobs/` (the directory).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// A write to the file finished (for `blobs/`: a file was created in it).
    Write(String),
    /// An `fsync`/`fdatasync` of the file started or finished.
    SyncStart(String),
    SyncDone(String),
    /// A PUBACK started on its way to the broker.
    Puback,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_puback_follows_a_sync_of_every_file_that_holds_its_record() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    // Kafka is unreachable: records stay in the buffer and only the append path writes.
    let extra = "max_payload_bytes = \"3MiB\"\n[buffer]\nmax_bytes = \"64MiB\"\n";
    let config = write_config(dir.path(), broker.port, "127.0.0.1:9", "t", extra);
    // A record this large must fit one Kafka record too.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "topic = \"t\"",
        "topic = \"t\"\nmax_record_bytes = \"4MiB\"",
    );
    std::fs::write(&config, text).unwrap();
    let trace = dir.path().join("strace.out");
    let (tracer, lines) = start_traced(&config, &trace);
    wait_for_line(&lines, "mqtt subscribed");
    let publisher = Publisher::connect(broker.port, "durability-device").await;
    // Below sled's blob threshold, then records of 200 KiB, 1 MiB and 2 MiB above it.
    let sizes = [1 << 10, 200 << 10, 1 << 20, 2 << 20];
    for (n, size) in (1..).zip(sizes) {
        publisher
            .publish("sensors/a", payload("sensors/a", n, size))
            .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while pubacks(&calls(&trace)) < n as usize {
            assert!(
                Instant::now() < deadline,
                "no PUBACK {n} ({size} bytes) from the gateway"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(tracer);
    let calls = calls(&trace);
    assert_eq!(pubacks(&calls), sizes.len());
    // The buffer stores values in pieces below sled's blob limit; should a blob ever be written
    // again, it is one more file that must be synced before the PUBACK.
    assert_each_puback_synced(&calls);
}

fn pubacks(calls: &[Call]) -> usize {
    calls.iter().filter(|c| **c == Call::Puback).count()
}

/// Sync state of one file: whether a sync started after its last write, and finished.
#[derive(Default)]
struct FileState {
    written_since_sync_start: bool,
    synced: bool,
}

/// Before every PUBACK: every file written so far had a sync that started after its last write
/// and has finished.
fn assert_each_puback_synced(calls: &[Call]) {
    let mut files: HashMap<&str, FileState> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        match call {
            Call::Write(f) => {
                let state = files.entry(f).or_default();
                state.written_since_sync_start = true;
                state.synced = false;
            }
            Call::SyncStart(f) => files.entry(f).or_default().written_since_sync_start = false,
            Call::SyncDone(f) => {
                let state = files.entry(f).or_default();
                state.synced = !state.written_since_sync_start;
            }
            Call::Puback => {
                let unsynced: Vec<&&str> = files
                    .iter()
                    .filter(|(_, s)| !s.synced)
                    .map(|(f, _)| f)
                    .collect();
                assert!(
                    files.contains_key("db") && unsynced.is_empty(),
                    "PUBACK (call {i}) before a sync of {unsynced:?}: {calls:?}"
                );
            }
        }
    }
}

/// strace with the gateway under it; dropping it stops both, also when an assertion failed.
struct Traced(Child);

impl Drop for Traced {
    /// SIGTERM to the gateway (strace's child); strace exits with it.
    fn drop(&mut self) {
        let tracer = &mut self.0;
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", tracer.id()))
            .unwrap_or_default();
        let gateways: Vec<i32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for pid in &gateways {
            // SAFETY: signalling our tracer's child process.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(tracer.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                for pid in &gateways {
                    // SAFETY: as above.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                let _ = tracer.kill();
                let _ = tracer.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_traced(config: &Path, trace: &Path) -> (Traced, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(program("strace"))
        .args(["-f", "-qq", "-x", "-s", "4", "-e"])
        .arg("trace=openat,close,pwrite64,fdatasync,fsync,write,writev,sendto,sendmsg")
        .arg("-o")
        .arg(trace)
        .arg(edgegate().get_program())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (apt-get install strace)");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn({
        let lines = lines.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        }
    });
    (Traced(child), lines)
}

fn wait_for_line(lines: &Mutex<Vec<String>>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?}: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where on strace's lines a call shows: whole, or split into an "unfinished" start and a
/// "resumed" end when another thread's call came in between.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Whole,
    Start,
    End,
}

/// Parses strace's output into the calls the check needs, in order.
fn calls(trace: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    let mut files: HashMap<String, String> = HashMap::new();
    let mut started: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (call, part) = if let Some(start) = rest.strip_suffix("<unfinished ...>") {
            started.insert(pid.to_owned(), start.to_owned());
            (start.to_owned(), Part::Start)
        } else if rest.starts_with("<...") {
            let start = started.remove(pid).unwrap_or_default();
            let result = rest.rsplit_once(" = ").map_or("", |(_, r)| r);
            (format!("{start} = {result}"), Part::End)
        } else {
            (rest.to_owned(), Part::Whole)
        };
        classify(&call, part, &mut files, &mut calls);
    }
    calls
}

/// What a buffer file is called in [`Call`], from the path `openat` printed.
fn buffer_file(call: &str) -> Option<String> {
    let path = call.split('"').nth(1)?;
    let (_, inside) = path.rsplit_once("/buffer/")?;
    match inside {
        "db" | "blobs" => Some(inside.replace("blobs", "blobs/")),
        blob if blob.starts_with("blobs/") => Some(blob.to_owned()),
        _ => None,
    }
}

/// Files by descriptor are tracked from `openat` to `close`, as descriptor numbers are reused.
fn classify(call: &str, part: Part, files: &mut HashMap<String, String>, calls: &mut Vec<Call>) {
    let name = call.split('(').next().unwrap_or("");
    let first_arg = call
        .get(name.len() + 1..)
        // An unfinished call's start has no ")": "fsync(22 <unfinished ...>".
        .and_then(|args| args.split([',', ')', ' ']).next())
        .unwrap_or("")
        .to_owned();
    let result = call.rsplit_once(" = ").map(|(_, r)| r.trim());
    let starts = part != Part::End;
    let ends = part != Part::Start;
    match name {
        "openat" if ends => {
            let Some(fd) = result.filter(|r| !r.starts_with('-')) else {
                return;
            };
            let fd = fd.split_whitespace().next().unwrap_or(fd).to_owned();
            match buffer_file(call) {
                Some(file) => {
                    if file.len() > 6 && call.contains("O_CREAT") {
                        // A new name in the directory: the directory needs a sync too.
                        calls.push(Call::Write("blobs/".into()));
                    }
                    files.insert(fd, file);
                }
                None => {
                    files.remove(&fd);
                }
            }
        }
        "close" if ends => {
            files.remove(&first_arg);
        }
        "pwrite64" | "write" | "writev" if ends && files.contains_key(&first_arg) => {
            calls.push(Call::Write(files[&first_arg].clone()))
        }
        "fdatasync" | "fsync" if files.contains_key(&first_arg) => {
            let file = files[&first_arg].clone();
            if starts {
                calls.push(Call::SyncStart(file.clone()));
            }
            if ends && result == Some("0") {
                calls.push(Call::SyncDone(file));
            }
        }
        // MQTT PUBACK: 0x40 0x02; strace prints it in hex or, next to printable bytes, as "@".
        "write" | "writev" | "sendto" | "sendmsg"
            if starts && (call.contains("\"\\x40\\x02") || call.contains("\"@\\x02")) =>
        {
            calls.push(Call::Puback)
        }
        _ => {}
    }
}

/// A tmpfs mounted for one test; unmounted on drop. `None` without the right to mount (not root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(at.to_owned()))
    }

    fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The disk fills up under a stream of messages: the first failed write ends the gateway, non-zero
/// and naming the failure, instead of acknowledging on; once there is room again, every message
/// is in the buffer, the acknowledged ones from before and the others redelivered by the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_the_gateway_without_losing_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("data"), "16m") else {
        // CI runs as root; elsewhere skipping must be asked for, so that it is never silent.
        assert!(
            std::env::var_os("EDGEGATE_TEST_NO_MOUNT").is_some(),
            "mounting a tmpfs for the data_dir needs root; set EDGEGATE_TEST_NO_MOUNT=1 to skip"
        );
        return;
    };
    let broker = Mosquitto::start();
    let admin = free_port();
    // The free-space reserve is off: this is the last resort behind it.
    let extra =
        format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n[buffer]\nmin_free_disk = \"0\"\n");
    let config = write_config(dir.path(), broker.port, "127.0.0.1:9", "t", &extra);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for("mqtt subscribed", Duration::from_secs(30));
    // Leave room for a few commits only.
    let filler = dir.path().join("data/filler");
    let room = 3 << 20;
    std::fs::write(&filler, vec![0u8; (disk.free_bytes() - room) as usize]).unwrap();
    let publisher = Publisher::connect(broker.port, "full-disk-device").await;
    let messages = 400u64;
    for n in 1..=messages {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 8 * 1024))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while gateway.is_running() {
        // Polled while it runs; the check is the deadline.
        assert!(
            Instant::now() < deadline,
            "the gateway went on after its disk filled up:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(gateway.exit_code(), Some(1), "{}", gateway.log());
    assert!(
        gateway.count("buffer storage failed") >= 1,
        "{}",
        gateway.log()
    );
    let acknowledged_before = gateway.log().lines().find_map(|l| {
        l.split_once("buffered=")?
            .1
            .split(' ')
            .next()?
            .parse::<u64>()
            .ok()
    });
    assert!(
        acknowledged_before.is_some_and(|n| n > 0 && n < messages),
        "the disk should fill up between commits: {acknowledged_before:?}"
    );

    std::fs::remove_file(&filler).unwrap();
    gateway.restart();
    gateway.wait_for_count("edgegate ready", 2, Duration::from_secs(30));
    // The broker redelivers what was not acknowledged; duplicates make the count larger.
    let stored = |v: f64| v >= messages as f64;
    wait_metric(
        admin,
        "edgegate_buffer_records",
        stored,
        Duration::from_secs(60),
    );
    assert_eq!(gateway.terminate(), Some(0), "{}", gateway.log());
    let buffered = buffered_counters(&config);
    let missing: Vec<u64> = (1..=messages).filter(|n| !buffered.contains(n)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
}

const NEARLY_FULL: &str = "disk is nearly full";

/// The disk under data_dir runs low with the uplink away: the buffer stops growing as if
/// `max_bytes` were reached (`block`: the broker keeps what is not acknowledged), says so once,
/// and goes on by itself when space returns, without a restart and without losing a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_holds_the_buffer_and_it_goes_on_by_itself_when_space_returns() {
    let Some(mut run) = LowDisk::start("block").await else {
        return;
    };
    run.publish_more().await;
    run.gateway
        .wait_for("buffer full; holding back sources", Duration::from_secs(60));
    let held = wait_metric(
        run.admin,
        "edgegate_buffer_records",
        |v| v > 0.0,
        Duration::from_secs(10),
    );
    assert!(
        held < run.messages as f64,
        "stored {held} of {}",
        run.messages
    );

    std::fs::remove_file(&run.filler).unwrap();
    let all = run.messages as f64;
    let stored = |v: f64| v >= all;
    wait_metric(
        run.admin,
        "edgegate_buffer_records",
        stored,
        Duration::from_secs(60),
    );
    run.gateway
        .wait_for("disk has room again", Duration::from_secs(30));
    assert!(run.gateway.is_running(), "{}", run.gateway.log());
    assert_eq!(run.gateway.count(NEARLY_FULL), 1, "{}", run.gateway.log());
    assert_eq!(run.gateway.terminate(), Some(0), "{}", run.gateway.log());
    let buffered = buffered_counters(&run.config);
    let missing: Vec<u64> = (1..=run.messages)
        .filter(|n| !buffered.contains(n))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
}

/// The same with `drop_oldest`: the oldest unsent records make room and are counted, and the
/// newest are kept. Close to a full disk (below half the reserve) it holds back like `block`,
/// since sled may grow its file before it reuses evicted space; that passes with the space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_with_drop_oldest_keeps_the_newest_and_counts_the_dropped() {
    let Some(mut run) = LowDisk::start("drop_oldest").await else {
        return;
    };
    run.publish_more().await;
    let dropped = "edgegate_records_dropped_total{reason=\"buffer_full\"}";
    wait_metric(run.admin, dropped, |v| v > 0.0, Duration::from_secs(60));
    std::fs::remove_file(&run.filler).unwrap();
    // Every message is stored or dropped (the broker holds the rest until it is).
    let deadline = Instant::now() + Duration::from_secs(60);
    let accounted = || metric(run.admin, "edgegate_buffer_records") + metric(run.admin, dropped);
    while accounted() < run.messages as f64 {
        assert!(Instant::now() < deadline, "{}", run.gateway.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(run.gateway.terminate(), Some(0), "{}", run.gateway.log());
    assert_eq!(run.gateway.count(NEARLY_FULL), 1, "{}", run.gateway.log());
    let dropped = dropped_at_stop(&run.gateway);
    assert!(dropped > 0, "{}", run.gateway.log());
    let buffered = buffered_counters(&run.config);
    assert!(buffered.contains(&run.messages), "the newest is kept");
    assert_eq!(
        buffered.len() as u64 + dropped,
        run.messages,
        "stored and dropped add up"
    );
}

fn dropped_at_stop(gw: &Gateway) -> u64 {
    let log = gw.log();
    let line = log.lines().find(|l| l.contains("stopped;"));
    line.and_then(|l| {
        l.split("dropped=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
    .unwrap_or_else(|| panic!("no dropped count at stop:\n{log}"))
}

/// A gateway whose data_dir is a small tmpfs that a filler leaves 4 MiB above the gateway's
/// 16 MiB reserve, with the uplink away. 400 messages of 8 KiB (about 6 MiB on disk) take it below
/// the reserve; `publish_more` sends 600 more.
struct LowDisk {
    _dir: tempfile::TempDir,
    _disk: Tmpfs,
    _broker: Mosquitto,
    filler: std::path::PathBuf,
    config: std::path::PathBuf,
    admin: u16,
    gateway: Gateway,
    publisher: Publisher,
    messages: u64,
}

impl LowDisk {
    async fn start(when_full: &str) -> Option<LowDisk> {
        let dir = tempfile::tempdir().unwrap();
        let Some(disk) = Tmpfs::mount(&dir.path().join("data"), "64m") else {
            assert!(
                std::env::var_os("EDGEGATE_TEST_NO_MOUNT").is_some(),
                "mounting a tmpfs for the data_dir needs root; set EDGEGATE_TEST_NO_MOUNT=1 to skip"
            );
            return None;
        };
        let broker = Mosquitto::start();
        let broker_port = broker.port;
        let admin = free_port();
        let extra = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [buffer]\nmin_free_disk = \"16MiB\"\nwhen_full = \"{when_full}\"\n"
        );
        let config = write_config(dir.path(), broker_port, "127.0.0.1:9", "t", &extra);
        let gateway = Gateway::start(&config);
        gateway.wait_for("mqtt subscribed", Duration::from_secs(30));
        let filler = dir.path().join("data/filler");
        let room = 20 << 20;
        std::fs::write(&filler, vec![0u8; (disk.free_bytes() - room) as usize]).unwrap();
        let mut run = LowDisk {
            _dir: dir,
            _disk: disk,
            _broker: broker,
            filler,
            config,
            admin,
            gateway,
            publisher: Publisher::connect(broker_port, "low-disk-device").await,
            messages: 0,
        };
        run.publish(400).await;
        run.gateway.wait_for(NEARLY_FULL, Duration::from_secs(60));
        Some(run)
    }

    async fn publish(&mut self, n: u64) {
        for _ in 0..n {
            self.messages += 1;
            let p = payload("sensors/a", self.messages, 8 * 1024);
            self.publisher.publish("sensors/a", p).await;
        }
        // All of them are with the broker, whatever the gateway does with them.
        let all = self.messages;
        self.publisher
            .wait_acked(all, Duration::from_secs(60))
            .await;
    }

    /// More than the few commits' working room the buffer keeps while the disk is low.
    async fn publish_more(&mut self) {
        self.publish(600).await;
    }
}

/// The counters of the test payloads in the buffer, read with `edgegate buffer export`.
fn buffered_counters(config: &Path) -> std::collections::HashSet<u64> {
    use base64::Engine as _;
    buffer_export(config)
        .iter()
        .map(|v| {
            let payload = v["payload_base64"].as_str().unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(payload)
                .unwrap();
            parse_payload(&bytes).1
        })
        .collect()
}
