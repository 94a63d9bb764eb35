// A whole emu3 system as separate child processes on loopback: vq, N shards (layers split evenly, each told its next
// hop) and the coordinator. Used by `emu3 up`, the integration tests and bench/serve. Each child's stderr is kept
// (the last lines, for error reports) and optionally copied to a log file.
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, type WriteStream } from 'node:fs';
import { createServer } from 'node:net';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import type { Emu3Config } from '../lib/model/config.js';
import { createClient, unaryCall } from '../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../lib/rpc/health.js';

export interface SystemOptions {
  modelDir: string;
  /** Default: modelDir/vq. */
  vqDir?: string;
  /** Pipeline stages (layers split as evenly as possible). Default 2. */
  shards?: number;
  precision?: string;
  /** Public address of the coordinator. Default 127.0.0.1 with a free port. */
  listen?: string;
  /** Extra coordinator flags, e.g. ['--max-queue', '8']. */
  coordinatorArgs?: string[];
  /** Extra flags for every shard. */
  shardArgs?: string[];
  /** Where each child's log goes (DIR/<name>.log); none when unset. */
  logDir?: string;
  /** Health wait limit. Default 180 s. */
  readyTimeoutMs?: number;
  /** Called with progress lines. */
  progress?: (line: string) => void;
  /** Give every process a Prometheus endpoint (--metrics-listen on a free loopback port). */
  metrics?: boolean;
  /** Extra environment for every process (e.g. OTEL_* for tracing). */
  env?: Record<string, string>;
}

export interface Child {
  name: string;
  address: string;
  process: ChildProcess;
  /** The last lines of its stderr/stdout. */
  tail: string[];
  exited: Promise<number | null>;
  /** http://HOST:PORT/metrics when started with metrics. */
  metricsUrl?: string;
}

export interface RunningSystem {
  /** The coordinator's public address. */
  address: string;
  vqAddress: string;
  shardAddresses: string[];
  /** Each shard's layers [a, b). */
  stages: [number, number][];
  children: Child[];
  /** SIGTERM to every child, then SIGKILL after `graceMs`; resolves when all have exited. */
  stop(graceMs?: number): Promise<void>;
}

const TAIL_LINES = 40;

export function binPath(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const bin = join(dir, 'bin', 'emu3.js');
    if (existsSync(bin) && existsSync(join(dir, 'package.json'))) return bin;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`bin/emu3.js not found above ${fileURLToPath(import.meta.url)}`);
    dir = parent;
  }
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

/** Per-token work of a stage, in weights read: each decoder layer's, plus lm_head's on the last stage. */
export interface StageCosts {
  layer: number;
  head: number;
}

/** Weights read per token by one decoder layer and by lm_head (the embedding is a gather: nearly free). */
export function stageCosts(c: Emu3Config): StageCosts {
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  return {
    layer: c.hiddenSize * (2 * q + 2 * kv) + 3 * c.hiddenSize * c.intermediateSize,
    head: c.vocabSize * c.hiddenSize,
  };
}

/**
 * Layer ranges [a, b) of `stages` contiguous stages, each at least one layer, minimising the slowest stage's work:
 * the last stage also runs lm_head (for Emu3's 184,622-row vocabulary that is many layers' worth), so it gets fewer
 * layers. Without costs the layers are split evenly.
 */
export function splitLayers(layers: number, stages: number, costs?: StageCosts): [number, number][] {
  if (stages < 1 || stages > layers)
    throw new Error(`--shards ${stages} must be in [1, ${layers}] (the model's layers)`);
  const cost = (a: number, b: number) => (costs ? (b - a) * costs.layer + (b === layers ? costs.head : 0) : b - a);
  // best[s][b]: the smallest possible slowest-stage cost of layers [0, b) in s stages; cut[s][b] its last cut
  // (the latest one on a tie, so earlier stages take the extra layers).
  const best = Array.from({ length: stages + 1 }, () => new Array<number>(layers + 1).fill(Number.POSITIVE_INFINITY));
  const cut = Array.from({ length: stages + 1 }, () => new Array<number>(layers + 1).fill(0));
  best[0][0] = 0;
  for (let s = 1; s <= stages; s++) {
    for (let b = s; b <= layers; b++) {
      for (let a = s - 1; a < b; a++) {
        const v = Math.max(best[s - 1][a], cost(a, b));
        if (v <= best[s][b]) {
          best[s][b] = v;
          cut[s][b] = a;
        }
      }
    }
  }
  const out: [number, number][] = [];
  for (let s = stages, b = layers; s > 0; s--) {
    const a = cut[s][b];
    out.unshift([a, b]);
    b = a;
  }
  return out;
}

