//! edgegate's converters against Node.js, the engine ThingsBoard runs decoders on: `Math.*` bit
//! for bit, and random decoder programs byte for byte (number formatting and parsing, dates,
//! JSON, the payload's UTF-16 code units). Needs `node` on PATH (`scripts/prerequisites`).
//!
//! A fixed-seed slice runs with the suite. `scripts/differential` runs long ones; the counts come
//! from the environment: `EDGEGATE_DIFF_SEED`, `EDGEGATE_DIFF_MATH` (inputs per function) and
//! `EDGEGATE_DIFF_PROGRAMS`.

use std::path::{Path, PathBuf};
use std::process::Command;

use rquickjs::{Context, Function, Runtime, TypedArray};

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The gateway's own setting (main), which Node inherits from this process: UTC unless TZ is set.
fn same_zone_as_the_gateway() {
    edgegate::converter::dates_in_utc_unless_tz_is_set();
}

fn seed() -> u64 {
    env_count("EDGEGATE_DIFF_SEED", 1)
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/differential")
        .join(name)
}

/// Runs `node` with the test's environment (TZ included) and fails the test on any error.
fn node(args: &[&str]) {
    let output = Command::new("node")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("node (install nodejs: scripts/prerequisites): {e}"));
    assert!(
        output.status.success(),
        "node {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn doubles(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

/// `math.js`'s kernel run by the converters' QuickJS, with edgegate's Math functions.
fn quickjs_math(kernel: &str, inputs: Vec<f64>) -> Vec<f64> {
    edgegate::converter::math::install();
    let runtime = Runtime::new().expect("runtime");
    let context = Context::full(&runtime).expect("context");
    context.with(|ctx| {
        ctx.eval::<(), _>(kernel).expect("math.js evaluates");
        let evaluate: Function = ctx.globals().get("evaluate").expect("evaluate()");
        let inputs = TypedArray::<f64>::new(ctx.clone(), inputs).expect("inputs");
        let out: TypedArray<f64> = evaluate.call((inputs,)).expect("evaluate runs");
        // SAFETY: no JavaScript runs while the slice is read.
        unsafe { out.as_slice() }.to_vec()
    })
}

#[test]
fn math_functions_match_node_bit_for_bit() {
    same_zone_as_the_gateway();
    let count = env_count("EDGEGATE_DIFF_MATH", 4_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (inputs, expected) = (dir.path().join("inputs"), dir.path().join("expected"));
    let kernel = script("math.js");
    let kernel_path = kernel.to_str().expect("UTF-8 path");
    let (seed, count_arg) = (seed().to_string(), count.to_string());
    node(&[kernel_path, "gen", &seed, &count_arg, path(&inputs)]);
    node(&[kernel_path, "run", path(&inputs), path(&expected)]);

    let input = doubles(&std::fs::read(&inputs).expect("inputs"));
    let want = doubles(&std::fs::read(&expected).expect("Node's results"));
    let source = std::fs::read_to_string(&kernel).expect("math.js");
    let got = quickjs_math(&source, input.clone());
    assert_eq!(got.len(), want.len());

    let names = function_names(&source);
    let per_function = want.len() / names.len();
    let mut report = Vec::new();
    for (f, name) in names.iter().enumerate() {
        let range = f * per_function..(f + 1) * per_function;
        let differ: Vec<usize> = range.filter(|&i| !same(got[i], want[i])).collect();
        if let Some(&i) = differ.first() {
            let (x, y) = (input[2 * i], input[2 * i + 1]);
            report.push(format!(
                "{name}: {} of {per_function} differ; first: ({x:e}, {y:e}) node {:e} ({:#018x}), edgegate {:e} ({:#018x})",
                differ.len(),
                want[i],
                want[i].to_bits(),
                got[i],
                got[i].to_bits()
            ));
        }
    }
    eprintln!(
        "Math: {} inputs over {} functions, seed {seed}",
        want.len(),
        names.len()
    );
    assert!(
        report.is_empty(),
        "differences from Node.js:\n{}",
        report.join("\n")
    );
}

/// Equal bits, or both NaN (JavaScript cannot tell NaNs apart).
fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// `FUNCTIONS` of math.js, in order.
fn function_names(source: &str) -> Vec<String> {
    let start = source.find("var FUNCTIONS = [").expect("FUNCTIONS") + 17;
    let end = start + source[start..].find("];").expect("end of FUNCTIONS");
    source[start..end]
        .split(',')
        .map(|s| s.trim().trim_matches('\'').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// One generated decoder and Node's results for it.
#[derive(serde::Deserialize)]
struct Case {
    id: u64,
    body: String,
    payload: String,
}

#[derive(serde::Deserialize)]
struct NodeResult {
    id: u64,
    raw: String,
    kafka: Option<String>,
}

/// `programs.js`'s CAPTURED_MS.
const CAPTURED_MS: u64 = 1_764_756_000_000;

#[test]
fn random_decoders_give_nodes_results_byte_for_byte() {
    use base64::Engine as _;
    use edgegate::config::ConverterConfig;
    use edgegate::converter::{number, ConvertError, Converter};

    same_zone_as_the_gateway();
    let count = env_count("EDGEGATE_DIFF_PROGRAMS", 2_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cases_file, expected_file) = (dir.path().join("cases"), dir.path().join("expected"));
    let generator = script("programs.js");
    let (seed, count_arg) = (seed().to_string(), count.to_string());
    node(&[
        path(&generator),
        "gen",
        &seed,
        &count_arg,
        path(&cases_file),
    ]);
    node(&[
        path(&generator),
        "run",
        path(&cases_file),
        path(&expected_file),
    ]);
    let cases: Vec<Case> = read_lines(&cases_file);
    let expected: Vec<NodeResult> = read_lines(&expected_file);
    assert_eq!(cases.len(), expected.len());

    let script_file = dir.path().join("decoder.js");
    let mut differences = Vec::new();
    for (case, want) in cases.iter().zip(&expected) {
        assert_eq!(case.id, want.id);
        std::fs::write(&script_file, &case.body).expect("script");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&case.payload)
            .expect("payload");
        let mut converter = Converter::new(
            "diff",
            &ConverterConfig::for_script(script_file.clone()),
            None,
        )
        .unwrap_or_else(|e| panic!("case {}: {e}\n{}", case.id, case.body));
        let raw = match converter.run_raw(&payload, &[]) {
            Ok(value) => number::to_string_js(&value),
            Err(ConvertError::InvalidResult(_)) => "undefined".to_string(),
            Err(_) => "threw".to_string(),
        };
        let kafka = converter
            .convert(&payload, &[], CAPTURED_MS)
            .ok()
            .map(|entities| {
                entities
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.json).into_owned())
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        if raw != want.raw || (want.raw != "threw" && kafka != want.kafka) {
            differences.push(format!(
                "case {} (seed {seed}):\n{}\n  payload {}\n  node     {} | {:?}\n  edgegate {} | {:?}",
                case.id, case.body, case.payload, want.raw, want.kafka, raw, kafka
            ));
        }
    }
    eprintln!(
        "decoders: {} programs, seed {seed}, {} differ",
        cases.len(),
        differences.len()
    );
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("differential-{seed}.txt"));
    let _ = std::fs::write(&report, differences.join("\n\n"));
    assert!(
        differences.is_empty(),
        "{} of {} decoders differ from Node.js (all in {}); the first:\n{}",
        differences.len(),
        cases.len(),
        report.display(),
        differences
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
}

fn read_lines<T: serde::de::DeserializeOwned>(file: &Path) -> Vec<T> {
    std::fs::read_to_string(file)
        .expect("JSON lines")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}
