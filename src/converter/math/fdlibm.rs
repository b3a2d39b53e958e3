//! fdlibm 5.3 (netlib) as V8 carries it in `base::ieee754`, for the functions where the `libm`
//! crate's FreeBSD and musl versions give other doubles: exp, log, log1p, log10, sin, cos (their
//! argument reduction and kernels), atan2, pow (V8's `legacy::pow`, which rounds its last step
//! differently from every C library), the hyperbolics and cbrt. `tests/differential.rs` compares
//! every one with Node.js bit for bit; each follows fdlibm step for step, and its arithmetic must
//! stay exactly as written for the results to stay identical.
//!
//! ====================================================
//! Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//!
//! Developed at SunSoft, a Sun Microsystems, Inc. business.
//! Permission to use, copy, modify, and distribute this
//! software is freely granted, provided that this notice
//! is preserved.
//! ====================================================

// The constants are written as fdlibm gives them, digits and all, so they can be checked against
// it; their doubles are what matters. `x - x` is fdlibm's NaN (or NaN from NaN) for non-finite x.
#![allow(clippy::excessive_precision, clippy::approx_constant, clippy::eq_op)]

use libm::{atan, expm1, floor, scalbn, sqrt};

const LN2: f64 = 6.931_471_805_599_452_862_27e-1;
const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1; // 0x3fe62e42 fee00000
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10; // 0x3dea39ef 35793c76
const TWO54: f64 = 1.801_439_850_948_198_400_00e16;
const TWO24: f64 = 1.677_721_600_000_000_000_00e7;
const TWON24: f64 = 5.960_464_477_539_062_500_00e-8;

/// The high 32 bits of `x` (sign, exponent and the top of the mantissa), fdlibm's `GET_HIGH_WORD`.
fn high_word(x: f64) -> u32 {
    (x.to_bits() >> 32) as u32
}

fn low_word(x: f64) -> u32 {
    x.to_bits() as u32
}

fn from_words(high: u32, low: u32) -> f64 {
    f64::from_bits((u64::from(high) << 32) | u64::from(low))
}

fn with_high_word(x: f64, high: u32) -> f64 {
    from_words(high, low_word(x))
}

fn with_low_word(x: f64, low: u32) -> f64 {
    from_words(high_word(x), low)
}

pub fn asinh(x: f64) -> f64 {
    let hx = high_word(x);
    let ix = hx & 0x7fff_ffff;
    if ix >= 0x7ff0_0000 {
        return x + x; // inf or NaN
    }
    if ix < 0x3e30_0000 {
        return x; // |x| < 2^-28
    }
    let w = if ix > 0x41b0_0000 {
        log(x.abs()) + LN2 // |x| > 2^28
    } else if ix > 0x4000_0000 {
        let t = x.abs(); // 2^28 > |x| > 2
        log(2.0 * t + 1.0 / (sqrt(x * x + 1.0) + t))
    } else {
        let t = x * x; // 2 > |x| > 2^-28
        log1p(x.abs() + t / (1.0 + sqrt(1.0 + t)))
    };
    if (hx as i32) > 0 {
        w
    } else {
        -w
    }
}

pub fn acosh(x: f64) -> f64 {
    let hx = high_word(x) as i32;
    if hx < 0x3ff0_0000 {
        return f64::NAN; // x < 1
    }
    if hx >= 0x41b0_0000 {
        if hx >= 0x7ff0_0000 {
            return x + x; // inf or NaN
        }
        return log(x) + LN2; // x > 2^28
    }
    if hx == 0x3ff0_0000 && low_word(x) == 0 {
        return 0.0; // acosh(1)
    }
    if hx > 0x4000_0000 {
        let t = x * x; // 2^28 > x > 2
        return log(2.0 * x - 1.0 / (x + sqrt(t - 1.0)));
    }
    let t = x - 1.0; // 1 < x < 2
    log1p(t + sqrt(2.0 * t + t * t))
}

pub fn atanh(x: f64) -> f64 {
    let hx = high_word(x) as i32;
    let lx = low_word(x);
    let ix = hx & 0x7fff_ffff;
    let low_bit = (lx | lx.wrapping_neg()) >> 31;
    if (ix as u32 | low_bit) > 0x3ff0_0000 {
        return f64::NAN; // |x| > 1
    }
    if ix == 0x3ff0_0000 {
        return x / 0.0; // ±1: ±Infinity
    }
    if ix < 0x3e30_0000 {
        return x; // |x| < 2^-28
    }
    let ax = from_words(ix as u32, lx);
    let t = if ix < 0x3fe0_0000 {
        let t = ax + ax; // |x| < 0.5
        0.5 * log1p(t + t * ax / (1.0 - ax))
    } else {
        0.5 * log1p((ax + ax) / (1.0 - ax))
    };
    if hx >= 0 {
        t
    } else {
        -t
    }
}

/// V8's threshold: above it, cosh and sinh overflow.
const HYPERBOLIC_OVERFLOW: f64 = 710.475_860_073_943_9;

pub fn sinh(x: f64) -> f64 {
    const TWO_M28: f64 = 3.725_290_298_461_914e-9;
    const LOG_MAXD: f64 = 709.782_226_562_5;
    let h = if x < 0.0 { -0.5 } else { 0.5 };
    let ax = x.abs();
    if ax < 22.0 {
        if ax < TWO_M28 {
            return x;
        }
        let t = expm1(ax);
        if ax < 1.0 {
            return h * (2.0 * t - t * t / (t + 1.0));
        }
        return h * (t + t / (t + 1.0));
    }
    if ax < LOG_MAXD {
        return h * exp(ax);
    }
    if ax <= HYPERBOLIC_OVERFLOW {
        let w = exp(0.5 * ax);
        let t = h * w;
        return t * w;
    }
    x * 1.0e307 // overflow, or NaN
}

