// A whole emu3 system as separate child processes on loopback: vq, N shards (layers split evenly, each told its next
// hop) and the coordinator. Used by `emu3 up`, the integration tests and bench/serve. Each child's stderr is kept
// (the last lines, for error reports) and optionally copied to a log file. A child counts as up only once it has
// itself logged "listening" on its address and then answers health there, so another process that happens to
// answer at that address is never mistaken for it. With `supervise`, a child that dies is started again at the same
// address (cli/restart-policy.ts) while the others keep running.
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  type WriteStream,
  writeFileSync,
} from 'node:fs';

import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import type { Emu3Config } from '../lib/model/config.js';
import { TokenFile } from '../lib/rpc/auth.js';
import { type ClientCredentials, createClient, unaryCall } from '../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../lib/rpc/health.js';
import { checkListenable } from '../lib/rpc/serve.js';
import type { TlsFiles } from '../lib/rpc/tls.js';
import { describeExit, onFailure, type RestartPolicy } from './restart-policy.js';

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
  /** Extra flags for vq, e.g. ['--device', 'webgpu']. */
  vqArgs?: string[];
  /** Where each child's log goes (DIR/<name>.log); none when unset. */
  logDir?: string;
  /** Health wait limit. Default 180 s. */
  readyTimeoutMs?: number;
  /** Called with progress lines (each child's start names its pid and address). */
  progress?: (line: string) => void;
  /** Restart children that die after the system is up; unset: a dead child stays dead. */
  supervise?: SupervisePolicy;
  /** Give every process a Prometheus endpoint (--metrics-listen on a free loopback port). */
  metrics?: boolean;
  /** Extra environment for every process (e.g. OTEL_* for tracing). */
  env?: Record<string, string>;
  /** The coordinator's --auth-token-file (public API tokens). Default: none, no public auth. */
  authTokenFile?: string;
  /**
   * The pipeline's secret (--internal-token-file of every process). Default: a fresh random one for this run, in a
   * 0600 file in a private temporary directory, removed when the system stops.
   */
  internalTokenFile?: string;
  /** --tls-cert/--tls-key/--tls-ca for every process (mTLS inside, TLS on the coordinator's public port). */
  tls?: TlsFiles;
}

export interface SupervisePolicy extends RestartPolicy {
  /** Lines about deaths and restarts that need attention (default: progress). */
  problem?: (line: string) => void;
  /** Called once when `name` died more than maxRestarts times within windowMs; it is not restarted again. */
  onGiveUp?: (child: Child) => void;
}

export interface Child {
  name: string;
  address: string;
  process: ChildProcess;
  /** The last lines of its stderr/stdout. */
  tail: string[];
  /** The exit code (128 when killed by a signal). */
  exited: Promise<number | null>;
  /** How it ended. */
  ended: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves when the child itself logged "listening" on `address`. */
  listening: Promise<void>;
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
  /** The running children; a restarted child replaces its predecessor in place. */
  children: Child[];
  /**
   * SIGTERM to the coordinator first (it drains its answers), then, once it has exited, to the shards and vq; each
   * group is SIGKILLed if it has not exited `graceMs` after its SIGTERM. Resolves when all have exited.
   */
  stop(graceMs?: number): Promise<void>;
  /** SIGKILL to every child now; resolves when all have exited. */
  kill(): Promise<void>;
  /** The coordinator's ResultSink address (every shard's --allow-reply-to). */
  sinkAddress: string;
  /** The pipeline's secret file every process was given. */
  internalTokenFile: string;
  /** What an internal client (a test, a probe) presents to the shards and vq. */
  internalCredentials: ClientCredentials;
  /** The security flags every shard was started with (to start a replacement by hand). */
  shardSecurityArgs: string[];
}

/** A fresh random pipeline secret in a 0600 file in a new 0700 directory; `remove` deletes both. */
export function writeInternalToken(): { file: string; remove: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-internal-'));
  const file = join(dir, 'internal-token');
  writeFileSync(file, `${randomBytes(32).toString('base64url')}\n`, { mode: 0o600 });
  return { file, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** The value of `--name V` / `--name=V` in `args`, or undefined. */
function flagValue(args: readonly string[], name: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === name) return args[i + 1];
    if (args[i].startsWith(`${name}=`)) return args[i].slice(name.length + 1);
  }
  return undefined;
}

