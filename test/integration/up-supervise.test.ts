// `emu3 up` as a supervisor, with real processes: every service answers server reflection, `emu3 chat` against it
// (the README's example image, the closing line, --quiet, a seed that reproduces), and kill -9 of any child under
// load: it is restarted at its address while the others keep running, and every answer completes unchanged.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import type * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { binPath } from '../../cli/system.js';
import { createClient } from '../../lib/rpc/client.js';
import { type Answer, generate } from './pipeline-harness.js';
import { isAlive, removeWork, repoRoot, startUp, type UpProcess, writeTinyModel } from './up-harness.js';

const run = promisify(execFile);
let work: string;
let up: UpProcess & { address: string };
let client: grpc.Client;

before(async () => {
  const model = await writeTinyModel();
  work = model.work;
  up = await startUp(['--model', model.modelDir, '--listen', '127.0.0.1:0', '--log-dir', join(work, 'logs')]);
  client = emu3Client(up.address);
});
after(async () => {
  client?.close();
  up?.killAll();
  if (work) removeWork(work);
});

const REFLECTION_PROTO = join(
  dirname(createRequire(import.meta.url).resolve('@grpc/reflection/package.json')),
  'build/proto/grpc/reflection/v1alpha/reflection.proto',
);

function listServices(address: string): Promise<string[]> {
  const c = createClient(REFLECTION_PROTO, 'grpc.reflection.v1alpha.ServerReflection', address);
  return new Promise<string[]>((resolve, reject) => {
    const call = (
      c as unknown as { ServerReflectionInfo(): grpc.ClientDuplexStream<object, Record<string, never>> }
    ).ServerReflectionInfo();
    call.on('data', (m: { list_services_response?: { service: { name: string }[] } }) => {
      resolve((m.list_services_response?.service ?? []).map((s) => s.name).sort());
      call.end();
    });
    call.on('error', reject);
    call.write({ list_services: '' });
  }).finally(() => c.close());
}

test(
  'every service of the system answers grpc.reflection.v1alpha ServerReflection list services',
  { timeout: 30_000 },
  async () => {
    assert.deepEqual(await listServices(up.addresses.get('vq')!), [
      'emu3.internal.v1.VqService',
      'grpc.health.v1.Health',
    ]);
    for (const shard of ['shard-0', 'shard-1'])
      assert.deepEqual(await listServices(up.addresses.get(shard)!), [
        'emu3.internal.v1.Shard',
        'grpc.health.v1.Health',
      ]);
    assert.ok((await listServices(up.address)).includes('emu3.v1.Emu3'), 'the coordinator lists emu3.v1.Emu3');
  },
);