pub fn cosh(x: f64) -> f64 {
    let ix = high_word(x) & 0x7fff_ffff;
    if ix < 0x3fd6_2e43 {
        // |x| in [0, ln2 / 2]: 1 + expm1(|x|)^2 / (2 exp(|x|))
        let t = expm1(x.abs());
        let w = 1.0 + t;
        if ix < 0x3c80_0000 {
            return w; // |x| < 2^-55
        }
        return 1.0 + (t * t) / (w + w);
    }
    if ix < 0x4036_0000 {
        // |x| in [ln2 / 2, 22]: (exp(|x|) + 1 / exp(|x|)) / 2
        let t = exp(x.abs());
        return 0.5 * t + 0.5 / t;
    }
    if ix < 0x4086_2e42 {
        return 0.5 * exp(x.abs()); // up to log(maxdouble)
    }
    if x.abs() <= HYPERBOLIC_OVERFLOW {
        let w = exp(0.5 * x.abs());
        let t = 0.5 * w;
        return t * w;
    }
    if ix >= 0x7ff0_0000 {
        return x * x; // inf or NaN
    }
    f64::INFINITY
}

pub fn tanh(x: f64) -> f64 {
    let jx = high_word(x) as i32;
    let ix = jx & 0x7fff_ffff;
    if ix >= 0x7ff0_0000 {
        // tanh(±inf) = ±1, tanh(NaN) = NaN
        return if jx >= 0 {
            1.0 / x + 1.0
        } else {
            1.0 / x - 1.0
        };
    }
    let z = if ix < 0x4036_0000 {
        if ix < 0x3e30_0000 {
            return x; // |x| < 2^-28
        }
        if ix >= 0x3ff0_0000 {
            let t = expm1(2.0 * x.abs()); // |x| >= 1
            1.0 - 2.0 / (t + 2.0)
        } else {
            let t = expm1(-2.0 * x.abs());
            -t / (t + 2.0)
        }
    } else {
        1.0 - 1.0e-300 // |x| >= 22: 1 (fdlibm raises inexact this way)
    };
    if jx >= 0 {
        z
    } else {
        -z
    }
}

pub fn cbrt(x: f64) -> f64 {
    const B1: u32 = 715_094_163; // (1023 - 1023/3 - 0.03306235651) * 2^20
    const B2: u32 = 696_219_795; // (1023 - 1023/3 - 54/3 - 0.03306235651) * 2^20
                                 // |1/cbrt(x) - p(x)| < 2^-23.5
    const P0: f64 = 1.875_951_824_271_770_096_43;
    const P1: f64 = -1.884_979_795_433_771_698_75;
    const P2: f64 = 1.621_429_720_105_354_466_14;
    const P3: f64 = -0.758_397_934_778_766_047_437;
    const P4: f64 = 0.145_996_192_886_612_446_982;

    let hx_signed = high_word(x);
    let low = low_word(x);
    let sign = hx_signed & 0x8000_0000;
    let hx = hx_signed ^ sign;
    if hx >= 0x7ff0_0000 {
        return x + x; // NaN, ±inf
    }
    // A first estimate to 5 bits from the exponent.
    let mut t = if hx < 0x0010_0000 {
        if (hx | low) == 0 {
            return x; // ±0
        }
        let scaled = from_words(0x4350_0000, 0) * x; // subnormal: scale by 2^54 first
        from_words(sign | ((high_word(scaled) & 0x7fff_ffff) / 3 + B2), 0)
    } else {
        from_words(sign | (hx / 3 + B1), 0)
    };
    // To 23 bits with a polynomial in t^3 / x.
    let r = (t * t) * (t / x);
    t *= (P0 + r * (P1 + r * P2)) + ((r * r) * r) * (P3 + r * P4);
    // Rounded away from zero to 23 bits, so the Newton step below is exact where it must be.
    t = f64::from_bits((t.to_bits().wrapping_add(0x8000_0000)) & 0xffff_ffff_c000_0000);
    // One Newton step to 53 bits.
    let s = t * t;
    let mut r = x / s;
    let w = t + t;
    r = (r - t) / (w + r);
    t + t * r
}

pub fn exp(x: f64) -> f64 {
    const HALF: [f64; 2] = [0.5, -0.5];
    const O_THRESHOLD: f64 = 7.097_827_128_933_839_730_96e2;
    const U_THRESHOLD: f64 = -7.451_332_191_019_411_084_20e2;
    const LN2HI: [f64; 2] = [LN2_HI, -LN2_HI];
    const LN2LO: [f64; 2] = [LN2_LO, -LN2_LO];
    const INVLN2: f64 = 1.442_695_040_888_963_387_00;
    const P1: f64 = 1.666_666_666_666_660_190_37e-1;
    const P2: f64 = -2.777_777_777_701_559_338_42e-3;
    const P3: f64 = 6.613_756_321_437_934_361_17e-5;
    const P4: f64 = -1.653_390_220_546_525_153_90e-6;
    const P5: f64 = 4.138_136_797_057_238_460_39e-8;
    const E: f64 = 2.718_281_828_459_045;
    const TWOM1000: f64 = 9.332_636_185_032_188_789_90e-302;
    const TWO1023: f64 = 8.988_465_674_311_579_539e307;

    let mut x = x;
    let mut hx = high_word(x);
    let xsb = ((hx >> 31) & 1) as usize;
    hx &= 0x7fff_ffff;
    if hx >= 0x4086_2e42 {
        // |x| >= 709.78...
        if hx >= 0x7ff0_0000 {
            if ((hx & 0xfffff) | low_word(x)) != 0 {
                return x + x; // NaN
            }
            return if xsb == 0 { x } else { 0.0 };
        }
        if x > O_THRESHOLD {
            return f64::INFINITY;
        }
        if x < U_THRESHOLD {
            return 0.0;
        }
    }
    let (mut hi, mut lo, mut k) = (0.0, 0.0, 0i32);
    if hx > 0x3fd6_2e42 {
        // |x| > ln2 / 2
        if hx < 0x3ff0_a2b2 {
            // and |x| < 1.5 ln2; V8 returns Math.E for exactly 1, which the formula misses
            if x == 1.0 {
                return E;
            }
            hi = x - LN2HI[xsb];
            lo = LN2LO[xsb];
            k = 1 - xsb as i32 - xsb as i32;
        } else {
            k = (INVLN2 * x + HALF[xsb]) as i32;
            let t = f64::from(k);
            hi = x - t * LN2HI[0];
            lo = t * LN2LO[0];
        }
        x = hi - lo;
    } else if hx < 0x3e30_0000 {
        return 1.0 + x; // |x| < 2^-28
    }
    let t = x * x;
    let twopk = if k >= -1021 {
        from_words((0x3ff0_0000_i32.wrapping_add(k << 20)) as u32, 0)
    } else {
        from_words((0x3ff0_0000_i32.wrapping_add((k + 1000) << 20)) as u32, 0)
    };
    let c = x - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
    if k == 0 {
        return 1.0 - ((x * c) / (c - 2.0) - x);
    }
    let y = 1.0 - ((lo - (x * c) / (2.0 - c)) - hi);
    if k >= -1021 {
        if k == 1024 {
            return y * 2.0 * TWO1023;
        }
        return y * twopk;
    }
    y * twopk * TWOM1000
}

