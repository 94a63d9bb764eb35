// `emu3 vq`: serve the VQ image tokenizer over gRPC, or run its pipeline once from the command line.
//   emu3 vq --vq DIR --listen ADDR [--device cpu|webgpu|cuda] [--max-pixels N] [--queue N] [--workers N] [--cache-dir DIR]
//   emu3 vq encode --vq DIR IMAGE              → prints { "h", "w", "codes": [[...], ...] }
//   emu3 vq decode --vq DIR CODES.json OUT.png
import { readFileSync, writeFileSync } from 'node:fs';
import { DEVICES } from '../lib/onnx/stage-graph.js';
import { RpcError } from '../lib/rpc/errors.js';
import { createLogger } from '../lib/rpc/log.js';
import { checkListenable, DEFAULT_MAX_MESSAGE_BYTES } from '../lib/rpc/serve.js';
import { startServiceTelemetry, TELEMETRY_FLAGS } from '../lib/telemetry/service.js';
import { vqTelemetry } from '../lib/telemetry/vq.js';
import { VqCodec } from '../lib/vq/codec.js';
import { DEFAULT_MAX_INPUT_PIXELS } from '../lib/vq/image-decode.js';
import { gridFromJson, gridToJson } from '../services/vq/codes.js';
import {
  checkImage,
  decodeToPng,
  encodeImage,
  loadVqModelInfo,
  mapVqError,
  type VqModelInfo,
} from '../services/vq/pipeline.js';
import { DEFAULT_QUEUE_LIMIT, startVqServer } from '../services/vq/server.js';
import { type CommandSpec, type Flags, UsageError } from './args.js';
import type { Command } from './main.js';
import { INTERNAL_SECURITY_FLAGS, internalSecurityFlags } from './security-flags.js';

const spec: CommandSpec = {
  name: 'vq',
  summary: 'VQ image tokenizer: serve it over gRPC, or encode / decode one image',
  usage: [
    'emu3 vq --vq DIR [--listen HOST:PORT] [flags]     serve emu3.internal.v1.VqService + grpc.health.v1',
    '       emu3 vq encode --vq DIR IMAGE               print the code grid of IMAGE as JSON',
    '       emu3 vq decode --vq DIR CODES.json OUT.png  decode a code grid (JSON as printed by encode) to a PNG',
  ].join('\n'),
  flags: {
    ...TELEMETRY_FLAGS,
    vq: { help: 'VQ directory: config.json, model.safetensors, preprocessor_config.json (required)' },
    listen: {
      help: 'address to serve on, host:port (port 0 picks a free one; the "listening" log line says which)',
      default: '127.0.0.1:50052',
    },
    'max-pixels': {
      help: 'largest accepted input image, width×height read from its header before decoding',
      default: String(DEFAULT_MAX_INPUT_PIXELS),
    },
    queue: {
      help: 'requests that may wait for a busy worker; one more gets RESOURCE_EXHAUSTED',
      default: String(DEFAULT_QUEUE_LIMIT),
    },
    workers: { help: 'codec workers (ORT worker threads), each running one request at a time', default: '1' },
    threads: { help: 'ORT threads per worker (default: the cores divided among the workers)' },
    device: {
      help: 'where ORT runs the encoder and decoder: cpu, webgpu (ONNX Runtime WebGPU over Vulkan; docs/gpu.md) or cuda (needs ORT CUDA libraries)',
      default: 'cpu',
    },
    'cache-dir': {
      help: 'where built ONNX graphs are cached (default: $EMU3_CACHE_DIR, else <vq dir>/.emu3-cache if writable, else ~/.cache/emu3-serve)',
    },
    'max-message-bytes': {
      help: 'largest request message; larger ones get RESOURCE_EXHAUSTED',
      default: String(DEFAULT_MAX_MESSAGE_BYTES),
    },
    'drain-timeout-ms': {
      help: 'on SIGTERM/SIGINT, how long in-flight requests may take before they are cut off',
      default: '30000',
    },
    ...INTERNAL_SECURITY_FLAGS,
  },
};

