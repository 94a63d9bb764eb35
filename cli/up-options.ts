// `emu3 up`'s flags, checked before anything starts: addresses parse with ports in range, precision is known, the
// model and VQ directories hold a config.json (the default model directory may be missing: it is generated), the
// numbers are in range, and extra child flags look like flags.
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { DEVICES, defaultPrecision, PRECISIONS } from '../lib/onnx/stage-graph.js';
import { parseTokens } from '../lib/rpc/auth.js';
import { parseAddress } from '../lib/rpc/serve.js';
import { type CommandSpec, type Flags, UsageError } from './args.js';
import { DEFAULT_RESTART_POLICY, type RestartPolicy } from './restart-policy.js';

export const DEFAULT_MODEL = join('models', 'emu3-tiny');

export const upSpec: CommandSpec = {
  name: 'up',
  summary:
    'start vq, the shards and the coordinator as separate processes and keep them running (emu3-tiny by default)',
  usage: 'emu3 up [--model DIR] [--shards N] [--listen HOST:PORT] [flags]    (npm start -- [flags])',
  flags: {
    model: {
      help: 'model directory; generated (emu3 make-tiny) when it is the default and missing',
      default: DEFAULT_MODEL,
    },
    vq: { help: 'VQ model directory (default: <model>/vq)' },
    shards: {
      help: 'pipeline stages, each a process; layers are split so every stage reads about the same weight bytes per token (the last stage also runs lm_head, so it gets fewer layers)',
      default: '2',
    },
    listen: { help: 'public address of the coordinator (port 0 picks a free one)', default: '127.0.0.1:50051' },
    'http-listen': {
      help: 'address of the OpenAI-compatible HTTP API (emu3 gateway, in this process; port 0 picks a free one; "off" for none)',
      default: '127.0.0.1:8000',
    },
    precision: {
      help: `shard weight precision: ${PRECISIONS.join(', ')} (fp16: webgpu only); default fp16 on --device webgpu, else fp32`,
    },
    device: {
      help: `where the shards and vq run ORT: ${DEVICES.join(', ')} (emu3 shard --device, emu3 vq --device; docs/gpu.md)`,
      default: 'cpu',
    },
    'log-dir': { help: 'write each process log to DIR/<name>.log (default: logs are kept in memory only)' },
    'ready-timeout-ms': { help: 'how long each process may take to become healthy', default: '300000' },
    'drain-timeout-ms': {
      help: 'on the first Ctrl-C / SIGTERM, how long running answers may take to finish (the coordinator then ends the rest with FINISH_REASON_CANCELLED); a second Ctrl-C kills everything at once',
      default: '30000',
    },
    'max-restarts': {
      help: 'restarts of one process allowed within --restart-window-ms; one more death gives up on it (0: never restart)',
      default: String(DEFAULT_RESTART_POLICY.maxRestarts),
    },
    'restart-window-ms': {
      help: 'the window --max-restarts counts in',
      default: String(DEFAULT_RESTART_POLICY.windowMs),
    },
    'restart-backoff-ms': {
      help: 'delay before the first restart in the window; doubled for each further one',
      default: String(DEFAULT_RESTART_POLICY.backoffMs),
    },
    'max-restart-backoff-ms': {
      help: 'longest delay before a restart',
      default: String(DEFAULT_RESTART_POLICY.maxBackoffMs),
    },
    'coordinator-arg': {
      help: 'an extra flag for the coordinator, e.g. --coordinator-arg=--max-text-chars=1000 (repeatable; see emu3 coordinator --help; default: none)',
      repeatable: true,
    },
    'auth-token-file': {
      help: 'public API tokens, one a line (re-read on change): the coordinator and the HTTP API then refuse every call but health without "authorization: Bearer <token>" (default: none, no public auth)',
    },
    tls: {
      boolean: true,
      help: "TLS everywhere: a throwaway CA and certificate made with openssl for this run; mTLS between the processes, TLS on the public port and the HTTP API (the CA's path is printed for clients)",
    },
    'no-metrics': { boolean: true, help: 'start no Prometheus endpoints (default: one per process on a free port)' },
    'shard-arg': {
      help: 'an extra flag for every shard, e.g. --shard-arg=--max-slots=32 (repeatable; see emu3 shard --help; default: none)',
      repeatable: true,
    },
  },
};