const LG1: f64 = 6.666_666_666_666_735_130e-1;
const LG2: f64 = 3.999_999_999_940_941_908e-1;
const LG3: f64 = 2.857_142_874_366_239_149e-1;
const LG4: f64 = 2.222_219_843_214_978_396e-1;
const LG5: f64 = 1.818_357_216_161_805_012e-1;
const LG6: f64 = 1.531_383_769_920_937_332e-1;
const LG7: f64 = 1.479_819_860_511_658_591e-1;

pub fn log(x: f64) -> f64 {
    let mut x = x;
    let mut hx = high_word(x) as i32;
    let lx = low_word(x);
    let mut k = 0i32;
    if hx < 0x0010_0000 {
        // x < 2^-1022
        if ((hx & 0x7fff_ffff) as u32 | lx) == 0 {
            return f64::NEG_INFINITY; // log(±0)
        }
        if hx < 0 {
            return f64::NAN; // log(negative)
        }
        k -= 54;
        x *= TWO54; // subnormal: scale up
        hx = high_word(x) as i32;
    }
    if hx >= 0x7ff0_0000 {
        return x + x;
    }
    k += (hx >> 20) - 1023;
    hx &= 0x000f_ffff;
    let i = (hx + 0x95f64) & 0x10_0000;
    x = with_high_word(x, (hx | (i ^ 0x3ff0_0000)) as u32); // normalize x or x/2
    k += i >> 20;
    let f = x - 1.0;
    if (0x000f_ffff & (2 + hx)) < 3 {
        // -2^-20 <= f < 2^-20
        if f == 0.0 {
            if k == 0 {
                return 0.0;
            }
            let dk = f64::from(k);
            return dk * LN2_HI + dk * LN2_LO;
        }
        let r = f * f * (0.5 - 0.333_333_333_333_333_33 * f);
        if k == 0 {
            return f - r;
        }
        let dk = f64::from(k);
        return dk * LN2_HI - ((r - dk * LN2_LO) - f);
    }
    let s = f / (2.0 + f);
    let dk = f64::from(k);
    let z = s * s;
    let mut i = hx - 0x6147a;
    let w = z * z;
    let j = 0x6b851 - hx;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    i |= j;
    let r = t2 + t1;
    if i > 0 {
        let hfsq = 0.5 * f * f;
        if k == 0 {
            f - (hfsq - s * (hfsq + r))
        } else {
            dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
        }
    } else if k == 0 {
        f - s * (f - r)
    } else {
        dk * LN2_HI - ((s * (f - r) - dk * LN2_LO) - f)
    }
}

pub fn log1p(x: f64) -> f64 {
    let hx = high_word(x) as i32;
    let ax = hx & 0x7fff_ffff;
    let mut k = 1i32;
    let (mut f, mut c, mut hu) = (0.0, 0.0, 0i32);
    if hx < 0x3fda_827a {
        // 1 + x < sqrt(2)+
        if ax >= 0x3ff0_0000 {
            // x <= -1
            return if x == -1.0 {
                f64::NEG_INFINITY
            } else {
                f64::NAN
            };
        }
        if ax < 0x3e20_0000 {
            // |x| < 2^-29
            if ax < 0x3c90_0000 {
                return x; // |x| < 2^-54
            }
            return x - x * x * 0.5;
        }
        if hx > 0 || hx <= 0xbfd2_bec4_u32 as i32 {
            // sqrt(2)/2- <= 1 + x < sqrt(2)+
            k = 0;
            f = x;
            hu = 1;
        }
    }
    if hx >= 0x7ff0_0000 {
        return x + x;
    }
    if k != 0 {
        let mut u;
        if hx < 0x4340_0000 {
            u = 1.0 + x;
            hu = high_word(u) as i32;
            k = (hu >> 20) - 1023;
            c = if k > 0 { 1.0 - (u - x) } else { x - (u - 1.0) }; // correction term
            c /= u;
        } else {
            u = x;
            hu = high_word(u) as i32;
            k = (hu >> 20) - 1023;
            c = 0.0;
        }
        hu &= 0x000f_ffff;
        if hu < 0x6a09e {
            u = with_high_word(u, (hu | 0x3ff0_0000) as u32); // normalize u
        } else {
            k += 1;
            u = with_high_word(u, (hu | 0x3fe0_0000) as u32); // normalize u/2
            hu = (0x0010_0000 - hu) >> 2;
        }
        f = u - 1.0;
    }
    let hfsq = 0.5 * f * f;
    let dk = f64::from(k);
    if hu == 0 {
        // |f| < 2^-20
        if f == 0.0 {
            if k == 0 {
                return 0.0;
            }
            c += dk * LN2_LO;
            return dk * LN2_HI + c;
        }
        let r = hfsq * (1.0 - 0.666_666_666_666_666_66 * f);
        if k == 0 {
            return f - r;
        }
        return dk * LN2_HI - ((r - (dk * LN2_LO + c)) - f);
    }
    let s = f / (2.0 + f);
    let z = s * s;
    let r = z * (LG1 + z * (LG2 + z * (LG3 + z * (LG4 + z * (LG5 + z * (LG6 + z * LG7))))));
    if k == 0 {
        return f - (hfsq - s * (hfsq + r));
    }
    dk * LN2_HI - ((hfsq - (s * (hfsq + r) + (dk * LN2_LO + c))) - f)
}