async function serveCommand(flags: Flags): Promise<number> {
  await checkListenable(flags.required('listen'));
  const telemetry = await startServiceTelemetry('vq', {
    metricsListen: flags.string('metrics-listen'),
    logFormat: flags.string('log-format'),
    registry: () => vqTelemetry().registry,
  });
  const log = telemetry.log;
  const security = internalSecurityFlags(flags, 'vq', log);
  const server = await startVqServer({
    security,
    vqDir: flags.required('vq'),
    address: flags.required('listen'),
    log,
    pixelLimit: flags.int('max-pixels', 1),
    queueLimit: flags.int('queue', 0, 1_000_000),
    workers: flags.int('workers', 1, 64),
    threads: flags.int('threads', 1, 1024),
    device: flags.oneOf('device', DEVICES),
    cacheDir: flags.string('cache-dir'),
    maxMessageBytes: flags.int('max-message-bytes', 1024, 2 ** 31 - 1),
    drainTimeoutMs: flags.int('drain-timeout-ms', 0),
  });
  await server.closed;
  await telemetry.shutdown();
  return 0;
}

/** The pipeline's input errors (bad image, bad codes) are shown as plain messages naming the file. */
async function withInputErrors<T>(source: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    const mapped = err instanceof RpcError ? err : mapVqError(err);
    if (!mapped) throw err;
    throw new Error(mapped.message.startsWith(source) ? mapped.message : `${source}: ${mapped.message}`);
  }
}

async function withCodec<T>(flags: Flags, info: VqModelInfo, fn: (codec: VqCodec) => Promise<T>): Promise<T> {
  const log = createLogger('vq');
  const codec = await VqCodec.open(info.dir, {
    cacheDir: flags.string('cache-dir'),
    threads: flags.int('threads', 1, 1024),
    device: flags.oneOf('device', DEVICES),
    log: (msg) => log.info('codec', { detail: msg }),
  });
  try {
    return await fn(codec);
  } finally {
    await codec.close();
  }
}

async function encodeCommand(flags: Flags, args: string[]): Promise<number> {
  if (args.length !== 1) throw new UsageError('vq encode: expected one IMAGE path (emu3 vq encode --vq DIR IMAGE)');
  const [imagePath] = args;
  const info = loadVqModelInfo(flags.required('vq'), flags.int('max-pixels', 1));
  const bytes = readFileSync(imagePath);
  await withInputErrors(imagePath, () => checkImage(bytes, info)); // a bad file fails before the model loads
  const encoded = await withCodec(flags, info, (codec) =>
    withInputErrors(imagePath, () => encodeImage(codec, bytes, info)),
  );
  const grid = gridToJson(encoded.h, encoded.w, encoded.codes);
  // One row per line: readable, and still plain JSON.
  const rows = grid.codes.map((row) => `    ${JSON.stringify(row)}`).join(',\n');
  process.stdout.write(`{\n  "h": ${grid.h},\n  "w": ${grid.w},\n  "codes": [\n${rows}\n  ]\n}\n`);
  return 0;
}

async function decodeCommand(flags: Flags, args: string[]): Promise<number> {
  if (args.length !== 2)
    throw new UsageError('vq decode: expected CODES.json and OUT.png (emu3 vq decode --vq DIR CODES.json OUT.png)');
  const [codesPath, outPath] = args;
  const info = loadVqModelInfo(flags.required('vq'));
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(codesPath, 'utf8'));
  } catch (err) {
    throw new Error(`${codesPath}: cannot read the code grid: ${(err as Error).message}`);
  }
  const grid = await withInputErrors(codesPath, async () => gridFromJson(json, codesPath, info));
  const decoded = await withCodec(flags, info, (codec) => decodeToPng(codec, grid.codes, grid.h, grid.w, info));
  writeFileSync(outPath, decoded.png);
  console.error(`wrote ${outPath} (${decoded.width}x${decoded.height} PNG from a ${grid.h}x${grid.w} code grid)`);
  return 0;
}

export const command: Command = {
  spec,
  async run(flags, positionals) {
    const [sub, ...rest] = positionals;
    if (sub === undefined) return serveCommand(flags);
    if (sub === 'encode') return encodeCommand(flags, rest);
    if (sub === 'decode') return decodeCommand(flags, rest);
    throw new UsageError(`vq: unknown subcommand "${sub}" (expected encode, decode, or none to serve)`);
  },
};
