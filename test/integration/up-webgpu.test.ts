// `emu3 up --device webgpu` as real processes on this machine's Vulkan device (lavapipe in CI): the whole system
// (coordinator, a webgpu shard with its KV arena on the device, vq on webgpu) answers the same greedy text as
// `emu3 up` on the CPU, for the same emu3-tiny and prompts. fp32 on both, so greedy tokens must agree exactly
// (the webgpu logits are within 1e-3 of the float64 reference: test/unit/stage-webgpu.test.ts).
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { type Answer, generate } from './pipeline-harness.js';
import { removeWork, startUp, type UpProcess, writeTinyModel } from './up-harness.js';

process.env.XDG_RUNTIME_DIR ??= tmpdir();

let work: string;
let modelDir: string;
const running: { up: UpProcess; client: grpc.Client }[] = [];

before(async () => {
  ({ work, modelDir } = await writeTinyModel());
});
after(() => {
  for (const r of running) {
    r.client.close();
    r.up.killAll();
  }
  if (work) removeWork(work);
});

const PROMPTS = ['Describe a quiet harbour at dawn.', 'List three prime numbers.', 'Why is the sky blue?'];

async function answers(device: 'cpu' | 'webgpu'): Promise<Answer[]> {
  const up = await startUp(
    [
      '--model',
      modelDir,
      '--listen',
      '127.0.0.1:0',
      '--device',
      device,
      '--precision',
      'fp32',
      '--log-dir',
      join(work, `logs-${device}`),
    ],
    300_000,
  );
  const client = emu3Client(up.address);
  running.push({ up, client });
  const out: Answer[] = [];
  for (const text of PROMPTS)
    out.push(await generate(client, { parts: [{ text }], sampling: { maxNewTokens: 12, ignoreEos: true } }).done);
  client.close();
  up.killAll();
  await up.exited;
  return out;
}

test('emu3 up --device webgpu answers with the same greedy text as on the cpu', { timeout: 900_000 }, async (t) => {
  const cpu = await answers('cpu');
  const gpu = await answers('webgpu');
  for (const [i, prompt] of PROMPTS.entries()) {
    assert.equal(cpu[i].ids.length, 12, `cpu: 12 tokens for "${prompt}"`);
    assert.deepEqual(gpu[i].ids, cpu[i].ids, `token ids for "${prompt}"`);
    assert.equal(gpu[i].text, cpu[i].text, `text for "${prompt}"`);
  }
  t.diagnostic(`answers: ${cpu.map((a) => JSON.stringify(a.text)).join(', ')}`);
});