pub fn log10(x: f64) -> f64 {
    const IVLN10: f64 = 4.342_944_819_032_518_166_68e-1;
    const LOG10_2HI: f64 = 3.010_299_956_636_117_713_06e-1;
    const LOG10_2LO: f64 = 3.694_239_077_158_930_786_16e-13;

    let mut x = x;
    let mut hx = high_word(x) as i32;
    let mut lx = low_word(x);
    let mut k = 0i32;
    if hx < 0x0010_0000 {
        if ((hx & 0x7fff_ffff) as u32 | lx) == 0 {
            return f64::NEG_INFINITY;
        }
        if hx < 0 {
            return f64::NAN;
        }
        k -= 54;
        x *= TWO54;
        hx = high_word(x) as i32;
        lx = low_word(x);
    }
    if hx >= 0x7ff0_0000 {
        return x + x;
    }
    if hx == 0x3ff0_0000 && lx == 0 {
        return 0.0;
    }
    k += (hx >> 20) - 1023;
    let i = ((k as u32) & 0x8000_0000) >> 31;
    hx = (hx & 0x000f_ffff) | ((0x3ff - i as i32) << 20);
    let y = f64::from(k + i as i32);
    x = from_words(hx as u32, lx);
    let z = y * LOG10_2LO + IVLN10 * log(x);
    z + y * LOG10_2HI
}

pub fn atan2(y: f64, x: f64) -> f64 {
    const TINY: f64 = 1.0e-300;
    const PI_O_4: f64 = 7.853_981_633_974_482_790_0e-1;
    const PI_O_2: f64 = 1.570_796_326_794_896_558_0;
    const PI: f64 = 3.141_592_653_589_793_116_0;
    const PI_LO: f64 = 1.224_646_799_147_353_177_2e-16;

    let (hx, lx) = (high_word(x) as i32, low_word(x));
    let (hy, ly) = (high_word(y) as i32, low_word(y));
    let ix = hx & 0x7fff_ffff;
    let iy = hy & 0x7fff_ffff;
    let nan_bit = |l: u32| ((l | l.wrapping_neg()) >> 31) as i32;
    if (ix | nan_bit(lx)) > 0x7ff0_0000 || (iy | nan_bit(ly)) > 0x7ff0_0000 {
        return x + y; // NaN
    }
    if (hx.wrapping_sub(0x3ff0_0000) as u32 | lx) == 0 {
        return atan(y); // x = 1
    }
    let mut m = ((hy >> 31) & 1) | ((hx >> 30) & 2); // 2 * sign(x) + sign(y)
    if (iy as u32 | ly) == 0 {
        match m {
            0 | 1 => return y,
            2 => return PI + TINY,
            _ => return -PI - TINY,
        }
    }
    if (ix as u32 | lx) == 0 {
        return if hy < 0 {
            -PI_O_2 - TINY
        } else {
            PI_O_2 + TINY
        };
    }
    if ix == 0x7ff0_0000 {
        if iy == 0x7ff0_0000 {
            return match m {
                0 => PI_O_4 + TINY,
                1 => -PI_O_4 - TINY,
                2 => 3.0 * PI_O_4 + TINY,
                _ => -3.0 * PI_O_4 - TINY,
            };
        }
        return match m {
            0 => 0.0,
            1 => -0.0,
            2 => PI + TINY,
            _ => -PI - TINY,
        };
    }
    if iy == 0x7ff0_0000 {
        return if hy < 0 {
            -PI_O_2 - TINY
        } else {
            PI_O_2 + TINY
        };
    }
    let k = (iy - ix) >> 20;
    let z = if k > 60 {
        m &= 1;
        PI_O_2 + 0.5 * PI_LO // |y/x| > 2^60
    } else if hx < 0 && k < -60 {
        0.0 // 0 > |y|/x > -2^-60
    } else {
        atan((y / x).abs())
    };
    match m {
        0 => z,
        1 => -z,
        2 => PI - (z - PI_LO),
        _ => (z - PI_LO) - PI,
    }
}