export function startChild(
  name: string,
  address: string,
  args: string[],
  logDir?: string,
  env?: Record<string, string>,
): Child {
  const proc = spawn(process.execPath, [binPath(), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: env ? { ...process.env, ...env } : process.env,
  });
  const tail: string[] = [];
  let log: WriteStream | undefined;
  if (logDir) {
    mkdirSync(logDir, { recursive: true });
    log = createWriteStream(join(logDir, `${name}.log`));
  }
  const keep = (chunk: Buffer) => {
    log?.write(chunk);
    for (const line of chunk.toString('utf8').split('\n')) {
      if (line === '') continue;
      tail.push(line);
      if (tail.length > TAIL_LINES) tail.shift();
    }
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  const exited = new Promise<number | null>((resolve) =>
    proc.on('exit', (code, signal) => {
      log?.end();
      resolve(code ?? (signal ? 128 : null));
    }),
  );
  return { name, address, process: proc, tail, exited };
}

/** Polls grpc.health.v1 Check('') until SERVING; rejects when `child` exits first or time runs out. */
export async function waitHealthy(child: Child, timeoutMs: number): Promise<void> {
  const client = createClient(HEALTH_PROTO, HEALTH_SERVICE, child.address);
  let exitCode: number | null | undefined;
  void child.exited.then((c) => {
    exitCode = c;
  });
  const until = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (exitCode !== undefined) throw new ChildFailed(child, `exited with code ${exitCode} before becoming healthy`);
      try {
        const res = await unaryCall<object, { status: string }>(client, 'Check', { service: '' }, { deadlineMs: 1000 });
        if (res.status === 'SERVING') return;
      } catch (err) {
        const code = (err as grpc.ServiceError).code;
        if (code !== grpc.status.UNAVAILABLE && code !== grpc.status.DEADLINE_EXCEEDED) throw err;
      }
      if (Date.now() > until) throw new ChildFailed(child, `not healthy within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    client.close();
  }
}

export class ChildFailed extends Error {
  constructor(
    readonly child: Child,
    what: string,
  ) {
    super(
      `${child.name} (${child.address}) ${what}; its last log lines:\n${child.tail.map((l) => `  ${l}`).join('\n')}`,
    );
  }
}

async function stopAll(children: Child[], graceMs: number): Promise<void> {
  for (const c of children) if (c.process.exitCode === null) c.process.kill('SIGTERM');
  const timer = setTimeout(() => {
    for (const c of children) if (c.process.exitCode === null) c.process.kill('SIGKILL');
  }, graceMs);
  await Promise.all(children.map((c) => c.exited));
  clearTimeout(timer);
}

export async function startSystem(opts: SystemOptions, config: Emu3Config): Promise<RunningSystem> {
  const progress = opts.progress ?? (() => {});
  const stages = splitLayers(config.numHiddenLayers, opts.shards ?? 2, stageCosts(config));
  // The shards share this machine's cores. Each may use all of them: at low load only one stage works at a time
  // (a token passes through them in turn), and at high load the OS shares the cores between the stages that have
  // work, so the slowest stage (the last, with lm_head) is not capped at 1/N of the machine. Idle ORT threads must
  // then sleep rather than spin, or they take cores from the stage that is computing.
  const shardArgs = [...(opts.shardArgs ?? [])];
  if (!shardArgs.includes('--threads')) shardArgs.push('--threads', String(availableParallelism()));
  if (stages.length > 1 && !shardArgs.includes('--no-spin')) shardArgs.push('--no-spin');
  // For the same reason one micro-batch in flight (unless told otherwise): splitting the decodes over S micro-batches
  // only pays when each stage has cores of its own; here it halves the batch, so every weight is read twice as
  // often per token, while the stages still compete for the same cores (measured in BENCHMARKS.md "Serving").
  const coordinatorArgs = [...(opts.coordinatorArgs ?? [])];
  if (!coordinatorArgs.includes('--max-in-flight')) coordinatorArgs.push('--max-in-flight', '1');
  const host = '127.0.0.1';
  const vqAddress = `${host}:${await freePort()}`;
  const shardAddresses: string[] = [];
  for (let i = 0; i < stages.length; i++) shardAddresses.push(`${host}:${await freePort()}`);
  const address = opts.listen ?? `${host}:${await freePort()}`;
  const children: Child[] = [];
  const timeout = opts.readyTimeoutMs ?? 180_000;
  // With metrics, each child gets --metrics-listen on a free port; its URL is kept on the Child.
  const start = async (name: string, addr: string, args: string[]): Promise<Child> => {
    const metricsAddress = opts.metrics ? `${host}:${await freePort()}` : undefined;
    const child = startChild(
      name,
      addr,
      metricsAddress ? [...args, '--metrics-listen', metricsAddress] : args,
      opts.logDir,
      opts.env,
    );
    if (metricsAddress) child.metricsUrl = `http://${metricsAddress}/metrics`;
    return child;
  };
  try {
    children.push(
      await start('vq', vqAddress, ['vq', '--vq', opts.vqDir ?? join(opts.modelDir, 'vq'), '--listen', vqAddress]),
    );
    // Last stage first, so each stage's next hop is already starting when it dials it.
    const shardChildren: Child[] = [];
    for (let i = stages.length - 1; i >= 0; i--) {
      const [a, b] = stages[i];
      const args = ['shard', '--model', opts.modelDir, '--layers', `${a}-${b}`, '--listen', shardAddresses[i]];
      if (i + 1 < stages.length) args.push('--next', shardAddresses[i + 1]);
      if (opts.precision) args.push('--precision', opts.precision);
      args.push(...shardArgs);
      shardChildren.unshift(await start(`shard-${i}`, shardAddresses[i], args));
    }
    children.push(...shardChildren);
    progress(
      `starting vq on ${vqAddress} and ${stages.length} shard(s): ${stages.map(([a, b], i) => `layers ${a}-${b} on ${shardAddresses[i]}`).join(', ')}`,
    );
    await Promise.all(children.map((c) => waitHealthy(c, timeout)));
    const coordinator = await start('coordinator', address, [
      'coordinator',
      '--model',
      opts.modelDir,
      '--shards',
      shardAddresses.join(','),
      '--vq',
      vqAddress,
      '--listen',
      address,
      ...coordinatorArgs,
    ]);
    children.push(coordinator);
    progress(`starting the coordinator on ${address}`);
    await waitHealthy(coordinator, timeout);
  } catch (err) {
    await stopAll(children, 3000);
    throw err;
  }
  return {
    address,
    vqAddress,
    shardAddresses,
    stages,
    children,
    stop: (graceMs = 10_000) => stopAll(children, graceMs),
  };
}
