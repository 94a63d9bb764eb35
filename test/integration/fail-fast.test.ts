// Failing fast and truthfully, with real processes: a service whose address is taken or malformed exits non-zero at
// once naming the address and the reason (before loading anything); `emu3 up` checks its flags and its public port
// before starting anything, and a child that dies before it is healthy is reported with its own last words.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { binPath } from '../../cli/system.js';
import { createLogger } from '../../lib/rpc/log.js';
import { serve } from '../../lib/rpc/serve.js';
import { isAlive, removeWork, repoRoot, spawnUp, writeTinyModel } from './up-harness.js';

let work: string;
let modelDir: string;
let taken: Server;
let takenAddress: string;

before(async () => {
  ({ work, modelDir } = await writeTinyModel());
  taken = createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  takenAddress = `127.0.0.1:${(taken.address() as { port: number }).port}`;
});
after(() => {
  taken?.close();
  if (work) removeWork(work);
});

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

async function emu3(args: string[], timeoutMs = 20_000): Promise<Outcome> {
  const started = Date.now();
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [binPath(), ...args], {
      cwd: repoRoot,
      timeout: timeoutMs,
    });
    return { code: 0, stdout, stderr, ms: Date.now() - started };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr, ms: Date.now() - started };
  }
}

const IN_USE = /cannot listen on 127\.0\.0\.1:\d+: the address is already in use \(EADDRINUSE\)/;

test('serve() on a taken port rejects naming the address and the reason', { timeout: 10_000 }, async () => {
  const log = createLogger('test', { write: () => {} });
  await assert.rejects(serve({ address: takenAddress, services: [], log, handleSignals: false }), (e: Error) => {
    assert.match(
      e.message,
      new RegExp(`cannot listen on ${takenAddress}: the address is already in use \\(EADDRINUSE\\)`),
    );
    return true;
  });
  const ok = await serve({ address: '127.0.0.1:0', services: [], log, handleSignals: false });
  await ok.shutdown('test');
});

test(
  'vq, shard and coordinator on a taken port exit 1 at once, naming the address and the reason',
  { timeout: 60_000 },
  async () => {
    const runs = [
      ['vq', '--vq', join(modelDir, 'vq'), '--listen', takenAddress],
      ['shard', '--model', modelDir, '--layers', '0-4', '--listen', takenAddress],
      // Its shards and vq do not exist: it must not wait for them (start timeout 120 s) before noticing the port.
      ['coordinator', '--model', modelDir, '--shards', '127.0.0.1:1', '--vq', '127.0.0.1:2', '--listen', takenAddress],
    ];
    for (const args of runs) {
      const r = await emu3(args);
      assert.equal(r.code, 1, `${args[0]}: ${r.stderr}`);
      assert.match(r.stderr, new RegExp(`^emu3 ${args[0]}: ${IN_USE.source}`, 'm'));
      assert.ok(r.ms < 5000, `${args[0]} took ${r.ms} ms`);
    }
    const bad = await emu3(['vq', '--vq', join(modelDir, 'vq'), '--listen', '127.0.0.1:99999']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /"127\.0\.0\.1:99999" must be host:port with a port in \[0, 65535\]/);
  },
);

test(
  'emu3 up: a taken --listen port or a bad flag is refused in under 2 s, before anything starts',
  { timeout: 30_000 },
  async () => {
    // Under 2 s beyond what starting the CLI itself takes on this (possibly busy) machine.
    const limit = (await emu3(['--version'])).ms + 2000;
    const inUse = await emu3(['up', '--model', modelDir, '--listen', takenAddress]);
    assert.equal(inUse.code, 1, inUse.stderr);
    assert.match(inUse.stderr, new RegExp(`^emu3 up: ${IN_USE.source}`, 'm'));
    assert.doesNotMatch(inUse.stdout, /started \(pid/, 'nothing was started');
    assert.ok(inUse.ms < limit, `${inUse.ms} ms, limit ${limit} ms`);
    const cases: [string[], RegExp][] = [
      [
        ['--model', modelDir, '--listen', '127.0.0.1:99999'],
        /--listen: listen address "127\.0\.0\.1:99999" must be host:port/,
      ],
      [['--model', join(work, 'missing')], /--model .*missing: no config\.json there/],
      [['--model', modelDir, '--precision', 'int8'], /--precision must be one of fp32\|int4/],
      [['--model', modelDir, '--shards', '9'], /--shards 9 must be in \[1, 4\]/],
    ];
    for (const [args, pattern] of cases) {
      const r = await emu3(['up', ...args]);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.doesNotMatch(r.stdout, /started \(pid/);
      assert.ok(r.ms < limit, `${args.join(' ')}: ${r.ms} ms, limit ${limit} ms`);
    }
  },
);

test(
  'emu3 up: a child that exits before it is healthy is reported with its last log lines; nothing is left running',
  { timeout: 60_000 },
  async () => {
    const up = spawnUp(['--model', modelDir, '--listen', '127.0.0.1:0', '--shard-arg=--kv-budget=1']);
    try {
      const { code } = await up.exited;
      const out = up.lines.join('\n');
      assert.equal(code, 1, out);
      assert.match(
        out,
        /^emu3 up: shard-\d \(127\.0\.0\.1:\d+\) exit code 1 before becoming healthy; its last log lines:$/m,
      );
      assert.match(out, /--kv-budget 1 bytes cannot hold one slot/);
      await new Promise((r) => setTimeout(r, 200));
      for (const [name, pid] of up.pids) assert.ok(!isAlive(pid), `${name} (pid ${pid}) was stopped`);
    } finally {
      up.killAll();
    }
  },
);

test(
  'emu3 chat with nothing at the address says so and names npm start; a bad flag is refused before any call',
  { timeout: 30_000 },
  async () => {
    const free = createServer();
    await new Promise<void>((resolve) => free.listen(0, '127.0.0.1', resolve));
    const address = `127.0.0.1:${(free.address() as { port: number }).port}`;
    await new Promise<void>((resolve) => free.close(() => resolve()));
    const r = await emu3(['chat', '--addr', address, 'Hello!']);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      new RegExp(`emu3 chat: nothing answers at ${address}: is \`npm start\` \\(emu3 up\\) running\\?`),
    );
    assert.doesNotMatch(r.stderr, /Resolution note/);
    const seed = await emu3(['chat', '--addr', address, '--seed', '-1', 'Hello!']);
    assert.equal(seed.code, 2);
    assert.equal(seed.stderr, 'emu3 chat: --seed must be in [0, 4294967295], got -1\n');
    const version = await emu3(['--version']);
    assert.match(version.stdout, /^emu3-serve \d+\.\d+\.\d+\n$/);
  },
);