/// V8's `legacy::pow`: fdlibm's e_pow.c, except that its last rational step divides by
/// `(t1 - 2) - (w + z * w)` where fdlibm subtracts `w + z * w` after dividing. That is why
/// Node.js's `Math.pow` differs from every C library's in the last bit.
pub fn pow(x: f64, y: f64) -> f64 {
    const BP: [f64; 2] = [1.0, 1.5];
    const DP_H: [f64; 2] = [0.0, 5.849_624_872_207_641_601_56e-1];
    const DP_L: [f64; 2] = [0.0, 1.350_039_202_129_748_971_28e-8];
    const TWO53: f64 = 9_007_199_254_740_992.0;
    const HUGE: f64 = 1.0e300;
    const TINY: f64 = 1.0e-300;
    const L1: f64 = 5.999_999_999_999_946_487_25e-1;
    const L2: f64 = 4.285_714_285_785_501_842_52e-1;
    const L3: f64 = 3.333_333_298_183_774_329_18e-1;
    const L4: f64 = 2.727_281_238_085_340_064_89e-1;
    const L5: f64 = 2.306_607_457_755_617_540_67e-1;
    const L6: f64 = 2.069_750_178_003_384_177_84e-1;
    const P1: f64 = 1.666_666_666_666_660_190_37e-1;
    const P2: f64 = -2.777_777_777_701_559_338_42e-3;
    const P3: f64 = 6.613_756_321_437_934_361_17e-5;
    const P4: f64 = -1.653_390_220_546_525_153_90e-6;
    const P5: f64 = 4.138_136_797_057_238_460_39e-8;
    const LG2: f64 = 6.931_471_805_599_452_862_27e-1;
    const LG2_H: f64 = 6.931_471_824_645_996_093_75e-1;
    const LG2_L: f64 = -1.904_654_299_957_768_045_25e-9;
    const OVT: f64 = 8.008_566_259_537_294_437_2e-17;
    const CP: f64 = 9.617_966_939_259_755_543_29e-1;
    const CP_H: f64 = 9.617_967_009_544_372_558_59e-1;
    const CP_L: f64 = -7.028_461_650_952_758_265_16e-9;
    const IVLN2: f64 = 1.442_695_040_888_963_387_00;
    const IVLN2_H: f64 = 1.442_695_021_629_333_496_09;
    const IVLN2_L: f64 = 1.925_962_991_126_617_468_87e-8;

    let (hx, lx) = (high_word(x) as i32, low_word(x));
    let (hy, ly) = (high_word(y) as i32, low_word(y));
    let mut ix = hx & 0x7fff_ffff;
    let iy = hy & 0x7fff_ffff;

    if (iy as u32 | ly) == 0 {
        return 1.0; // x ** 0
    }
    if ix > 0x7ff0_0000
        || (ix == 0x7ff0_0000 && lx != 0)
        || iy > 0x7ff0_0000
        || (iy == 0x7ff0_0000 && ly != 0)
    {
        return x + y; // NaN
    }
    // yisint: 0 when y is not an integer, 1 when odd, 2 when even (only needed for x < 0)
    let mut yisint = 0;
    if hx < 0 {
        if iy >= 0x4340_0000 {
            yisint = 2;
        } else if iy >= 0x3ff0_0000 {
            let k = (iy >> 20) - 0x3ff;
            if k > 20 {
                let j = ly >> (52 - k);
                if (j << (52 - k)) == ly {
                    yisint = 2 - (j & 1) as i32;
                }
            } else if ly == 0 {
                let j = iy >> (20 - k);
                if (j << (20 - k)) == iy {
                    yisint = 2 - (j & 1);
                }
            }
        }
    }
    if ly == 0 {
        if iy == 0x7ff0_0000 {
            // y is ±inf
            return if (ix.wrapping_sub(0x3ff0_0000) as u32 | lx) == 0 {
                f64::NAN // (±1) ** ±inf
            } else if ix >= 0x3ff0_0000 {
                if hy >= 0 {
                    y
                } else {
                    0.0
                }
            } else if hy < 0 {
                -y
            } else {
                0.0
            };
        }
        if iy == 0x3ff0_0000 {
            return if hy < 0 { 1.0 / x } else { x };
        }
        if hy == 0x4000_0000 {
            return x * x;
        }
        if hy == 0x3fe0_0000 && hx >= 0 {
            return sqrt(x);
        }
    }
    let mut ax = x.abs();
    if lx == 0 && (ix == 0x7ff0_0000 || ix == 0 || ix == 0x3ff0_0000) {
        // x is ±0, ±inf or ±1
        let mut z = ax;
        if hy < 0 {
            z = 1.0 / z;
        }
        if hx < 0 {
            if ((ix - 0x3ff0_0000) | yisint) == 0 {
                z = f64::NAN; // (-1) ** non-integer
            } else if yisint == 1 {
                z = -z;
            }
        }
        return z;
    }
    let n = (hx >> 31) + 1;
    if (n | yisint) == 0 {
        return f64::NAN; // negative ** non-integer
    }
    let s = if (n | (yisint - 1)) == 0 { -1.0 } else { 1.0 };

    let (t1, t2);
    if iy > 0x41e0_0000 {
        // |y| > 2^31
        if iy > 0x43f0_0000 {
            // |y| > 2^64: over- or underflows
            if ix <= 0x3fef_ffff {
                return if hy < 0 { HUGE * HUGE } else { TINY * TINY };
            }
            if ix >= 0x3ff0_0000 {
                return if hy > 0 { HUGE * HUGE } else { TINY * TINY };
            }
        }
        if ix < 0x3fef_ffff {
            return if hy < 0 {
                s * HUGE * HUGE
            } else {
                s * TINY * TINY
            };
        }
        if ix > 0x3ff0_0000 {
            return if hy > 0 {
                s * HUGE * HUGE
            } else {
                s * TINY * TINY
            };
        }
        // |1 - x| <= 2^-20: log(x) by its series
        let t = ax - 1.0;
        let w = (t * t) * (0.5 - t * (0.333_333_333_333_333_333_333_3 - t * 0.25));
        let u = IVLN2_H * t;
        let v = t * IVLN2_L - w * IVLN2;
        t1 = with_low_word(u + v, 0);
        t2 = v - (t1 - u);
    } else {
        let mut n = 0;
        if ix < 0x0010_0000 {
            ax *= TWO53; // subnormal
            n -= 53;
            ix = high_word(ax) as i32;
        }
        n += (ix >> 20) - 0x3ff;
        let j = ix & 0x000f_ffff;
        ix = j | 0x3ff0_0000;
        let k = if j <= 0x3988e {
            0 // |x| < sqrt(3/2)
        } else if j < 0xbb67a {
            1 // |x| < sqrt(3)
        } else {
            n += 1;
            ix -= 0x0010_0000;
            0
        };
        ax = with_high_word(ax, ix as u32);

        // ss = s_h + s_l = (x - 1) / (x + 1) or (x - 1.5) / (x + 1.5)
        let u = ax - BP[k];
        let v = 1.0 / (ax + BP[k]);
        let ss = u * v;
        let s_h = with_low_word(ss, 0);
        let t_h = from_words(
            (((ix >> 1) | 0x2000_0000) + 0x0008_0000 + ((k as i32) << 18)) as u32,
            0,
        );
        let t_l = ax - (t_h - BP[k]);
        let s_l = v * ((u - s_h * t_h) - s_h * t_l);
        // log(ax)
        let mut s2 = ss * ss;
        let mut r = s2 * s2 * (L1 + s2 * (L2 + s2 * (L3 + s2 * (L4 + s2 * (L5 + s2 * L6)))));
        r += s_l * (s_h + ss);
        s2 = s_h * s_h;
        let t_h = with_low_word(3.0 + s2 + r, 0);
        let t_l = r - ((t_h - 3.0) - s2);
        let u = s_h * t_h;
        let v = s_l * t_h + t_l * ss;
        let p_h = with_low_word(u + v, 0);
        let p_l = v - (p_h - u);
        let z_h = CP_H * p_h;
        let z_l = CP_L * p_h + p_l * CP + DP_L[k];
        // log2(ax) = n + dp_h + z_h + z_l
        let t = f64::from(n);
        t1 = with_low_word(((z_h + z_l) + DP_H[k]) + t, 0);
        t2 = z_l - (((t1 - t) - DP_H[k]) - z_h);
    }

    // (y1 + y2) * (t1 + t2)
    let y1 = with_low_word(y, 0);
    let p_l = (y - y1) * t1 + y * t2;
    let mut p_h = y1 * t1;
    let z = p_l + p_h;
    let (j, i) = (high_word(z) as i32, low_word(z));
    if j >= 0x4090_0000 {
        // z >= 1024
        if ((j - 0x4090_0000) as u32 | i) != 0 || p_l + OVT > z - p_h {
            return s * HUGE * HUGE;
        }
    } else if (j & 0x7fff_ffff) >= 0x4090_cc00 {
        // z <= -1075
        if ((j as u32).wrapping_sub(0xc090_cc00) | i) != 0 || p_l <= z - p_h {
            return s * TINY * TINY;
        }
    }
    // 2 ** (p_h + p_l)
    let i = j & 0x7fff_ffff;
    let mut k = (i >> 20) - 0x3ff;
    let mut n = 0;
    if i > 0x3fe0_0000 {
        // |z| > 0.5: n = [z + 0.5]
        n = j + (0x0010_0000 >> (k + 1));
        k = ((n & 0x7fff_ffff) >> 20) - 0x3ff;
        let t = from_words((n & !(0x000f_ffff >> k)) as u32, 0);
        n = ((n & 0x000f_ffff) | 0x0010_0000) >> (20 - k);
        if j < 0 {
            n = -n;
        }
        p_h -= t;
    }
    let t = with_low_word(p_l + p_h, 0);
    let u = t * LG2_H;
    let v = (p_l - (t - p_h)) * LG2 + t * LG2_L;
    let mut z = u + v;
    let w = v - (z - u);
    let t = z * z;
    let t1 = z - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
    let r = (z * t1) / ((t1 - 2.0) - (w + z * w)); // V8's grouping, not fdlibm's
    z = 1.0 - (r - z);
    let j = (high_word(z) as i32).wrapping_add(((n as u32) << 20) as i32);
    if (j >> 20) <= 0 {
        z = scalbn(z, n); // subnormal result
    } else {
        z = with_high_word(z, j as u32);
    }
    s * z
}

