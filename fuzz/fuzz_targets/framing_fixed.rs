#![no_main]

// The framer of one mode against its reference model (edgegate_fuzz::framing).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    edgegate_fuzz::framing::run(edgegate_fuzz::framing::Kind::Fixed, data);
});
