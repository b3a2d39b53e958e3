//! Power-cut durability, read from the system calls the gateway makes (under `strace`): a PUBACK
//! leaves edgegate only after an `fdatasync` of the buffer's log that started after the record was
//! written. sled's own flush only calls `sync_file_range`, which a power cut can undo (the log's
//! new size and the disk's write cache are not persisted), and a `kill -9` test cannot tell.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// The system calls the check needs, in the order they completed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// A write to the buffer's log file finished.
    LogWrite,
    /// An `fdatasync` of the log file started or finished.
    SyncStart,
    SyncDone,
    /// A PUBACK started on its way to the broker.
    Puback,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_puback_follows_an_fdatasync_of_the_record_it_acknowledges() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    // Kafka is unreachable: records stay in the buffer and only the append path writes the log.
    let config = write_config(dir.path(), broker.port, "127.0.0.1:9", "t", "");
    let trace = dir.path().join("strace.out");
    let (tracer, lines) = start_traced(&config, &trace);
    wait_for_line(&lines, "mqtt subscribed");
    let publisher = Publisher::connect(broker.port, "durability-device").await;
    for n in 1..=3u64 {
        publisher
            .publish("sensors/a", payload("sensors/a", n, 20))
            .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while pubacks(&calls(&trace)) < n as usize {
            assert!(Instant::now() < deadline, "no PUBACK {n} from the gateway");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(tracer);
    let calls = calls(&trace);
    assert_eq!(pubacks(&calls), 3);
    assert_each_puback_synced(&calls);
}

fn pubacks(calls: &[Call]) -> usize {
    calls.iter().filter(|c| **c == Call::Puback).count()
}

/// Before every PUBACK: an `fdatasync` that started after the last log write and has finished.
fn assert_each_puback_synced(calls: &[Call]) {
    let mut written_since_sync_start = false;
    let mut synced = false;
    let mut writes = 0;
    for (i, call) in calls.iter().enumerate() {
        match call {
            Call::LogWrite => {
                writes += 1;
                written_since_sync_start = true;
                synced = false;
            }
            Call::SyncStart => written_since_sync_start = false,
            Call::SyncDone => synced = !written_since_sync_start,
            Call::Puback => assert!(
                synced && writes > 0,
                "PUBACK (call {i}) without an fdatasync of the written record before it: {calls:?}"
            ),
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
        .arg("trace=openat,pwrite64,fdatasync,write,writev,sendto,sendmsg")
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
    let mut log_fds: Vec<String> = Vec::new();
    let mut started: std::collections::HashMap<String, String> = Default::default();
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
        classify(&call, part, &mut log_fds, &mut calls);
    }
    calls
}

fn classify(call: &str, part: Part, log_fds: &mut Vec<String>, calls: &mut Vec<Call>) {
    let name = call.split('(').next().unwrap_or("");
    let first_arg = call
        .get(name.len() + 1..)
        .and_then(|args| args.split([',', ')']).next())
        .unwrap_or("")
        .to_owned();
    let result = call.rsplit_once(" = ").map(|(_, r)| r.trim());
    let starts = part != Part::End;
    let ends = part != Part::Start;
    match name {
        "openat" if ends && call.contains("/buffer/db\"") => {
            if let Some(fd) = result.filter(|r| !r.starts_with('-')) {
                log_fds.push(fd.to_owned());
            }
        }
        "pwrite64" if ends && log_fds.contains(&first_arg) => calls.push(Call::LogWrite),
        "fdatasync" if log_fds.contains(&first_arg) => {
            if starts {
                calls.push(Call::SyncStart);
            }
            if ends && result == Some("0") {
                calls.push(Call::SyncDone);
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
