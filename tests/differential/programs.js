// Random ThingsBoard decoders and Node.js as the reference for what they return.
//
//   node programs.js gen SEED COUNT cases.jsonl       COUNT seeded random decoders and payloads
//   node programs.js run cases.jsonl results.jsonl    Node's results (the reference)
//
// A case is {id, body, payload (base64)}: `body` is the body of ThingsBoard's
// `function Decoder(payload, metadata)`. A result line is {id, raw, kafka} where `raw` is
// JSON.stringify of what the decoder returned ("threw" if it threw, "undefined" for undefined)
// and `kafka` the record edgegate must produce from it (normalized as README describes) or null.
// tests/differential.rs runs the same cases through edgegate's converter and compares both texts
// byte for byte.
'use strict';

var fs = require('fs');
var vm = require('vm');

// Captured time edgegate stamps telemetry without ts with; the same on both sides.
var CAPTURED_MS = 1764756000000;

// The helpers edgegate's converter defines for scripts (src/converter/engine.rs, PRELUDE).
var PRELUDE = [
  'globalThis.decodeToString = function decodeToString(payload) {',
  "  var s = '';",
  '  for (var i = 0; i < payload.length; i += 8192) {',
  '    s += String.fromCharCode.apply(String, payload.slice(i, i + 8192));',
  '  }',
  '  return s;',
  '};',
  'globalThis.decodeToJson = function decodeToJson(payload) {',
  '  return JSON.parse(decodeToString(payload));',
  '};',
].join('\n');

var rng = require('./math.js').rng;

function Gen(next) {
  this.next = next;
}
Gen.prototype.int = function (n) { return this.next() % n; };
Gen.prototype.pick = function (list) { return list[this.int(list.length)]; };
Gen.prototype.chance = function (percent) { return this.int(100) < percent; };

var UNARY = ['acos', 'acosh', 'asin', 'asinh', 'atan', 'atanh', 'cbrt', 'cos', 'cosh', 'exp',
  'expm1', 'log', 'log10', 'log1p', 'log2', 'sin', 'sinh', 'sqrt', 'tan', 'tanh', 'round',
  'floor', 'ceil', 'trunc', 'abs', 'sign', 'fround', 'clz32'];

// Number literals as people and devices write them.
Gen.prototype.literal = function () {
  switch (this.int(9)) {
    case 0: return String(this.int(100));
    case 1: return String(this.int(100000) - 50000);
    case 2: return (this.int(200000) / 1000).toString();
    case 3: return this.int(10) + '.' + this.int(1000000);
    case 4: return (1 + this.int(9)) + 'e' + (this.int(60) - 30);
    case 5: return this.pick(['0.1', '0.2', '0.3', '1e21', '1e-7', '123456789012345678901',
      '9007199254740993', '5e-324', '1.7976931348623157e308', '4.35', '1.005', '0.000001',
      '2.5', '-0', '0.5', '1e300', '100', '255']);
    case 6: return String(this.int(2) ? 9007199254740992 + this.int(10) : -(this.int(1e9)));
    case 7: return (this.int(1e6) / 7).toString();
    default: return String(this.int(1000) / 100);
  }
};

