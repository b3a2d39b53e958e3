// The seed decoder's own work looped inside QuickJS: no Rust boundary, no normalization. The floor
// for any QuickJS-based converter on this CPU. Run (BENCHMARKS.md, issue 3):
//   edgegate convert --config examples/quickjs-floor.toml --converter floor --raw \
//     --payload tests/fixtures/seed-payload.json
function decodeToString(payload) { return String.fromCharCode.apply(String, payload); }
function decodeToJson(payload) { return JSON.parse(decodeToString(payload)); }
var N = 100000;
var t0 = Date.now();
var out;
for (var i = 0; i < N; i++) {
  var payloadJsn = decodeToJson(payload);
  var result = { deviceName: payloadJsn.deviceName, deviceType: payloadJsn.deviceType, attributes: payloadJsn.attributes, telemetry: payloadJsn.telemetry };
  out = JSON.stringify(result);
}
var t1 = Date.now();
for (var i = 0; i < N; i++) { var s = decodeToString(payload); }
var t2 = Date.now();
for (var i = 0; i < N; i++) { var j = JSON.parse(s); }
var t3 = Date.now();
for (var i = 0; i < N; i++) { var o = JSON.stringify(j); }
var t4 = Date.now();
return {deviceName: 'x', attributes: {us_per_record_full: (t1 - t0) * 1000 / N, fromCharCode: (t2-t1)*1000/N, parse: (t3-t2)*1000/N, stringify: (t4-t3)*1000/N, len: payload.length}};