pub fn sin(x: f64) -> f64 {
    let ix = high_word(x) & 0x7fff_ffff;
    if ix <= 0x3fe9_21fb {
        return kernel_sin(x, 0.0, false); // |x| <= pi/4
    }
    if ix >= 0x7ff0_0000 {
        return x - x; // NaN
    }
    let (n, y0, y1) = rem_pio2(x);
    match n & 3 {
        0 => kernel_sin(y0, y1, true),
        1 => kernel_cos(y0, y1),
        2 => -kernel_sin(y0, y1, true),
        _ => -kernel_cos(y0, y1),
    }
}

pub fn cos(x: f64) -> f64 {
    let ix = high_word(x) & 0x7fff_ffff;
    if ix <= 0x3fe9_21fb {
        return kernel_cos(x, 0.0);
    }
    if ix >= 0x7ff0_0000 {
        return x - x;
    }
    let (n, y0, y1) = rem_pio2(x);
    match n & 3 {
        0 => kernel_cos(y0, y1),
        1 => -kernel_sin(y0, y1, true),
        2 => -kernel_cos(y0, y1),
        _ => kernel_sin(y0, y1, true),
    }
}

/// sin on [-pi/4, pi/4]; `y` is the tail of `x` (used when `has_tail`).
fn kernel_sin(x: f64, y: f64, has_tail: bool) -> f64 {
    const HALF: f64 = 0.5;
    const S1: f64 = -1.666_666_666_666_663_243_48e-1;
    const S2: f64 = 8.333_333_333_322_489_461_24e-3;
    const S3: f64 = -1.984_126_982_985_794_931_34e-4;
    const S4: f64 = 2.755_731_370_707_006_767_89e-6;
    const S5: f64 = -2.505_076_025_340_686_341_95e-8;
    const S6: f64 = 1.589_690_995_211_550_102_21e-10;

    let ix = high_word(x) & 0x7fff_ffff;
    if ix < 0x3e40_0000 {
        return x; // |x| < 2^-27
    }
    let z = x * x;
    let v = z * x;
    let r = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    if has_tail {
        x - ((z * (HALF * y - v * r) - y) - v * S1)
    } else {
        x + v * (S1 + z * r)
    }
}

/// cos on [-pi/4, pi/4] in fdlibm 5.3's form (the `qx` split that FreeBSD later dropped).
fn kernel_cos(x: f64, y: f64) -> f64 {
    const C1: f64 = 4.166_666_666_666_660_190_37e-2;
    const C2: f64 = -1.388_888_888_887_410_957_49e-3;
    const C3: f64 = 2.480_158_728_947_672_941_78e-5;
    const C4: f64 = -2.755_731_435_139_066_330_35e-7;
    const C5: f64 = 2.087_572_321_298_174_827_90e-9;
    const C6: f64 = -1.135_964_755_778_819_482_65e-11;

    let ix = high_word(x) & 0x7fff_ffff;
    if ix < 0x3e40_0000 {
        return 1.0; // |x| < 2^-27
    }
    let z = x * x;
    let r = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    if ix < 0x3fd3_3333 {
        return 1.0 - (0.5 * z - (z * r - x * y)); // |x| < 0.3
    }
    let qx = if ix > 0x3fe9_0000 {
        0.28125 // |x| > 0.78125
    } else {
        from_words(ix - 0x0020_0000, 0) // |x| / 4
    };
    let hz = 0.5 * z - qx;
    let a = 1.0 - qx;
    a - (hz - (z * r - x * y))
}

