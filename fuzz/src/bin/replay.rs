//! Differential replay: every input of the given corpus directories and of a seeded generated
//! batch becomes a program (the fuzz target's generator), evaluated in edgegate's QuickJS and in
//! Node.js (`replay.js`); the result strings must be equal byte for byte.
//!
//!   replay [--generated N] [--seed S] [--save-diffs DIR] [--upstream BIN] [DIR|FILE]...
//!   replay --show INPUT     the program of one input and both engines' results
//!   replay --js FILE        any JavaScript file's value in both engines
//!   replay --quickjs-only DUMP [--generated N] [DIR|FILE]...
//!                           QuickJS's results only, one line per program into DUMP: two builds
//!                           (with and without the shortcuts) must write the same file
//!   replay --serve          answers {"src"} lines with {"out"} lines from QuickJS, as replay.js
//!                           does from Node.js: what --upstream runs
//!
//! A difference that is a documented engine limit is counted under its class. With `--upstream
//! BIN`, the replay tool built against the unpatched rquickjs-sys release, a difference that
//! QuickJS shows with and without the shortcuts is QuickJS's own, counted and listed in one line
//! each. Any other difference is printed in full and makes the exit status 1.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use edgegate_fuzz::{program, run_quickjs, Program};

/// An engine in a child process, one JSON line per program each way.
struct Node {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Node {
    fn start() -> Node {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("replay.js");
        Node::spawn(Command::new("node").arg(script))
    }

    fn spawn(command: &mut Command) -> Node {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the engine's program");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Node {
            child,
            stdin,
            stdout,
        }
    }

    fn run(&mut self, source: &str) -> String {
        let line = serde_json::json!({ "src": source }).to_string();
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        let v: serde_json::Value = serde_json::from_str(&answer).expect("a line from replay.js");
        v["out"].as_str().unwrap().to_string()
    }
}

/// Why QuickJS and V8 may rightly differ. Only these are accepted; anything else is a finding.
fn classify(p: &Program, quickjs: &str, node: &str) -> Option<&'static str> {
    if quickjs == "interrupted" || node == "interrupted" {
        return Some("time limit (interrupt handler / vm timeout)");
    }
    if quickjs == "out of memory" {
        return Some("QuickJS memory limit (64 MiB)");
    }
    // QuickJS refuses a call with more than 65 535 arguments (JS_MAX_LOCAL_VARS) with a
    // RangeError, V8 takes them but runs out of stack for some calls with as many (Reflect.construct
    // of Array): the first differing step must be a RangeError on one side.
    if p.large || p.negative_length {
        let q: Result<Vec<serde_json::Value>, _> = serde_json::from_str(quickjs);
        let n: Result<Vec<serde_json::Value>, _> = serde_json::from_str(node);
        if let (Ok(q), Ok(n)) = (q, n) {
            let first = q.iter().zip(n.iter()).position(|(a, b)| a != b);
            if let Some(d) = first {
                let (qs, ns) = (&q[d], &n[d]);
                let range_error = |step: &serde_json::Value| {
                    step.as_array()
                        .and_then(|s| s.last())
                        .and_then(|v| v.as_str())
                        == Some("throws RangeError")
                };
                if p.negative_length && range_error(qs) {
                    return Some("upstream QuickJS: apply takes an array-like's length by ToUint32, not ToLength");
                }
                // Refused before reading any element, QuickJS runs no getter or valueOf that V8
                // runs: the state differs from there on.
                if p.large && q[..=d].iter().any(range_error) {
                    return Some("QuickJS argument count limit (65535)");
                }
                if p.large && range_error(ns) {
                    return Some("V8 stack limit for a call with 65535 arguments");
                }
            }
        }
    }
    None
}