function tlsArgs(tls: TlsFiles | undefined): string[] {
  if (!tls) return [];
  return [
    ...(tls.cert ? ['--tls-cert', tls.cert] : []),
    ...(tls.key ? ['--tls-key', tls.key] : []),
    ...(tls.ca ? ['--tls-ca', tls.ca] : []),
  ];
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

/**
 * A port free to listen on now, for a child to bind in a moment. Taken below Linux's ephemeral range (32768–60999),
 * from which the kernel hands out the local ports of outgoing connections: a port picked there (as port 0 does) can be
 * taken by any connection in the gap between this check and the child's bind.
 */
export async function freePort(): Promise<number> {
  for (let attempt = 0; ; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    // Never the same port twice from one process: the children given earlier ones may not have bound them yet.
    if (handedOut.has(port)) continue;
    if (
      await checkListenable(`127.0.0.1:${port}`).then(
        () => true,
        () => false,
      )
    ) {
      handedOut.add(port);
      return port;
    }
    if (attempt > 200) throw new Error('freePort: no free port found in [20000, 32000)');
  }
}

const handedOut = new Set<number>();

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

export interface ChildOptions {
  /** Append to the log file instead of starting it afresh (a restart). */
  appendLog?: boolean;
  /** Extra environment for the child. */
  env?: Record<string, string>;
}

/**
 * Starts `emu3 <args>` as a child in its own process group (a terminal's Ctrl-C reaches only the parent, which stops
 * the system in order) that stops by itself when the parent goes away (bin/emu3.js watches the stdin pipe).
 */
export function startChild(
  name: string,
  address: string,
  args: string[],
  logDir?: string,
  opts: ChildOptions = {},
): Child {
  const proc = spawn(process.execPath, [binPath(), ...args], {
    stdio: ['pipe', 'pipe', 'pipe'],
    detached: true,
    env: { ...process.env, ...opts.env, EMU3_EXIT_WITH_PARENT: '1' },
  });
  const tail: string[] = [];
  let log: WriteStream | undefined;
  if (logDir) {
    mkdirSync(logDir, { recursive: true });
    log = createWriteStream(join(logDir, `${name}.log`), { flags: opts.appendLog ? 'a' : 'w' });
  }
  let heard!: () => void;
  const listening = new Promise<void>((resolve) => {
    heard = resolve;
  });
  const keep = (line: string) => {
    log?.write(`${line}\n`);
    if (line === '') return;
    tail.push(line);
    if (tail.length > TAIL_LINES) tail.shift();
    if (line.startsWith('{') && line.includes('"listening"')) {
      try {
        const record = JSON.parse(line) as { msg?: string; address?: string };
        if (record.msg === 'listening' && record.address === address) heard();
      } catch {
        // not a log record
      }
    }
  };
  if (proc.stdout) createInterface({ input: proc.stdout }).on('line', keep);
  if (proc.stderr) createInterface({ input: proc.stderr }).on('line', keep);
  proc.stdin?.on('error', () => {}); // the child may be gone before the pipe is closed
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.on('exit', (code, signal) => {
      // The last lines may still be in the pipes: give them a moment before the log file is closed.
      setTimeout(() => {
        log?.end();
        resolve({ code, signal });
      }, 50);
    }),
  );
  const exited = ended.then(({ code, signal }) => code ?? (signal ? 128 : null));
  return { name, address, process: proc, tail, exited, ended, listening };
}

/**
 * Waits until `child` itself logged "listening" on its address and then answers grpc.health.v1 Check('') SERVING
 * there; rejects when it exits first or time runs out.
 */
export async function waitHealthy(child: Child, timeoutMs: number, tls?: TlsFiles): Promise<void> {
  let exitCode: number | null | undefined;
  void child.exited.then((c) => {
    exitCode = c;
  });
  const until = Date.now() + timeoutMs;
  let timer: NodeJS.Timeout | undefined;
  const listened = await Promise.race([
    child.listening.then(() => 'listening' as const),
    child.ended.then((e) => e),
    new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), timeoutMs);
    }),
  ]);
  clearTimeout(timer);
  if (listened === 'timeout') throw new ChildFailed(child, `did not listen within ${timeoutMs} ms`);
  if (listened !== 'listening')
    throw new ChildFailed(child, `${describeExit(listened.code, listened.signal)} before becoming healthy`);
  const client = createClient(HEALTH_PROTO, HEALTH_SERVICE, child.address, { credentials: tls ? { tls } : undefined });
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
      await new Promise((r) => setTimeout(r, 100));
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

function alive(c: Child): boolean {
  return c.process.exitCode === null && c.process.signalCode === null;
}

async function stopGroup(children: Child[], graceMs: number): Promise<void> {
  for (const c of children) if (alive(c)) c.process.kill('SIGTERM');
  const timer = setTimeout(() => {
    for (const c of children) if (alive(c)) c.process.kill('SIGKILL');
  }, graceMs);
  await Promise.all(children.map((c) => c.exited));
  clearTimeout(timer);
}