/// 2/pi in 24-bit pieces (396 hex digits).
const TWO_OVER_PI: [i32; 66] = [
    0xa2f983, 0x6e4e44, 0x1529fc, 0x2757d1, 0xf534dd, 0xc0db62, 0x95993c, 0x439041, 0xfe5163,
    0xabdebb, 0xc561b7, 0x246e3a, 0x424dd2, 0xe00649, 0x2eea09, 0xd1921c, 0xfe1deb, 0x1cb129,
    0xa73ee8, 0x8235f5, 0x2ebb44, 0x84e99c, 0x7026b4, 0x5f7e41, 0x3991d6, 0x398353, 0x39f49c,
    0x845f8b, 0xbdf928, 0x3b1ff8, 0x97ffde, 0x05980f, 0xef2f11, 0x8b5a0a, 0x6d1f6d, 0x367ecf,
    0x27cb09, 0xb74f46, 0x3f669e, 0x5fea2d, 0x7527ba, 0xc7ebe5, 0xf17b3d, 0x0739f7, 0x8a5292,
    0xea6bfb, 0x5fb11f, 0x8d5d08, 0x560330, 0x46fc7b, 0x6babf0, 0xcfbc20, 0x9af436, 0x1da9e3,
    0x91615e, 0xe61b08, 0x659985, 0x5f14a0, 0x68408d, 0xffd880, 0x4d7327, 0x310606, 0x1556ca,
    0x73a8c9, 0x60e27b, 0xc08c6b,
];

/// High words of n * pi/2 for n = 1..32.
const NPIO2_HW: [i32; 32] = [
    0x3ff921fb, 0x400921fb, 0x4012d97c, 0x401921fb, 0x401f6a7a, 0x4022d97c, 0x4025fdbb, 0x402921fb,
    0x402c463a, 0x402f6a7a, 0x4031475c, 0x4032d97c, 0x40346b9c, 0x4035fdbb, 0x40378fdb, 0x403921fb,
    0x403ab41b, 0x403c463a, 0x403dd85a, 0x403f6a7a, 0x40407e4c, 0x4041475c, 0x4042106c, 0x4042d97c,
    0x4043a28c, 0x40446b9c, 0x404534ac, 0x4045fdbb, 0x4046c6cb, 0x40478fdb, 0x404858eb, 0x404921fb,
];

/// `x` less the nearest multiple n of pi/2: (n, head, tail).
fn rem_pio2(x: f64) -> (i32, f64, f64) {
    const INVPIO2: f64 = 6.366_197_723_675_813_824_33e-1;
    const PIO2_1: f64 = 1.570_796_326_734_125_614_17;
    const PIO2_1T: f64 = 6.077_100_506_506_192_249_32e-11;
    const PIO2_2: f64 = 6.077_100_506_303_965_976_60e-11;
    const PIO2_2T: f64 = 2.022_266_248_795_950_631_54e-21;
    const PIO2_3: f64 = 2.022_266_248_711_166_455_80e-21;
    const PIO2_3T: f64 = 8.478_427_660_368_899_569_97e-32;

    let hx = high_word(x) as i32;
    let ix = hx & 0x7fff_ffff;
    if ix <= 0x3fe9_21fb {
        return (0, x, 0.0);
    }
    if ix < 0x4002_d97c {
        // |x| < 3pi/4: n = ±1
        return if hx > 0 {
            let z = x - PIO2_1;
            if ix != 0x3ff9_21fb {
                let y0 = z - PIO2_1T;
                (1, y0, (z - y0) - PIO2_1T)
            } else {
                let z = z - PIO2_2; // near pi/2: 33 + 33 + 53 bits of pi
                let y0 = z - PIO2_2T;
                (1, y0, (z - y0) - PIO2_2T)
            }
        } else {
            let z = x + PIO2_1;
            if ix != 0x3ff9_21fb {
                let y0 = z + PIO2_1T;
                (-1, y0, (z - y0) + PIO2_1T)
            } else {
                let z = z + PIO2_2;
                let y0 = z + PIO2_2T;
                (-1, y0, (z - y0) + PIO2_2T)
            }
        };
    }
    if ix <= 0x4139_21fb {
        // |x| <= 2^19 pi/2: medium size
        let t = x.abs();
        let n = (t * INVPIO2 + 0.5) as i32;
        let f_n = f64::from(n);
        let mut r = t - f_n * PIO2_1;
        let mut w = f_n * PIO2_1T; // good to 85 bits
        let mut y0;
        if n < 32 && ix != NPIO2_HW[(n - 1) as usize] {
            y0 = r - w;
        } else {
            let j = ix >> 20;
            y0 = r - w;
            let mut i = j - ((high_word(y0) >> 20) & 0x7ff) as i32;
            if i > 16 {
                // a second iteration, good to 118 bits
                let t = r;
                w = f_n * PIO2_2;
                r = t - w;
                w = f_n * PIO2_2T - ((t - r) - w);
                y0 = r - w;
                i = j - ((high_word(y0) >> 20) & 0x7ff) as i32;
                if i > 49 {
                    // a third, 151 bits
                    let t = r;
                    w = f_n * PIO2_3;
                    r = t - w;
                    w = f_n * PIO2_3T - ((t - r) - w);
                    y0 = r - w;
                }
            }
        }
        let y1 = (r - y0) - w;
        return if hx < 0 { (-n, -y0, -y1) } else { (n, y0, y1) };
    }
    if ix >= 0x7ff0_0000 {
        let nan = x - x;
        return (0, nan, nan);
    }
    // Large arguments: |x| split into three 24-bit pieces, scaled.
    let e0 = (ix >> 20) - 1046; // ilogb(z) - 23
    let mut z = from_words((ix - (e0 << 20)) as u32, low_word(x));
    let mut tx = [0.0; 3];
    for piece in tx.iter_mut().take(2) {
        *piece = f64::from(z as i32);
        z = (z - *piece) * TWO24;
    }
    tx[2] = z;
    let mut nx = 3;
    while tx[nx - 1] == 0.0 {
        nx -= 1;
    }
    let mut y = [0.0; 3];
    let n = kernel_rem_pio2(&tx[..nx], &mut y, e0, 2);
    if hx < 0 {
        (-n, -y[0], -y[1])
    } else {
        (n, y[0], y[1])
    }
}