fn inputs(args: &[String]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for a in args {
        let p = PathBuf::from(a);
        if p.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // a directory's notes are not inputs
                if f.is_file() && !name.starts_with('.') && !name.ends_with(".md") {
                    out.push((f.display().to_string(), std::fs::read(&f).unwrap()));
                }
            }
        } else {
            out.push((a.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// xorshift64*: the generated batch is the same for the same seed on every machine.
fn generated(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    // splitmix64 of the seed: never zero, and seeds 2 and 3 differ
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x |= 1;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..n)
        .map(|i| {
            let len = 8 + (next() % 400) as usize;
            let bytes = (0..len).map(|_| (next() >> 56) as u8).collect();
            (format!("generated:{seed}:{i}"), bytes)
        })
        .collect()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let count: usize = take("--generated").map_or(0, |v| v.parse().unwrap());
    let seed: u64 = take("--seed").map_or(15, |v| v.parse().unwrap());
    let save = take("--save-diffs").map(PathBuf::from);
    if let Some(file) = take("--js") {
        let source = std::fs::read_to_string(file).unwrap();
        println!("quickjs: {}", run_quickjs(&source));
        println!("node:    {}", Node::start().run(&source));
        return;
    }
    if let Some(file) = take("--show") {
        let p = program(&std::fs::read(file).unwrap());
        println!("{}", p.source);
        println!("// quickjs: {}", run_quickjs(&p.source));
        println!("// node:    {}", Node::start().run(&p.source));
        return;
    }
    let dump = take("--quickjs-only").map(PathBuf::from);
    let mut upstream = take("--upstream").map(|bin| Node::spawn(Command::new(bin).arg("--serve")));
    if args.iter().any(|a| a == "--serve") {
        serve();
        return;
    }
    let mut all = inputs(&args);
    all.extend(generated(count, seed));

    if let Some(dump) = dump {
        let mut out = std::io::BufWriter::new(std::fs::File::create(dump).unwrap());
        for (name, bytes) in &all {
            let q = run_quickjs(&program(bytes).source);
            writeln!(out, "{name}\t{q}").unwrap();
        }
        out.flush().unwrap();
        println!("programs run: {}", all.len());
        return;
    }

    let mut node = Node::start();
    let mut same = 0usize;
    let mut limits: BTreeMap<&str, usize> = BTreeMap::new();
    let mut findings = 0usize;
    let mut upstream_same = 0usize;
    for (name, bytes) in &all {
        let p = program(bytes);
        let q = run_quickjs(&p.source);
        let n = node.run(&p.source);
        if q == n {
            same += 1;
            continue;
        }
        if let Some(class) = classify(&p, &q, &n) {
            *limits.entry(class).or_default() += 1;
            continue;
        }
        if let Some(up) = upstream.as_mut() {
            if up.run(&p.source) == q {
                upstream_same += 1;
                println!(
                    "upstream QuickJS, same without the shortcuts: {name}: {}",
                    first_difference(&q, &n)
                );
                continue;
            }
        }
        findings += 1;
        println!(
            "DIFFERENCE {name}\n--- program\n{}--- quickjs\n{q}\n--- node\n{n}\n",
            p.source
        );
        if let Some(dir) = &save {
            std::fs::create_dir_all(dir).unwrap();
            let file = name.rsplit(['/', ':']).next().unwrap_or("input");
            std::fs::write(dir.join(format!("diff-{file}")), bytes).unwrap();
        }
    }
    drop(node.stdin);
    let _ = node.child.wait();
    println!("programs compared: {}", all.len());
    println!("identical: {same}");
    for (class, n) in &limits {
        println!("engine limit, {class}: {n}");
    }
    if upstream.is_some() {
        println!("upstream QuickJS-ng differences (the unpatched release gives the same result): {upstream_same}");
    }
    println!("unexplained differences: {findings}");
    if findings > 0 {
        std::process::exit(1);
    }
}

/// QuickJS behind a pipe, for another build of this tool (`--upstream`).
fn serve() {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let out = run_quickjs(v["src"].as_str().unwrap());
        writeln!(stdout, "{}", serde_json::json!({ "out": out })).unwrap();
        stdout.flush().unwrap();
    }
}

/// The first step where the results part, for a one-line account.
fn first_difference(quickjs: &str, node: &str) -> String {
    let q: Result<Vec<serde_json::Value>, _> = serde_json::from_str(quickjs);
    let n: Result<Vec<serde_json::Value>, _> = serde_json::from_str(node);
    let cut = |s: String| s.chars().take(160).collect::<String>();
    match (q, n) {
        (Ok(q), Ok(n)) => match q.iter().zip(n.iter()).position(|(a, b)| a != b) {
            Some(d) => format!(
                "step {d}: quickjs {} | node {}",
                cut(q[d].to_string()),
                cut(n[d].to_string())
            ),
            None => format!("{} against {} steps", q.len(), n.len()),
        },
        _ => format!(
            "quickjs {} | node {}",
            cut(quickjs.to_string()),
            cut(node.to_string())
        ),
    }
}
