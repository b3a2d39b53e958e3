#![no_main]

// Crashes and sanitizer reports are the findings here; semantics are compared with Node.js by the
// replay tool, which runs the same generator.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let program = edgegate_fuzz::program(data);
    let _ = edgegate_fuzz::run_quickjs(&program.source);
});
