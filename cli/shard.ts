// `emu3 shard`: serve one pipeline stage (decoder layers [A, B)) over gRPC.

import { loadEmu3Config } from '../lib/model/config.js';
import { DEVICES, defaultPrecision, INT8_PATH_MIN_TOKENS, PRECISIONS } from '../lib/onnx/stage-graph.js';
import { checkListenable } from '../lib/rpc/serve.js';
import { startServiceTelemetry, TELEMETRY_FLAGS } from '../lib/telemetry/service.js';
import { shardTelemetry } from '../lib/telemetry/shard.js';
import { DEFAULT_KV_BUDGET_BYTES, DEFAULT_MAX_SLOTS } from '../services/shard/capacity.js';
import { DEFAULT_LEASE_MS, startShardServer } from '../services/shard/server.js';
import { type CommandSpec, UsageError } from './args.js';
import type { Command } from './main.js';
import { addressList, INTERNAL_SECURITY_FLAGS, internalSecurityFlags } from './security-flags.js';
import { chooseLayers } from './shard-layers.js';

const spec: CommandSpec = {
  name: 'shard',
  summary: 'serve decoder layers [A, B) of a model as one pipeline stage (emu3.internal.v1.Shard)',
  usage:
    'emu3 shard --model DIR (--layers A-B | --stage-index I --stages N) --listen HOST:PORT [--next HOST:PORT] [flags]',
  flags: {
    ...TELEMETRY_FLAGS,
    model: { help: 'model directory (config.json, safetensors, tokenizer files), required' },
    layers: {
      help: 'decoder layers A-B served here: [A, B), B exclusive (e.g. 0-16); one of --layers or --stage-index with --stages is required',
    },
    'stage-index': {
      help: 'this stage, 0-based, of --stages: serves the layers `emu3 up` gives that stage (default: none, use --layers)',
    },
    stages: {
      help: 'pipeline stages, with --stage-index (layers split by weight per token, as `emu3 up` does; default: none)',
    },
    listen: {
      help: 'address to serve on, host:port (port 0 picks a free one; the "listening" log line says which)',
      default: '127.0.0.1:50061',
    },
    next: { help: 'address of the next stage; required unless B is the last layer, refused if it is' },
    'allow-reply-to': {
      help: 'the coordinator ResultSink address(es), comma-separated (its --sink-advertise, else --sink-listen), the only ones this stage sends results and errors to; a micro-batch naming another is not run; required',
    },
    ...INTERNAL_SECURITY_FLAGS,
    precision: {
      help: 'weight precision: fp32, int4 (MatMulNBits, block 32) or fp16 (webgpu only; weights and KV in half); default fp16 on --device webgpu, else fp32',
    },
    device: {
      help: 'where ORT runs the stage: cpu, webgpu (ONNX Runtime WebGPU over Vulkan; docs/gpu.md) or cuda (needs ORT CUDA libraries)',
      default: 'cpu',
    },
    'kv-budget': {
      help: "bytes for this stage's KV arena; slots = min(--max-slots, budget ÷ (slot tokens × bytes per token))",
      default: String(DEFAULT_KV_BUDGET_BYTES),
    },
    'max-slots': {
      help: 'most KV slots (sequences or cached prefixes held at once)',
      default: String(DEFAULT_MAX_SLOTS),
    },
    'slot-tokens': { help: "positions one slot holds (default: the model's max_position_embeddings)" },
    'cache-dir': {
      help: 'graph cache directory (default: $EMU3_CACHE_DIR, else <model>/.emu3-cache, else ~/.cache/emu3-serve)',
    },
    'no-int8-prefill': {
      boolean: true,
      help: `int4 on cpu: leave out the int8 prefill path (runs of ≥ ${INT8_PATH_MIN_TOKENS} tokens multiply int8 re-quantised weights; it adds one byte per layer weight; docs/serving.md)`,
    },
    threads: { help: 'ORT intra-op threads (default: all cores)' },
    'no-spin': {
      boolean: true,
      help: 'idle ORT threads sleep at once instead of spin-waiting (for shards sharing cores with other processes)',
    },
    'coordinator-lease': {
      help: 'ms without a request from the current coordinator (batches, KV commands, heartbeats) after which all KV is freed; 0 = never',
      default: String(DEFAULT_LEASE_MS),
    },
    'drain-timeout-ms': {
      help: 'on SIGTERM/SIGINT, how long queued micro-batches may take before the rest are cut off',
      default: '30000',
    },
  },
};

export function parseLayers(s: string): [number, number] {
  const m = /^(\d+)-(\d+)$/.exec(s);
  if (!m) throw new UsageError(`shard: --layers must look like A-B (layers [A, B)), got "${s}"`);
  const range: [number, number] = [Number(m[1]), Number(m[2])];
  if (range[0] >= range[1]) throw new UsageError(`shard: --layers ${s} must have A < B (B is exclusive)`);
  return range;
}

export const command: Command = {
  spec,
  async run(flags) {
    await checkListenable(flags.required('listen'));
    const telemetry = await startServiceTelemetry('shard', {
      metricsListen: flags.string('metrics-listen'),
      logFormat: flags.string('log-format'),
      registry: () => shardTelemetry().registry,
    });
    const log = telemetry.log;
    const modelDir = flags.required('model');
    const layerFlag = flags.string('layers');
    const layers = chooseLayers(
      {
        layers: layerFlag === undefined ? undefined : parseLayers(layerFlag),
        stageIndex: flags.int('stage-index', 0),
        stages: flags.int('stages', 1),
      },
      () => loadEmu3Config(modelDir),
    );
    const security = internalSecurityFlags(flags, 'shard', log);
    const running = await startShardServer({
      modelDir,
      layers,
      address: flags.required('listen'),
      next: flags.string('next'),
      precision: flags.oneOf('precision', PRECISIONS) ?? defaultPrecision(flags.oneOf('device', DEVICES)),
      device: flags.oneOf('device', DEVICES) ?? 'cpu',
      int8Prefill: !flags.bool('no-int8-prefill'),
      kvBudgetBytes: flags.int('kv-budget', 1),
      maxSlots: flags.int('max-slots', 1, 1_000_000),
      slotTokens: flags.int('slot-tokens', 1),
      cacheDir: flags.string('cache-dir'),
      threads: flags.int('threads', 1, 1024),
      spin: !flags.bool('no-spin'),
      leaseMs: flags.int('coordinator-lease', 0, 2_147_483_647),
      log: log.child({ layers: `${layers[0]}-${layers[1]}` }),
      drainTimeoutMs: flags.int('drain-timeout-ms', 0),
      allowReplyTo: addressList(flags.string('allow-reply-to'), 'allow-reply-to', 'shard'),
      security,
    });
    await running.server.closed;
    await telemetry.shutdown();
    return 0;
  },
};