// A numeric expression over the payload `b` (length >= 8) and, for JSON payloads, `d`.
Gen.prototype.num = function (depth, json) {
  var g = this;
  var i = function () { return g.int(8); };
  if (depth <= 0 || g.chance(25)) {
    switch (g.int(json ? 9 : 7)) {
      case 0: return 'b[' + i() + ']';
      case 1: return '(b[' + i() + '] << 8 | b[' + i() + '])';
      case 2: return '(b[' + i() + '] << 24 | b[' + i() + '] << 16 | b[' + i() + '] << 8 | b[' + i() + '])';
      case 3: return 'new DataView(new Uint8Array([b[0], b[1], b[2], b[3]]).buffer).getFloat32(0, ' + (g.int(2) === 1) + ')';
      case 4: return 'new DataView(new Uint8Array(b.slice(0, 8)).buffer).getFloat64(0, ' + (g.int(2) === 1) + ')';
      case 5: return g.literal();
      case 6: return '(' + g.literal() + ')';
      case 7: return 'd.n';
      default: return 'd.m[' + g.int(3) + ']';
    }
  }
  var a = g.num(depth - 1, json);
  switch (g.int(24)) {
    case 0: return '-(' + a + ')';
    case 1: case 2: case 3: return 'Math.' + g.pick(UNARY) + '(' + a + ')';
    case 4: return 'parseFloat((' + a + ').toFixed(' + g.int(21) + '))';
    case 5: return 'Number((' + a + ').toPrecision(' + (1 + g.int(21)) + '))';
    case 6: return 'parseFloat(String(' + a + '))';
    case 7: return '+((' + a + ').toExponential(' + g.int(21) + '))';
    case 8: return 'parseInt(String(' + a + '), ' + g.pick([10, 16, 2, 36]) + ')';
    case 9: return '(' + a + ') / ' + g.pick(['10', '100', '1000', '3', '7', '1.8']);
    case 10: return '(' + a + ') * ' + g.pick(['0.1', '0.01', '1.8', '0.0625', '3.3', '1e-3']);
    case 11: return 'Math.round((' + a + ') * 100) / 100';
    case 12: return '(' + a + ') ' + g.pick(['+', '-', '*', '/', '%']) + ' (' + g.num(depth - 1, json) + ')';
    case 13: return '(' + a + ') ** (' + g.pick(['2', '0.5', '3', '-1', '1.5', '10', g.num(depth - 1, json)]) + ')';
    case 14: return 'Math.pow(' + a + ', ' + g.num(depth - 1, json) + ')';
    case 15: return 'Math.pow(' + g.pick(['10', '2', '1.1', '0.5', 'Math.E']) + ', ' + a + ')';
    case 16: return 'Math.atan2(' + a + ', ' + g.num(depth - 1, json) + ')';
    case 17: {
      var args = [a];
      for (var h = g.int(8); h >= 0; h--) args.push(g.num(depth - 1, json));
      return 'Math.hypot(' + args.join(', ') + ')';
    }
    case 18: return 'Math.' + g.pick(['min', 'max']) + '(' + a + ', ' + g.num(depth - 1, json) + ')';
    case 19: return '((' + a + ') ' + g.pick(['&', '|', '^', '>>', '>>>', '<<']) + ' ' + g.int(33) + ')';
    case 20: return 'Number(' + g.str(depth - 1, json) + ')';
    case 21: return g.int(2) ? 'parseFloat(' + g.str(depth - 1, json) + ')' : g.parseIntText();
    case 22: return g.date(depth - 1, json);
    default: return '((' + a + ') - 32) * 5 / 9';
  }
};

var DATE_TEXTS = [
  '2026-12-03T10:20:30Z', '2026-12-03T10:20:30.123Z', '2026-12-03T10:20:30.123+02:00',
  '2026-12-03T10:20:30-05:30', '2026-12-03', '2026-12', '2026', '2026-12-03T10:20:30',
  '2026-12-03T10:20', '2026-12-03 10:20:30', '2026/12/03 10:20:30', '2026/12/03',
  'Dec 3, 2026 10:20:30', 'December 3, 2026', 'Thu, 03 Dec 2026 10:20:30 GMT',
  'Thu Dec 03 2026 10:20:30 GMT+0100', '03 Dec 2026 10:20:30 +0000', '2026-02-30T00:00:00Z',
  '2026-13-01T00:00:00Z', '+002026-12-03T00:00:00Z', '1970-01-01T00:00:00.000Z',
  '2026-12-03T24:00:00Z', 'not a date', '', '1e3', '12/03/2026', '2026-12-03T10:20:30.1234567Z',
];

Gen.prototype.date = function (depth, json) {
  var g = this;
  switch (g.int(6)) {
    case 0: return 'new Date(' + g.pick(DATE_TEXTS.map(JSON.stringify)) + ').getTime()';
    case 1: return 'Date.UTC(' + [2026 + g.int(60) - 30, g.int(14) - 1, g.int(33), g.int(25), g.int(61), g.int(61), g.int(1000)].join(', ') + ')';
    case 2: return 'new Date(' + [2026 + g.int(10), g.int(12), 1 + g.int(28), g.int(24), g.int(60)].join(', ') + ').getTime()';
    case 3: return 'new Date(' + g.int(4000000) * 1000000 + ').' + g.pick(['getTimezoneOffset', 'getHours', 'getUTCDay', 'getMonth', 'getFullYear', 'getDate', 'getMinutes', 'getDay']) + '()';
    case 4: return 'Date.parse(' + g.pick(DATE_TEXTS.map(JSON.stringify)) + ')';
    default: return 'new Date((' + g.num(depth, json) + ') * 1000).getTime()';
  }
};

