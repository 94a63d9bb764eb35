// The LeaderWorkerSet mapping: deploy/lws-entry.sh turns a pod's LWS_* identity into emu3 flags (run here with sh
// and a `node` on PATH that prints the argv it was given), and `emu3 shard --stage-index I --stages N` serves the
// layers `emu3 up` gives stage I of N.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { UsageError } from '../../cli/args.js';
import { chooseLayers } from '../../cli/shard-layers.js';
import { splitLayers, stageCosts } from '../../cli/system.js';
import { loadEmu3Config, parseEmu3Config } from '../../lib/model/config.js';
import { tinyConfigJson } from '../../lib/model/tiny.js';
import { protoRoot } from '../../lib/rpc/proto.js';

const repo = join(protoRoot(), '..');
const script = join(repo, 'deploy/lws-entry.sh');
const work = mkdtempSync(join(tmpdir(), 'emu3-lws-'));
after(() => rmSync(work, { recursive: true, force: true }));
writeFileSync(join(work, 'node'), '#!/bin/sh\nprintf "%s\\n" "$@"\n');
chmodSync(join(work, 'node'), 0o755);

function entry(role: string, lws: Record<string, string>, ...flags: string[]) {
  return spawnSync('sh', [script, role, ...flags], {
    env: { PATH: `${work}:/usr/bin:/bin`, ...lws },
    encoding: 'utf8',
  });
}

function argv(role: string, size: number, worker: number, ...flags: string[]): string[] {
  const r = entry(
    role,
    { LWS_LEADER_ADDRESS: 'emu3-2.emu3.serving', LWS_GROUP_SIZE: String(size), LWS_WORKER_INDEX: String(worker) },
    ...flags,
  );
  assert.equal(r.status, 0, r.stderr);
  const out = r.stdout.trimEnd().split('\n');
  assert.equal(resolve(out[0]), join(repo, 'bin/emu3.js'), 'runs the emu3 next to the script');
  return out.slice(1);
}

test('the leader runs the coordinator over workers 1..size-1 and advertises its own stable name for the sink', () => {
  assert.deepEqual(argv('coordinator', 4, 0, '--model', '/m'), [
    'coordinator',
    '--shards',
    'emu3-2-1.emu3.serving:50061,emu3-2-2.emu3.serving:50061,emu3-2-3.emu3.serving:50061',
    '--sink-advertise',
    'emu3-2.emu3.serving:50060',
    '--model',
    '/m',
  ]);
  assert.deepEqual(argv('coordinator', 2, 0).slice(0, 3), ['coordinator', '--shards', 'emu3-2-1.emu3.serving:50061']);
});

test('worker w runs stage w-1 of size-1 with --next worker w+1 (none on the last), results only to its leader', () => {
  const replyTo = ['--allow-reply-to', 'emu3-2.emu3.serving:50060'];
  assert.deepEqual(argv('shard', 4, 1, '--model', '/m'), [
    'shard',
    '--stage-index',
    '0',
    '--stages',
    '3',
    ...replyTo,
    '--next',
    'emu3-2-2.emu3.serving:50061',
    '--model',
    '/m',
  ]);
  assert.deepEqual(argv('shard', 4, 2), [
    'shard',
    '--stage-index',
    '1',
    '--stages',
    '3',
    ...replyTo,
    '--next',
    'emu3-2-3.emu3.serving:50061',
  ]);
  assert.deepEqual(argv('shard', 4, 3), ['shard', '--stage-index', '2', '--stages', '3', ...replyTo]);
  assert.deepEqual(argv('shard', 2, 1), ['shard', '--stage-index', '0', '--stages', '1', ...replyTo]);
});

test('lws-entry.sh refuses what is not a LeaderWorkerSet pod of the right shape, naming the problem', () => {
  const ok = { LWS_LEADER_ADDRESS: 'emu3-0.emu3.default', LWS_GROUP_SIZE: '3', LWS_WORKER_INDEX: '1' };
  const cases: [string, Record<string, string>, RegExp][] = [
    ['shard', { ...ok, LWS_GROUP_SIZE: '1' }, /leaves no shard/],
    ['shard', { ...ok, LWS_WORKER_INDEX: '0' }, /must be a worker/],
    ['shard', { LWS_GROUP_SIZE: '3', LWS_WORKER_INDEX: '1' }, /LWS_LEADER_ADDRESS is not set/],
    ['shard', { ...ok, LWS_LEADER_ADDRESS: 'nodomain' }, /no domain part/],
    ['gateway', ok, /unknown role 'gateway'/],
  ];
  for (const [role, env, message] of cases) {
    const r = entry(role, env);
    assert.notEqual(r.status, 0, `${role} ${JSON.stringify(env)}`);
    assert.match(r.stderr, message);
    assert.equal(r.stdout, '', 'nothing started');
  }
});

test('--stage-index I --stages N is the range emu3 up gives stage I of N, for every N', () => {
  const config = parseEmu3Config(tinyConfigJson('small', 'f32'), 'small preset');
  assert.equal(config.numHiddenLayers, 12);
  for (let n = 1; n <= 12; n++) {
    const ranges = Array.from({ length: n }, (_, i) => chooseLayers({ stageIndex: i, stages: n }, () => config));
    assert.deepEqual(ranges, splitLayers(12, n, stageCosts(config)));
    assert.equal(ranges[0][0], 0);
    assert.equal(ranges[n - 1][1], 12);
    for (let i = 1; i < n; i++) assert.equal(ranges[i][0], ranges[i - 1][1], 'contiguous');
  }
  // lm_head weighs on the last stage: with 2 stages it gets fewer layers, as `emu3 up` splits them.
  const [first, last] = splitLayers(12, 2, stageCosts(config));
  assert.ok(last[1] - last[0] <= first[1] - first[0]);
  assert.deepEqual(
    chooseLayers({ layers: [3, 5] }, () => config),
    [3, 5],
  );
});

test('--stage-index / --stages refusals name the flags', () => {
  const config = () => {
    throw new Error('config must not be read');
  };
  const refuses = (choice: Parameters<typeof chooseLayers>[0], message: RegExp) =>
    assert.throws(
      () => chooseLayers(choice, config),
      (e: Error) => e instanceof UsageError && message.test(e.message),
    );
  refuses({ layers: [0, 2], stageIndex: 0, stages: 2 }, /either --layers or --stage-index with --stages/);
  refuses({ stageIndex: 0 }, /--stage-index and --stages go together/);
  refuses({ stages: 2 }, /--stage-index and --stages go together/);
  refuses({}, /--layers \(or --stage-index with --stages\) is required/);
  refuses({ stageIndex: 2, stages: 2 }, /--stage-index 2 must be below --stages 2/);
  const tiny = join(work, 'tiny');
  mkdirSync(tiny);
  writeFileSync(join(tiny, 'config.json'), JSON.stringify(tinyConfigJson('tiny', 'f32')));
  assert.throws(
    () => chooseLayers({ stageIndex: 0, stages: 5 }, () => loadEmu3Config(tiny)),
    /--stages 5 must be at most the model's 4 layers/,
  );
});

test('emu3 shard --help lists --stage-index and --stages', () => {
  const help = execFileSync(process.execPath, [join(repo, 'bin/emu3.js'), 'shard', '--help'], { encoding: 'utf8' });
  assert.match(help, /--stage-index/);
  assert.match(help, /--stages/);
});
