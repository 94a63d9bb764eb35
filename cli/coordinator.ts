import { checkListenable } from '../lib/rpc/serve.js';
import { coordinatorTelemetry } from '../lib/telemetry/coordinator.js';
import { startServiceTelemetry, TELEMETRY_FLAGS } from '../lib/telemetry/service.js';
import { defaultLimits, type RequestLimits } from '../services/coordinator/request-validation.js';
import { startCoordinator } from '../services/coordinator/server.js';
import { type CommandSpec, UsageError } from './args.js';
import type { Command } from './main.js';
import { AUTH_TOKEN_FLAG, authTokenFlag, INTERNAL_SECURITY_FLAGS, internalSecurityFlags } from './security-flags.js';

const spec: CommandSpec = {
  name: 'coordinator',
  summary: 'public emu3.v1.Emu3 service: validation, prompts, scheduling, KV lifecycle, sampling, streaming',
  usage: 'emu3 coordinator --model DIR --shards ADDR,ADDR,... --vq ADDR [--listen HOST:PORT] [flags]',
  flags: {
    ...TELEMETRY_FLAGS,
    model: { help: 'model directory (config.json + tokenizer files; the weights are read by the shards), required' },
    shards: {
      help: 'the shard addresses in pipeline order, comma-separated; together they must cover every layer once, required',
    },
    vq: { help: 'address of the VQ service (emu3 vq), required' },
    listen: { help: 'public address, host:port (port 0 picks a free one)', default: '127.0.0.1:50051' },
    'sink-listen': {
      help: 'address of the ResultSink the last stage sends results to (port 0 picks a free one)',
      default: '127.0.0.1:0',
    },
    'sink-advertise': { help: 'ResultSink address given to the last stage (default: the bound --sink-listen address)' },
    'max-queue': { help: 'requests that may wait for KV; one more gets RESOURCE_EXHAUSTED', default: '64' },
    'max-batch-tokens': {
      help: 'tokens per micro-batch (decodes count 1, prefill chunks their length)',
      default: '256',
    },
    'max-batch-seqs': { help: 'sequences per micro-batch', default: '64' },
    'max-in-flight': { help: 'micro-batches in flight (default: the number of stages)' },
    'prefix-cache-entries': { help: 'cached prompt prefixes kept on the shards (0 = no prefix cache)', default: '16' },
    'min-prefix-match': { help: 'shortest shared prefix taken from the cache', default: '4' },
    'max-images': { help: 'most image parts per request', default: '4' },
    'max-image-bytes': { help: 'most bytes per image', default: String(defaultLimits.maxImageBytes) },
    'max-text-chars': { help: 'most characters over all text parts', default: String(defaultLimits.maxTextChars) },
    'max-stop-strings': { help: 'most stop strings per request', default: String(defaultLimits.maxStopStrings) },
    'max-stop-chars': { help: 'most characters per stop string', default: String(defaultLimits.maxStopChars) },
    'max-top-k': {
      help: `largest top_k (default: ${defaultLimits.maxTopK}, or fewer when the last stage returns fewer candidates)`,
    },
    'max-top-logprobs': { help: 'largest top_logprobs', default: String(defaultLimits.maxTopLogprobs) },
    'max-request-id-chars': {
      help: 'most characters of a request_id',
      default: String(defaultLimits.maxRequestIdChars),
    },
    'max-message-bytes': {
      help: 'largest request message; larger ones get RESOURCE_EXHAUSTED',
      default: String(96 * 1024 * 1024),
    },
    'start-timeout-ms': { help: 'how long to wait for the shards and the vq to answer at start', default: '120000' },
    'drain-timeout-ms': {
      help: 'on SIGTERM/SIGINT: new requests are refused, running answers may finish this long, then end with FINISH_REASON_CANCELLED',
      default: '30000',
    },
    'stage-timeout-ms': {
      help: 'a stage (shard) not answering this long fails the requests it holds with UNAVAILABLE naming it',
      default: '30000',
    },
    'max-recoveries': {
      help: 'times one request is prefilled again after a stage lost its KV before it fails with UNAVAILABLE',
      default: '3',
    },
    ...AUTH_TOKEN_FLAG,
    ...INTERNAL_SECURITY_FLAGS,
  },
};

export const command: Command = {
  spec,
  async run(flags) {
    await checkListenable(flags.required('listen'));
    const shards = flags
      .required('shards')
      .split(',')
      .map((s) => s.trim())
      .filter((s) => s !== '');
    if (shards.length === 0) throw new UsageError('coordinator: --shards needs at least one address');
    const limits: Partial<RequestLimits> = {
      maxImageBytes: flags.int('max-image-bytes', 1, 2 ** 31 - 1)!,
      maxTextChars: flags.int('max-text-chars', 1, 100_000_000)!,
      maxStopStrings: flags.int('max-stop-strings', 0, 1024)!,
      maxStopChars: flags.int('max-stop-chars', 1, 65_536)!,
      maxTopLogprobs: flags.int('max-top-logprobs', 0, 1024)!,
      maxRequestIdChars: flags.int('max-request-id-chars', 0, 65_536)!,
    };
    const maxTopK = flags.int('max-top-k', 0, 1_000_000);
    if (maxTopK !== undefined) limits.maxTopK = maxTopK;
    const telemetry = await startServiceTelemetry('coordinator', {
      metricsListen: flags.string('metrics-listen'),
      logFormat: flags.string('log-format'),
      registry: () => coordinatorTelemetry().registry,
    });
    const security = internalSecurityFlags(flags, 'coordinator', telemetry.log);
    const publicAuth = authTokenFlag(flags, 'coordinator', telemetry.log);
    const coordinator = await startCoordinator({
      security,
      publicAuth,
      modelDir: flags.required('model'),
      shards,
      vq: flags.required('vq'),
      listen: flags.required('listen'),
      sinkListen: flags.required('sink-listen'),
      sinkAdvertise: flags.string('sink-advertise'),
      maxQueue: flags.int('max-queue', 0, 1_000_000)!,
      maxBatchTokens: flags.int('max-batch-tokens', 1, 1_000_000)!,
      maxBatchSeqs: flags.int('max-batch-seqs', 1, 100_000)!,
      maxInFlight: flags.int('max-in-flight', 1, 1024),
      prefixCacheEntries: flags.int('prefix-cache-entries', 0, 100_000)!,
      minPrefixMatch: flags.int('min-prefix-match', 1, 1_000_000)!,
      maxImages: flags.int('max-images', 0, 1024)!,
      limits,
      maxMessageBytes: flags.int('max-message-bytes', 1024, 2 ** 31 - 1)!,
      startTimeoutMs: flags.int('start-timeout-ms', 0)!,
      drainTimeoutMs: flags.int('drain-timeout-ms', 0)!,
      stageTimeoutMs: flags.int('stage-timeout-ms', 0)!,
      maxRecoveries: flags.int('max-recoveries', 0, 1000)!,
      log: telemetry.log,
    });
    await coordinator.closed;
    await telemetry.shutdown();
    return 0;
  },
};