// A string expression.
Gen.prototype.str = function (depth, json) {
  var g = this;
  var a = g.num(Math.max(depth, 0), json);
  switch (g.int(16)) {
    case 0: return 'String(' + a + ')';
    case 1: return '(' + a + ').toFixed(' + g.int(21) + ')';
    case 2: return '(' + a + ').toPrecision(' + (1 + g.int(21)) + ')';
    case 3: return '(' + a + ').toExponential(' + g.int(21) + ')';
    case 4: return '(' + a + ').toString(' + g.pick([2, 8, 16, 36, 10, 3]) + ')';
    case 5: return 'JSON.stringify(' + a + ')';
    case 6: return "'' + (" + a + ')';
    case 7: return 'new Date(' + g.int(4000000) * 1000000 + ').toISOString()';
    case 8: return 'new Date(' + g.pick(DATE_TEXTS.slice(0, 12).map(JSON.stringify)) + ').toISOString()';
    case 9: return 'new Date(Date.UTC(' + [2026, g.int(12), 1 + g.int(28), g.int(24)].join(', ') + ')).toJSON()';
    case 10: return JSON.stringify(g.pick([' 12.5abc', '1e400', '-0', '.5', '5.', '0x10', 'Infinity',
      '1_000', '  -3.25e-2 ', '0b101', '', '12,5', '+7', '1e-400', '00012', '3.14.15']));
    case 11: return 'decodeToString(payload).slice(0, ' + g.int(8) + ')';
    case 12: return g.int(2) ? '(' + a + ').toLocaleString()' : '(' + a + ').toExponential()';
    case 13: return 'JSON.stringify({v: ' + a + ', w: [' + g.num(0, json) + ']})';
    case 14: return g.int(2) ? 'String.fromCharCode(' + a + ' & 0xffff)'
      : 'new Date(' + (g.int(8000000) - 2000000) * 1000000 + ').' + g.pick(['toString', 'toTimeString',
        'toDateString', 'toUTCString', 'toLocaleString', 'toLocaleDateString', 'toLocaleTimeString', 'toJSON']) + '()';
    default: return '[' + a + ', ' + g.num(0, json) + '].join(";")';
  }
};

// parseInt of a digit string in any radix, with leading zeros at times: V8 rounds the radices
// other than 2, 4, 8, 10, 16 and 32 its own way.
Gen.prototype.parseIntText = function () {
  var radix = 2 + this.int(35);
  var alphabet = '0123456789abcdefghijklmnopqrstuvwxyz'.slice(0, radix);
  var text = this.int(3) === 0 ? '000'.slice(0, 1 + this.int(3)) : '';
  for (var n = 1 + this.int(40); n > 0; n--) text += alphabet[this.int(radix)];
  if (this.int(4) === 0) text = '-' + text;
  return 'parseInt(' + JSON.stringify(text) + ', ' + radix + ')';
};

Gen.prototype.payload = function () {
  var g = this;
  switch (g.int(4)) {
    case 0: {
      var bytes = [];
      var n = 8 + g.int(17);
      for (var i = 0; i < n; i++) bytes.push(g.int(256));
      return { bytes: Buffer.from(bytes), json: false };
    }
    case 1: {
      var text = '';
      var m = 8 + g.int(12);
      for (var j = 0; j < m; j++) text += g.pick(['a', 'Z', '7', ' ', 'é', '€', '😀', 'ß', '\u0001', '中', '\ufdd0', '\ue000', '\ue7ff']);
      return { bytes: Buffer.from(text, 'utf8'), json: false };
    }
    default: {
      var lit = function () { return g.literal(); };
      var obj = '{"n": ' + lit() + ', "m": [' + lit() + ', ' + lit() + ', ' + lit() + '], "s": "x"}';
      return { bytes: Buffer.from(obj, 'utf8'), json: true };
    }
  }
};

