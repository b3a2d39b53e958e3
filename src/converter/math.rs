//! `Math.*` and `**` as Node.js computes them, to the bit, on every board.
//!
//! QuickJS calls the C library for its transcendental functions, so a decoder's results depend on
//! the libc and the architecture, and differ from ThingsBoard's (Node.js) in the last bit. V8
//! does not use the platform's libm: it ships fdlibm ports (`base::ieee754`). The vendored
//! QuickJS takes its functions from a table (`JS_SetMathFunctions`, `vendor/README.md`), which
//! [`install`] fills with the `libm` crate's fdlibm ports, and with this module's own ports of
//! the fdlibm functions the crate implements differently (see [`fdlibm`]). Pure Rust floating
//! point is never contracted into fused multiply-adds, so the results are the same on x86_64,
//! aarch64 and armv7. `tests/differential.rs` compares them with Node.js.

mod fdlibm;

use std::sync::Once;

type Unary = extern "C" fn(f64) -> f64;
type Binary = extern "C" fn(f64, f64) -> f64;

/// `JSMathFunctions` in the vendored `quickjs.h`: the same fields in the same order.
#[repr(C)]
struct MathFunctions {
    acos: Unary,
    acosh: Unary,
    asin: Unary,
    asinh: Unary,
    atan: Unary,
    atan2: Binary,
    atanh: Unary,
    cbrt: Unary,
    cos: Unary,
    cosh: Unary,
    exp: Unary,
    expm1: Unary,
    log: Unary,
    log10: Unary,
    log1p: Unary,
    log2: Unary,
    pow: Binary,
    sin: Unary,
    sinh: Unary,
    tan: Unary,
    tanh: Unary,
}

extern "C" {
    fn JS_SetMathFunctions(functions: *const MathFunctions);
}

macro_rules! unary {
    ($($name:ident => $f:path),* $(,)?) => {
        $(extern "C" fn $name(x: f64) -> f64 { $f(x) })*
    };
}

unary! {
    acos => libm::acos,
    acosh => fdlibm::acosh,
    asin => libm::asin,
    asinh => fdlibm::asinh,
    atan => libm::atan,
    atanh => fdlibm::atanh,
    cbrt => fdlibm::cbrt,
    cos => fdlibm::cos,
    cosh => fdlibm::cosh,
    exp => fdlibm::exp,
    expm1 => libm::expm1,
    log => fdlibm::log,
    log10 => fdlibm::log10,
    log1p => fdlibm::log1p,
    log2 => libm::log2,
    sin => fdlibm::sin,
    sinh => fdlibm::sinh,
    tan => libm::tan,
    tanh => fdlibm::tanh,
}

extern "C" fn atan2(y: f64, x: f64) -> f64 {
    fdlibm::atan2(y, x)
}

extern "C" fn pow(x: f64, y: f64) -> f64 {
    fdlibm::pow(x, y)
}

static V8_MATH: MathFunctions = MathFunctions {
    acos,
    acosh,
    asin,
    asinh,
    atan,
    atan2,
    atanh,
    cbrt,
    cos,
    cosh,
    exp,
    expm1,
    log,
    log10,
    log1p,
    log2,
    pow,
    sin,
    sinh,
    tan,
    tanh,
};

/// Makes every QuickJS runtime use these functions. Idempotent; the converter calls it before
/// it creates a runtime, so no script ever runs with the C library's.
pub fn install() {
    static INSTALLED: Once = Once::new();
    // SAFETY: QuickJS copies the table; `Once` makes the write happen before any runtime of ours
    // exists, and every caller returns only after it.
    INSTALLED.call_once(|| unsafe { JS_SetMathFunctions(&V8_MATH) });
}