export interface UpOptions {
  modelDir: string;
  /** The model directory is the default and missing: generate emu3-tiny there first. */
  generateModel: boolean;
  vqDir?: string;
  shards: number;
  listen: string;
  /** The OpenAI-compatible gateway's address; undefined: none. */
  httpListen?: string;
  precision: string;
  logDir?: string;
  readyTimeoutMs: number;
  drainTimeoutMs: number;
  restart: RestartPolicy;
  coordinatorArgs: string[];
  shardArgs: string[];
  /** Extra flags for vq (its --device). */
  vqArgs: string[];
  /** A Prometheus endpoint per process (--no-metrics turns them off). */
  metrics: boolean;
  /** --auth-token-file: public API tokens for the coordinator and the HTTP API. */
  authTokenFile?: string;
  /** --tls: a throwaway CA for this run. */
  tls: boolean;
}

const DAY_MS = 86_400_000;

function extraFlags(flags: Flags, name: string): string[] {
  const out: string[] = [];
  for (const arg of flags.all(name)) {
    if (!arg.startsWith('--')) throw new UsageError(`up: --${name} "${arg}" must be a flag such as --max-queue=8`);
    out.push(arg);
  }
  return out;
}

function checkedTokenFile(file: string | undefined): string | undefined {
  if (file === undefined) return undefined;
  let tokens: string[];
  try {
    tokens = parseTokens(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new UsageError(`up: --auth-token-file ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`);
  }
  if (tokens.length === 0) throw new UsageError(`up: --auth-token-file ${file} holds no token`);
  return file;
}

/** Reads and checks every flag; a UsageError names the first bad one. Starts nothing. */
export function upOptions(flags: Flags): UpOptions {
  const listen = flags.required('listen');
  try {
    parseAddress(listen);
  } catch (err) {
    throw new UsageError(`up: --listen: ${(err as Error).message}`);
  }
  const http = flags.required('http-listen');
  if (http !== 'off')
    try {
      parseAddress(http);
    } catch (err) {
      throw new UsageError(`up: --http-listen: ${(err as Error).message}`);
    }
  const modelDir = flags.required('model');
  const hasConfig = existsSync(join(modelDir, 'config.json'));
  const isDefault = resolve(modelDir) === resolve(DEFAULT_MODEL);
  if (!hasConfig && !isDefault) throw new UsageError(`up: --model ${modelDir}: no config.json there`);
  const vqDir = flags.string('vq');
  if (vqDir !== undefined && !existsSync(join(vqDir, 'config.json')))
    throw new UsageError(`up: --vq ${vqDir}: no config.json there`);
  if (vqDir === undefined && hasConfig && !existsSync(join(modelDir, 'vq', 'config.json')))
    throw new UsageError(`up: ${join(modelDir, 'vq')}: no config.json there (give the VQ directory with --vq DIR)`);
  const device = flags.oneOf('device', DEVICES)!;
  const deviceArgs = device === 'cpu' ? [] : ['--device', device];
  const precision = flags.oneOf('precision', PRECISIONS) ?? defaultPrecision(device);
  const restart: RestartPolicy = {
    maxRestarts: flags.int('max-restarts', 0, 1000)!,
    windowMs: flags.int('restart-window-ms', 1, DAY_MS)!,
    backoffMs: flags.int('restart-backoff-ms', 0, DAY_MS)!,
    maxBackoffMs: flags.int('max-restart-backoff-ms', 0, DAY_MS)!,
  };
  if (restart.maxBackoffMs < restart.backoffMs)
    throw new UsageError('up: --max-restart-backoff-ms must be at least --restart-backoff-ms');
  return {
    modelDir,
    generateModel: !hasConfig,
    vqDir,
    shards: flags.int('shards', 1, 1024)!,
    listen,
    httpListen: http === 'off' ? undefined : http,
    precision,
    logDir: flags.string('log-dir'),
    readyTimeoutMs: flags.int('ready-timeout-ms', 1000, DAY_MS)!,
    drainTimeoutMs: flags.int('drain-timeout-ms', 0, DAY_MS)!,
    restart,
    coordinatorArgs: extraFlags(flags, 'coordinator-arg'),
    shardArgs: [...deviceArgs, ...extraFlags(flags, 'shard-arg')],
    vqArgs: deviceArgs,
    metrics: !flags.bool('no-metrics'),
    authTokenFile: checkedTokenFile(flags.string('auth-token-file')),
    tls: flags.bool('tls'),
  };
}
