// Math.* inputs and the kernel that evaluates them, shared by Node.js and edgegate's QuickJS.
//
//   node math.js gen SEED COUNT inputs.bin     COUNT inputs per function, seeded
//   node math.js run inputs.bin results.bin    Node's results (the reference)
//
// tests/differential.rs evaluates the same file in QuickJS and compares results bit for bit.
// inputs.bin: for each function of FUNCTIONS in order, COUNT (x, y) pairs of little-endian
// doubles; results.bin: one double per pair.
'use strict';

var FUNCTIONS = [
  'acos', 'acosh', 'asin', 'asinh', 'atan', 'atanh', 'cbrt', 'cos', 'cosh', 'exp', 'expm1',
  'log', 'log10', 'log1p', 'log2', 'sin', 'sinh', 'sqrt', 'tan', 'tanh',
  'pow', '**', 'atan2', 'hypot', 'hypot3',
];

// Exponent ranges (base 2) where each function's interesting values lie; the generator also
// draws from the whole double range and from EDGES.
var RANGES = {
  acos: [-30, 0], asin: [-30, 0], atanh: [-30, 0], acosh: [0, 40], asinh: [-40, 40],
  atan: [-40, 60], cbrt: [-1074, 1023], cos: [-30, 70], sin: [-30, 70], tan: [-30, 70],
  cosh: [-30, 10], sinh: [-30, 10], tanh: [-30, 6], exp: [-30, 10], expm1: [-60, 10],
  log: [-1074, 1023], log10: [-1074, 1023], log1p: [-60, 60], log2: [-1074, 1023],
  sqrt: [-1074, 1023], pow: [-12, 12], '**': [-12, 12], atan2: [-60, 60], hypot: [-600, 600],
  hypot3: [-600, 600],
};

var EDGES = [
  0, -0, Infinity, -Infinity, NaN, 1, -1, 0.5, -0.5, 2, -2, 3, 10, 0.1, 1e-7, 1e21, 1e22, 1e300,
  5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308,
  -1.7976931348623157e308, 9007199254740992, 9007199254740993, 9007199254740991,
  -9007199254740992, 4503599627370496, 4503599627370495.5, Math.PI, Math.PI / 2, Math.PI / 4,
  Math.E, Math.LN2, Math.LN2 / 2, 22, 709.782712893384, 709.7822265625, 710.4758600739439,
  710.475860073944, -745.1332191019412, 1 - 1e-16, 1 + 2.220446049250313e-16,
  3.725290298461914e-9, 2.7755575615628914e-17, 0.34657359027997264, 1e-300, 255, 256, 65535,
];

// splitmix32-like generator: deterministic on every engine (integer math only).
function rng(seed) {
  var s = seed >>> 0;
  return function () {
    s = (s + 0x9e3779b9) >>> 0;
    var z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

var scratch = new DataView(new ArrayBuffer(8));

function randomBits(next) {
  scratch.setUint32(0, next());
  scratch.setUint32(4, next());
  return scratch.getFloat64(0);
}

// ±2^e × (1 + fraction) for e in [lo, hi], with a random 52-bit fraction.
function inRange(next, range) {
  var e = range[0] + (next() % (range[1] - range[0] + 1));
  var fraction = (next() * 4294967296 + (next() & 0xfffff000)) / 18446744073709551616;
  var x = (1 + fraction) * Math.pow(2, e); // exact: a power of two times a 53-bit significand
  return next() & 1 ? -x : x;
}

function draw(next, name) {
  var pick = next() % 100;
  if (pick < 8) return EDGES[next() % EDGES.length];
  if (pick < 20) return randomBits(next);
  if (pick < 30) return (next() % 2001) - 1000; // small integers, as decoders use them
  if (pick < 36) return ((next() % 20001) - 10000) / 100; // two-decimal readings
  return inRange(next, RANGES[name]);
}

function drawExponent(next) {
  var pick = next() % 100;
  if (pick < 30) return (next() % 41) - 20;
  if (pick < 40) return [0.5, -0.5, 1 / 3, 0.25, 1.5, 2.5][next() % 6];
  return draw(next, 'pow');
}

function generate(seed, count) {
  var next = rng(seed);
  var inputs = new Float64Array(FUNCTIONS.length * count * 2);
  var k = 0;
  for (var f = 0; f < FUNCTIONS.length; f++) {
    var name = FUNCTIONS[f];
    for (var i = 0; i < count; i++) {
      var x = draw(next, name);
      var y = name === 'pow' || name === '**' ? drawExponent(next) : draw(next, name);
      inputs[k++] = x;
      inputs[k++] = y;
    }
  }
  return inputs;
}

// Evaluates every function on its inputs. The calls are written out, not looked up, so that
// `**` and each Math function go through the engine's own paths.
function evaluate(inputs) {
  var count = inputs.length / 2 / FUNCTIONS.length;
  var out = new Float64Array(inputs.length / 2);
  for (var f = 0; f < FUNCTIONS.length; f++) {
    var one = unary(FUNCTIONS[f]);
    var two = binary(FUNCTIONS[f]);
    for (var i = f * count; i < (f + 1) * count; i++) {
      var x = inputs[2 * i], y = inputs[2 * i + 1];
      out[i] = one ? one(x) : two(x, y);
    }
  }
  return out;
}

function unary(name) {
  switch (name) {
    case 'pow': case '**': case 'atan2': case 'hypot': case 'hypot3': return null;
    default: return Math[name];
  }
}

function binary(name) {
  switch (name) {
    case 'pow': return function (x, y) { return Math.pow(x, y); };
    case '**': return function (x, y) { return x ** y; };
    case 'atan2': return function (x, y) { return Math.atan2(x, y); };
    case 'hypot': return function (x, y) { return Math.hypot(x, y); };
    case 'hypot3': return function (x, y) { return Math.hypot(x, y, x * 0.75 + 1); };
    default: return null;
  }
}

if (typeof module !== 'undefined') {
  module.exports = { rng: rng }; // programs.js draws from the same generator
}

if (typeof process !== 'undefined' && typeof require !== 'undefined' && require.main === module) {
  var fs = require('fs');
  var args = process.argv.slice(2);
  var bytes = function (a) { return Buffer.from(a.buffer, a.byteOffset, a.byteLength); };
  var doubles = function (b) { return new Float64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length)); };
  if (args[0] === 'gen') {
    fs.writeFileSync(args[3], bytes(generate(Number(args[1]), Number(args[2]))));
  } else if (args[0] === 'run') {
    fs.writeFileSync(args[2], bytes(evaluate(doubles(fs.readFileSync(args[1])))));
  } else {
    process.stderr.write('usage: node math.js gen SEED COUNT FILE | run INPUTS RESULTS\n');
    process.exit(2);
  }
}