/** The coordinator first (so it can finish its answers through a live pipeline), then everything else. */
async function stopInOrder(children: Child[], graceMs: number): Promise<void> {
  const isCoordinator = (c: Child) => c.name.startsWith('coordinator');
  await stopGroup(children.filter(isCoordinator), graceMs);
  await stopGroup(
    children.filter((c) => !isCoordinator(c)),
    graceMs,
  );
}

async function killAll(children: Child[]): Promise<void> {
  for (const c of children) if (alive(c)) c.process.kill('SIGKILL');
  await Promise.all(children.map((c) => c.exited));
}

interface ChildRecipe {
  name: string;
  address: string;
  args: string[];
  metricsUrl?: string;
  env?: Record<string, string>;
}

/** Restarts each child of `children` that dies, at its address, until stopped or the policy gives up on it. */
class Supervisor {
  private stopped = false;
  private readonly timers = new Set<NodeJS.Timeout>();

  constructor(
    private readonly children: Child[],
    private readonly recipes: ChildRecipe[],
    private readonly policy: SupervisePolicy,
    private readonly logDir: string | undefined,
    private readonly readyTimeoutMs: number,
    private readonly info: (line: string) => void,
    private readonly tls?: TlsFiles,
  ) {
    for (let i = 0; i < children.length; i++) this.watch(i, []);
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  private problem(line: string): void {
    (this.policy.problem ?? this.info)(line);
  }

  private watch(i: number, failures: number[]): void {
    const child = this.children[i];
    void child.ended.then(({ code, signal }) => {
      if (this.stopped) return;
      this.onDeath(
        i,
        failures,
        `${child.name} (${child.address}, pid ${child.process.pid}) ${describeExit(code, signal)}`,
      );
    });
  }

  private onDeath(i: number, failures: number[], what: string): void {
    const child = this.children[i];
    const decision = onFailure(this.policy, failures, Date.now());
    const lines = child.tail.slice(-10).map((l) => `    ${l}`);
    if (decision.action === 'give-up') {
      this.problem(
        `${what}; giving up on it: ${decision.failures} failures within ${this.policy.windowMs} ms ` +
          `(--max-restarts ${this.policy.maxRestarts}); its last log lines:\n${lines.join('\n')}`,
      );
      this.policy.onGiveUp?.(child);
      return;
    }
    this.problem(
      `${what}; restarting it in ${decision.delayMs} ms (restart ${decision.attempt} of at most ` +
        `${this.policy.maxRestarts} within ${this.policy.windowMs} ms); its last log lines:\n${lines.join('\n')}`,
    );
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.stopped) void this.restart(i, failures);
    }, decision.delayMs);
    this.timers.add(timer);
  }

  private async restart(i: number, failures: number[]): Promise<void> {
    const recipe = this.recipes[i];
    const child = startChild(recipe.name, recipe.address, recipe.args, this.logDir, {
      appendLog: true,
      env: recipe.env,
    });
    child.metricsUrl = recipe.metricsUrl;
    this.children[i] = child;
    this.info(`${recipe.name} restarted (pid ${child.process.pid}) on ${recipe.address}`);
    const started = Date.now();
    try {
      await waitHealthy(child, this.readyTimeoutMs, this.tls);
    } catch (err) {
      if (this.stopped) return;
      if (alive(child)) child.process.kill('SIGKILL');
      await child.exited;
      if (this.stopped) return;
      this.onDeath(
        i,
        failures,
        `${recipe.name} (${recipe.address}) failed to come back: ${(err as Error).message.split('\n')[0]}`,
      );
      return;
    }
    if (this.stopped) return;
    this.info(`${recipe.name} is back on ${recipe.address} (healthy ${Date.now() - started} ms after its restart)`);
    this.watch(i, failures);
  }
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
  if (!coordinatorArgs.some((a) => a === '--max-in-flight' || a.startsWith('--max-in-flight=')))
    coordinatorArgs.push('--max-in-flight', '1');
  const host = '127.0.0.1';
  // The ResultSink's address is fixed now, so every shard can be told it is the only place results may go.
  let sinkAddress = flagValue(coordinatorArgs, '--sink-advertise') ?? flagValue(coordinatorArgs, '--sink-listen');
  if (sinkAddress === undefined) {
    sinkAddress = `${host}:${await freePort()}`;
    coordinatorArgs.push('--sink-listen', sinkAddress);
  } else if (sinkAddress.endsWith(':0'))
    throw new Error(`--sink-listen ${sinkAddress}: give a fixed port (the shards are told it as --allow-reply-to)`);
  const generated = opts.internalTokenFile ? undefined : writeInternalToken();
  const internalTokenFile = opts.internalTokenFile ?? generated!.file;
  const security = ['--internal-token-file', internalTokenFile, ...tlsArgs(opts.tls)];
  const shardSecurityArgs = ['--allow-reply-to', sinkAddress, ...security];
  if (opts.authTokenFile) coordinatorArgs.push('--auth-token-file', opts.authTokenFile);
  const internalToken = new TokenFile(internalTokenFile);
  const internalCredentials: ClientCredentials = { token: () => internalToken.first(), tls: opts.tls };
  const vqAddress = `${host}:${await freePort()}`;
  const shardAddresses: string[] = [];
  for (let i = 0; i < stages.length; i++) shardAddresses.push(`${host}:${await freePort()}`);
  const address = opts.listen ?? `${host}:${await freePort()}`;
  const children: Child[] = [];
  const recipes: ChildRecipe[] = [];
  const timeout = opts.readyTimeoutMs ?? 180_000;
  // With metrics, each child gets --metrics-listen on a free port (kept across restarts); its URL is on the Child.
  const withMetrics = async (recipe: ChildRecipe): Promise<void> => {
    if (!opts.metrics) return;
    const metricsAddress = `${host}:${await freePort()}`;
    recipe.args.push('--metrics-listen', metricsAddress);
    recipe.metricsUrl = `http://${metricsAddress}/metrics`;
  };
  const launch = (recipe: ChildRecipe): Child => {
    recipe.env = opts.env;
    const child = startChild(recipe.name, recipe.address, recipe.args, opts.logDir, { env: opts.env });
    child.metricsUrl = recipe.metricsUrl;
    progress(`${recipe.name} started (pid ${child.process.pid}) on ${recipe.address}`);
    return child;
  };
  try {
    const vq: ChildRecipe = {
      name: 'vq',
      address: vqAddress,
      args: [
        'vq',
        '--vq',
        opts.vqDir ?? join(opts.modelDir, 'vq'),
        '--listen',
        vqAddress,
        ...security,
        ...(opts.vqArgs ?? []),
      ],
    };
    await withMetrics(vq);
    // Last stage first, so each stage's next hop is already starting when it dials it.
    const shards: ChildRecipe[] = [];
    for (let i = stages.length - 1; i >= 0; i--) {
      const [a, b] = stages[i];
      const args = ['shard', '--model', opts.modelDir, '--layers', `${a}-${b}`, '--listen', shardAddresses[i]];
      if (i + 1 < stages.length) args.push('--next', shardAddresses[i + 1]);
      if (opts.precision) args.push('--precision', opts.precision);
      args.push(...shardSecurityArgs, ...shardArgs);
      const shard: ChildRecipe = { name: `shard-${i}`, address: shardAddresses[i], args };
      await withMetrics(shard);
      shards.unshift(shard);
    }
    progress(
      `starting vq on ${vqAddress} and ${stages.length} shard(s): ${stages.map(([a, b], i) => `layers ${a}-${b} on ${shardAddresses[i]}`).join(', ')}`,
    );
    children.push(launch(vq));
    for (const shard of [...shards].reverse()) children.splice(1, 0, launch(shard));
    recipes.push(vq, ...shards);
    await Promise.all(children.map((c) => waitHealthy(c, timeout, opts.tls)));
    const coordinator: ChildRecipe = {
      name: 'coordinator',
      address,
      args: [
        'coordinator',
        '--model',
        opts.modelDir,
        '--shards',
        shardAddresses.join(','),
        '--vq',
        vqAddress,
        '--listen',
        address,
        ...security,
        ...coordinatorArgs,
      ],
    };
    await withMetrics(coordinator);
    progress(`starting the coordinator on ${address}`);
    children.push(launch(coordinator));
    recipes.push(coordinator);
    await waitHealthy(children[children.length - 1], timeout, opts.tls);
  } catch (err) {
    await stopInOrder(children, 3000);
    generated?.remove();
    throw err;
  }
  const supervisor = opts.supervise
    ? new Supervisor(children, recipes, opts.supervise, opts.logDir, timeout, progress, opts.tls)
    : undefined;
  return {
    address,
    vqAddress,
    shardAddresses,
    stages,
    children,
    sinkAddress,
    internalTokenFile,
    internalCredentials,
    shardSecurityArgs,
    stop: async (graceMs = 10_000) => {
      supervisor?.stop();
      await stopInOrder(children, graceMs);
      generated?.remove();
    },
    kill: async () => {
      supervisor?.stop();
      await killAll(children);
      generated?.remove();
    },
  };
}
