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