function generate(seed, count) {
  var g = new Gen(rng(seed));
  var cases = [];
  for (var id = 0; id < count; id++) {
    var p = g.payload();
    var lines = [p.json ? 'var d = decodeToJson(payload);' : '', 'var b = payload;', 'var v = {};'];
    var fields = 1 + g.int(6);
    for (var f = 0; f < fields; f++) lines.push('v.f' + f + ' = ' + g.num(1 + g.int(4), p.json) + ';');
    lines.push('var a = {};');
    var attrs = g.int(4);
    for (var k = 0; k < attrs; k++) lines.push('a.s' + k + ' = ' + g.str(1 + g.int(3), p.json) + ';');
    var shape = g.int(10);
    if (shape === 0) lines.push('return v.f0;');
    // Results the converter reads through JSON.stringify rather than directly (its general path).
    else if (shape === 2) lines.push('return {deviceName: "g" + b.length, attributes: a, telemetry: {toJSON: function () { return v; }}};');
    else if (shape === 3) lines.push('return {deviceName: b.length * 1.5, attributes: {s: decodeToString(payload)}, telemetry: v};');
    else if (shape === 1) lines.push('return [{deviceName: "d" + b.length, telemetry: v}, {deviceName: "e", attributes: a}];');
    else lines.push('return {deviceName: "dev" + b.length, deviceType: "t", attributes: a, telemetry: v};');
    cases.push({ id: id, body: lines.filter(Boolean).join('\n'), payload: p.bytes.toString('base64') });
  }
  return cases;
}

// ThingsBoard's payload: the UTF-16 code units of valid UTF-8 text, the bytes otherwise.
function payloadArray(bytes) {
  var text;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch (e) {
    return Array.from(bytes);
  }
  var units = [];
  for (var i = 0; i < text.length; i++) units.push(text.charCodeAt(i));
  return units;
}

// What edgegate sends to Kafka for one entity (src/converter/normalize.rs), for the shapes
// the generator makes.
function kafkaValue(result) {
  var one = function (e) {
    // A number as a name is its text (ThingsBoard reads names as text).
    var name = typeof e.deviceName === 'number' ? String(e.deviceName) : e.deviceName;
    var out = { deviceName: name, deviceType: e.deviceType === undefined ? 'default' : e.deviceType };
    out.attributes = e.attributes === undefined ? {} : e.attributes;
    out.telemetry = e.telemetry === undefined ? [] : [{ ts: CAPTURED_MS, values: e.telemetry }];
    return JSON.stringify(out);
  };
  if (result === null) return ''; // nothing to send
  if (Array.isArray(result)) return result.map(one).join('\n');
  if (result !== null && typeof result === 'object') return one(result);
  return null;
}

function run(cases) {
  var context = vm.createContext({});
  vm.runInContext(PRELUDE, context);
  return cases.map(function (c) {
    var decoder;
    var raw, kafka = null;
    try {
      decoder = vm.runInContext('(function Decoder(payload, metadata) {' + c.body + '\n})', context);
      var bytes = Buffer.from(c.payload, 'base64');
      var result = decoder(payloadArray(bytes), {});
      raw = result === undefined ? 'undefined' : JSON.stringify(result);
      kafka = kafkaValue(JSON.parse(raw === 'undefined' ? 'null' : raw));
    } catch (e) {
      raw = 'threw';
    }
    return { id: c.id, raw: raw, kafka: kafka };
  });
}

function readLines(file) {
  return fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map(function (l) { return JSON.parse(l); });
}

function writeLines(file, items) {
  fs.writeFileSync(file, items.map(function (x) { return JSON.stringify(x); }).join('\n') + '\n');
}

var args = process.argv.slice(2);
if (args[0] === 'gen') {
  writeLines(args[3], generate(Number(args[1]), Number(args[2])));
} else if (args[0] === 'run') {
  writeLines(args[2], run(readLines(args[1])));
} else {
  process.stderr.write('usage: node programs.js gen SEED COUNT FILE | run CASES RESULTS\n');
  process.exit(2);
}
