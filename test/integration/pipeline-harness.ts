// A whole system for the pipeline integration tests, started like `emu3 up` does (cli/system.ts): vq + 2 shards +
// coordinator as real processes on loopback, over an emu3-tiny written once per test file. The tiny VQ's pixel
// bounds (128²–256², lib/vq/tiny.ts) keep an image prompt within the tiny LLM's 2,048-token context.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type * as grpc from '@grpc/grpc-js';
import sharp from 'sharp';
import { emu3Client } from '../../cli/chat.js';
import { binPath, type RunningSystem, type SystemOptions, startSystem } from '../../cli/system.js';
import { loadEmu3Config } from '../../lib/model/config.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { SHARD_PROTO, SHARD_SERVICE, type ShardInfo } from '../../lib/rpc/shard-wire.js';
import { writeTokenizerFiles } from '../../lib/tokenizer/files.js';
import { writeTinyVq } from '../../lib/vq/tiny.js';

export interface Harness {
  work: string;
  modelDir: string;
  system: RunningSystem;
  client: grpc.Client;
  close(): Promise<void>;
}

export async function startHarness(
  coordinatorArgs: string[] = [],
  shardArgs: string[] = [],
  /** More system options (metrics endpoints, environment for the children). */
  extra: Pick<SystemOptions, 'metrics' | 'env' | 'authTokenFile' | 'tls'> = {},
): Promise<Harness> {
  const work = mkdtempSync(join(tmpdir(), 'emu3-pipeline-'));
  const modelDir = join(work, 'emu3-tiny');
  writeTinyEmu3(modelDir, { seed: 0, preset: 'tiny', dtype: 'f32', shards: 1 });
  await writeTokenizerFiles(modelDir);
  writeTinyVq(join(modelDir, 'vq'), { seed: 0, preset: 'tiny' });
  const system = await startSystem(
    { modelDir, shards: 2, coordinatorArgs, shardArgs, logDir: join(work, 'logs'), ...extra },
    loadEmu3Config(modelDir),
  );
  const client = emu3Client(system.address);
  // With public auth or TLS the tests make their own clients; this one still serves health and the open API.
  return {
    work,
    modelDir,
    system,
    client,
    async close() {
      client.close();
      await system.stop();
      rmSync(work, { recursive: true, force: true });
    },
  };
}

export async function picture(width: number, height: number, seed: number): Promise<Buffer> {
  const raw = Buffer.alloc(width * height * 3);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * 31 + seed * 97 + ((i / (width * 3)) | 0) * 7) & 255;
  return sharp(raw, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
}

export interface Answer {
  text: string;
  ids: number[];
  // biome-ignore lint/suspicious/noExplicitAny: the decoded Final message
  final: any;
}

interface Message {
  delta?: { text: string; tokenIds: number[] };
  final?: Answer['final'];
}

/** Runs Generate to the end; rejects with the grpc ServiceError. */
export function generate(
  client: grpc.Client,
  request: object,
  opts: { deadlineMs?: number; cancelAfterDeltas?: number } = {},
) {
  const callOpts: grpc.CallOptions = opts.deadlineMs ? { deadline: Date.now() + opts.deadlineMs } : {};
  const call = (
    client as unknown as { Generate(r: object, o: grpc.CallOptions): grpc.ClientReadableStream<Message> }
  ).Generate({ returnTokenIds: true, ...request }, callOpts);
  const answer: Answer = { text: '', ids: [], final: null };
  let deltas = 0;
  const done = new Promise<Answer>((resolve, reject) => {
    call.on('data', (m) => {
      if (m.delta) {
        answer.text += m.delta.text;
        answer.ids.push(...m.delta.tokenIds);
        if (++deltas === opts.cancelAfterDeltas) call.cancel();
      }
      if (m.final) answer.final = m.final;
    });
    call.on('error', reject);
    call.on('end', () => resolve(answer));
  });
  return { call, done };
}

export function unary<T>(client: grpc.Client, method: string, request: object): Promise<T> {
  return unaryCall<object, T>(client, method, request, { deadlineMs: 60_000 });
}

export async function shardInfos(system: RunningSystem): Promise<ShardInfo[]> {
  return Promise.all(
    system.shardAddresses.map(async (a) => {
      const c = createClient(SHARD_PROTO, SHARD_SERVICE, a, { credentials: system.internalCredentials });
      try {
        return await unaryCall<object, ShardInfo>(c, 'Info', {}, { deadlineMs: 5000 });
      } finally {
        c.close();
      }
    }),
  );
}

/**
 * The single-stage greedy continuation of `ids` for a text answer: `emu3 logits` (all layers in one stage) run on the
 * prompt plus the tokens chosen so far, taking at each step the highest logit outside the visual ids (what
 * MASK_KIND_TEXT removes; `emu3 logits --steps` alone is unmasked, and a random model often prefers a visual id).
 */
export async function singleStageGreedy(
  modelDir: string,
  ids: number[],
  steps: number,
  visual: { begin: number; end: number },
): Promise<number[]> {
  const out: number[] = [];
  for (let s = 0; s < steps; s++) {
    const { stdout } = await promisify(execFile)(
      process.execPath,
      [binPath(), 'logits', '--model', modelDir, '--tokens', [...ids, ...out].join(','), '--top', '400'],
      { maxBuffer: 64 * 1024 * 1024 },
    );
    const top: { id: number }[] = JSON.parse(stdout).top;
    const pick = top.find((t) => t.id < visual.begin || t.id >= visual.end);
    if (!pick) throw new Error(`step ${s}: the 400 highest logits are all visual ids`);
    out.push(pick.id);
  }
  return out;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