/// fdlibm's `__kernel_rem_pio2` for `prec` 2 (64 bits, as fdlibm 5.3 and V8 call it): `x` is
/// |input| in 24-bit pieces scaled by 2^e0; returns n mod 8 and the remainder in `y[0] + y[1]`.
fn kernel_rem_pio2(x: &[f64], y: &mut [f64; 3], e0: i32, prec: usize) -> i32 {
    const INIT_JK: [i32; 4] = [2, 3, 4, 6];
    const PIO2: [f64; 8] = [
        1.570_796_251_296_997_070_31,
        7.549_789_415_861_596_353_35e-8,
        5.390_302_529_957_764_765_54e-15,
        3.282_003_415_807_912_941_23e-22,
        1.270_655_753_080_676_073_49e-29,
        1.229_333_089_811_113_289_32e-36,
        2.733_700_538_164_645_596_24e-44,
        2.167_416_838_778_048_194_44e-51,
    ];

    let nx = x.len() as i32;
    let jk = INIT_JK[prec];
    let jp = jk;
    let jx = nx - 1;
    let jv = ((e0 - 3) / 24).max(0);
    let mut q0 = e0 - 24 * (jv + 1);

    let mut f = [0.0f64; 20];
    let mut q = [0.0f64; 20];
    let mut fq = [0.0f64; 20];
    let mut iq = [0i32; 20];

    for (j, slot) in (jv - jx..).zip(f.iter_mut().take((jx + jk + 1) as usize)) {
        *slot = if j < 0 {
            0.0
        } else {
            f64::from(TWO_OVER_PI[j as usize])
        };
    }
    for i in 0..=jk {
        let mut fw = 0.0;
        for j in 0..=jx {
            fw += x[j as usize] * f[(jx + i - j) as usize];
        }
        q[i as usize] = fw;
    }

    let mut jz = jk;
    let (mut n, mut ih, mut z);
    loop {
        // distill q[] into iq[], in reverse
        z = q[jz as usize];
        let mut i = 0usize;
        let mut j = jz;
        while j > 0 {
            let fw = f64::from((TWON24 * z) as i32);
            iq[i] = (z - TWO24 * fw) as i32;
            z = q[(j - 1) as usize] + fw;
            i += 1;
            j -= 1;
        }
        z = scalbn(z, q0);
        z -= 8.0 * floor(z * 0.125); // integer part >= 8 trimmed off
        n = z as i32;
        z -= f64::from(n);
        ih = 0;
        if q0 > 0 {
            // iq[jz-1] holds part of n
            let last = (jz - 1) as usize;
            let i = iq[last] >> (24 - q0);
            n += i;
            iq[last] -= i << (24 - q0);
            ih = iq[last] >> (23 - q0);
        } else if q0 == 0 {
            ih = iq[(jz - 1) as usize] >> 23;
        } else if z >= 0.5 {
            ih = 2;
        }

        if ih > 0 {
            // q > 0.5
            n += 1;
            let mut carry = 0;
            for digit in iq.iter_mut().take(jz as usize) {
                let j = *digit;
                if carry == 0 {
                    if j != 0 {
                        carry = 1;
                        *digit = 0x100_0000 - j;
                    }
                } else {
                    *digit = 0xff_ffff - j;
                }
            }
            if q0 > 0 {
                let last = (jz - 1) as usize;
                match q0 {
                    1 => iq[last] &= 0x7f_ffff,
                    2 => iq[last] &= 0x3f_ffff,
                    _ => {}
                }
            }
            if ih == 2 {
                z = 1.0 - z;
                if carry != 0 {
                    z -= scalbn(1.0, q0);
                }
            }
        }

        // recompute with more terms when the remainder vanished
        if z == 0.0 {
            let mut j = 0;
            let mut i = jz - 1;
            while i >= jk {
                j |= iq[i as usize];
                i -= 1;
            }
            if j == 0 {
                let mut k = 1;
                while jk >= k && iq[(jk - k) as usize] == 0 {
                    k += 1;
                }
                for i in (jz + 1)..=(jz + k) {
                    f[(jx + i) as usize] = f64::from(TWO_OVER_PI[(jv + i) as usize]);
                    let mut fw = 0.0;
                    for j in 0..=jx {
                        fw += x[j as usize] * f[(jx + i - j) as usize];
                    }
                    q[i as usize] = fw;
                }
                jz += k;
                continue;
            }
        }
        break;
    }

    // chop off zero terms
    if z == 0.0 {
        jz -= 1;
        q0 -= 24;
        while iq[jz as usize] == 0 {
            jz -= 1;
            q0 -= 24;
        }
    } else {
        // break z into 24-bit pieces if needed
        z = scalbn(z, -q0);
        if z >= TWO24 {
            let fw = f64::from((TWON24 * z) as i32);
            iq[jz as usize] = (z - TWO24 * fw) as i32;
            jz += 1;
            q0 += 24;
            iq[jz as usize] = fw as i32;
        } else {
            iq[jz as usize] = z as i32;
        }
    }

    // the integer pieces back to floating point
    let mut fw = scalbn(1.0, q0);
    let mut i = jz;
    while i >= 0 {
        q[i as usize] = fw * f64::from(iq[i as usize]);
        fw *= TWON24;
        i -= 1;
    }

    // PIo2[0..=jp] * q[jz..=0]
    let mut i = jz;
    while i >= 0 {
        let mut fw = 0.0;
        let mut k = 0;
        while k <= jp && k <= jz - i {
            fw += PIO2[k as usize] * q[(i + k) as usize];
            k += 1;
        }
        fq[(jz - i) as usize] = fw;
        i -= 1;
    }

    // compress fq[] into y[] (prec 1 and 2)
    let mut fw = 0.0;
    let mut i = jz;
    while i >= 0 {
        fw += fq[i as usize];
        i -= 1;
    }
    y[0] = if ih == 0 { fw } else { -fw };
    let mut fw = fq[0] - fw;
    for value in fq.iter().take(jz as usize + 1).skip(1) {
        fw += *value;
    }
    y[1] = if ih == 0 { fw } else { -fw };
    n & 7
}
