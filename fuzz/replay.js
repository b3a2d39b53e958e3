// Node.js side of the replay (src/bin/replay.rs): one JSON line {"src": ...} in, one JSON line
// {"out": ...} out, each program in a fresh context as QuickJS gets a fresh runtime.
'use strict';
const vm = require('vm');
const readline = require('readline');

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  const { src } = JSON.parse(line);
  let out;
  try {
    const v = vm.runInNewContext(src, {}, { timeout: 10000 });
    out = typeof v === 'string' ? v : 'non-string ' + typeof v;
  } catch (e) {
    if (e && e.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT') out = 'interrupted';
    else out = 'throws ' + (e !== null && e !== undefined && e.constructor ? e.constructor.name : typeof e);
  }
  process.stdout.write(JSON.stringify({ out }) + '\n');
});