test('up serves the OpenAI-compatible API and prints its /v1 base URL', { timeout: 30_000 }, async () => {
  const line = await up.waitFor(/OpenAI-compatible HTTP API: (http:\/\/\S+\/v1)/, 10_000);
  const base = /(http:\/\/\S+\/v1)/.exec(line)![1];
  const models = (await (await fetch(`${base}/models`)).json()) as { data: { id: string }[] };
  assert.deepEqual(
    models.data.map((m) => m.id),
    ['emu3-tiny'],
  );
  const res = await fetch(`${base}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'emu3-tiny', messages: [{ role: 'user', content: 'Hello!' }], max_tokens: 4 }),
  });
  assert.equal(res.status, 200);
  const body = (await res.json()) as { usage: { completion_tokens: number } };
  assert.ok(body.usage.completion_tokens >= 1 && body.usage.completion_tokens <= 4);
});

function chat(args: string[]) {
  return run(process.execPath, [binPath(), 'chat', '--addr', up.address, ...args], { cwd: repoRoot, timeout: 60_000 });
}

test(
  'emu3 chat: the README example pastes as-is, ends with seed, TTFT and tokens/s; --quiet drops that line',
  { timeout: 120_000 },
  async () => {
    const { stdout, stderr } = await chat([
      '--image',
      'examples/cat.png',
      '--max-new-tokens',
      '8',
      'Describe the image.',
    ]);
    assert.ok(stdout.length > 1, 'an answer was printed');
    assert.match(
      stderr,
      /^\[FINISH_REASON_(LENGTH|EOS)\] seed 0, TTFT \d+\.\d ms, (\d+\.\d|n\/a) tokens\/s; \d+ tokens generated after a \d+-token prompt/m,
    );
    const quiet = await chat(['--quiet', '--max-new-tokens', '8', 'Hello']);
    assert.equal(quiet.stderr, '');
    // A sampled answer names the seed the server chose; that seed given back reproduces the answer.
    const sampled = await chat(['--temperature', '0.9', '--max-new-tokens', '12', '--ignore-eos', 'Tell a story.']);
    const seed = /seed (\d+),/.exec(sampled.stderr)?.[1];
    assert.ok(seed && seed !== '0', `a seed in: ${sampled.stderr}`);
    const again = await chat([
      '--temperature',
      '0.9',
      '--max-new-tokens',
      '12',
      '--ignore-eos',
      '--seed',
      seed,
      'Tell a story.',
    ]);
    assert.equal(again.stdout, sampled.stdout);
    assert.match(again.stderr, new RegExp(`seed ${seed},`));
    const extras = await chat([
      '--return-token-ids',
      '--top-logprobs',
      '2',
      '--max-new-tokens',
      '3',
      '--ignore-eos',
      'Hi',
    ]);
    const ids = /^token ids: (.*)$/m.exec(extras.stderr)?.[1].split(' ');
    assert.equal(ids?.length, 3, extras.stderr);
    const logprobs = extras.stderr
      .split('\n')
      .filter((l) => /^\d+ -?\d+\.\d{4} {2}top: \d+:-?\d+\.\d{4} \d+:-?\d+\.\d{4}$/.test(l));
    assert.deepEqual(
      logprobs.map((l) => l.split(' ')[0]),
      ids,
      'one logprob line per generated token, with 2 alternatives',
    );
  },
);

const STREAMS = 32;
const request = (i: number) => ({
  parts: [{ text: `Count to ${i} slowly.` }],
  sampling: { maxNewTokens: 64, ignoreEos: true },
});
let calm: Answer[] | undefined;

async function fleet(onProgress?: (minDeltas: number) => void): Promise<Answer[]> {
  const deltas = new Array<number>(STREAMS).fill(0);
  const calls = Array.from({ length: STREAMS }, (_, i) => {
    const g = generate(client, request(i));
    g.call.on('data', (m: { delta?: unknown }) => {
      if (!m.delta) return;
      deltas[i]++;
      onProgress?.(Math.min(...deltas));
    });
    return g.done;
  });
  return Promise.all(calls);
}

async function baseline(): Promise<Answer[]> {
  calm ??= await fleet();
  return calm;
}

for (const victim of ['shard-0', 'shard-1']) {
  test(
    `kill -9 of ${victim} under ${STREAMS} streams: it is restarted, the others keep running, every answer completes unchanged`,
    { timeout: 180_000 },
    async () => {
      const expected = await baseline();
      const others = [...up.pids].filter(([name]) => name !== victim);
      const pid = up.pids.get(victim)!;
      const from = up.lines.length;
      let killed = false;
      const answers = await fleet((min) => {
        if (min >= 3 && !killed) {
          killed = true;
          process.kill(pid, 'SIGKILL');
        }
      });
      assert.ok(killed, 'the shard was killed mid-answer');
      await up.waitFor(
        new RegExp(`^emu3 up: ${victim} \\(.*pid ${pid}\\) killed by SIGKILL; restarting it in \\d+ ms`),
        5000,
        from,
      );
      await up.waitFor(new RegExp(`^emu3 up: ${victim} is back on `), 60_000, from);
      assert.notEqual(up.pids.get(victim), pid, 'a new process');
      for (const [name, other] of others)
        assert.ok(isAlive(other) && up.pids.get(name) === other, `${name} kept running`);
      for (let i = 0; i < STREAMS; i++) {
        assert.equal(answers[i].final.finishReason, 'FINISH_REASON_LENGTH', `stream ${i}`);
        assert.deepEqual(answers[i].ids, expected[i].ids, `stream ${i}: the same tokens as without the fault`);
        assert.equal(answers[i].text, expected[i].text, `stream ${i}: the same text`);
      }
    },
  );
}

test(
  'kill -9 of vq: text-only requests are unaffected; image requests succeed again once it is back',
  { timeout: 120_000 },
  async () => {
    const expected = await baseline();
    const pid = up.pids.get('vq')!;
    const from = up.lines.length;
    process.kill(pid, 'SIGKILL');
    await up.waitFor(new RegExp(`^emu3 up: vq \\(.*pid ${pid}\\) killed by SIGKILL; restarting it`), 5000, from);
    const text = await generate(client, request(5)).done;
    assert.deepEqual(text.ids, expected[5].ids, 'a text-only answer while vq is down');
    await up.waitFor(/^emu3 up: vq is back on /, 60_000, from);
    const { stdout, stderr } = await chat([
      '--image',
      'examples/cat.png',
      '--max-new-tokens',
      '4',
      'Describe the image.',
    ]);
    assert.ok(stdout.length > 1, stderr);
    assert.match(stderr, /^\[FINISH_REASON_(LENGTH|EOS)\]/m);
  },
);
