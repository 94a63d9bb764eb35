// The coordinator process: checks the pipeline (every shard's Info), opens the Forward stream to stage 0, serves
// ResultSink for the last stage and the public emu3.v1.Emu3 service (+ grpc.health.v1 and server reflection).
import { randomInt } from 'node:crypto';
import { basename, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { loadEmu3Config } from '../../lib/model/config.js';
import { type CodeGrid, generationPrompts, understandingPromptIds } from '../../lib/prompt/prompt.js';
import { isHealth, type TokenFile } from '../../lib/rpc/auth.js';
import { RpcError } from '../../lib/rpc/errors.js';
import { implement, serverStream, unary } from '../../lib/rpc/handlers.js';
import { HEALTH_PROTO } from '../../lib/rpc/health.js';
import { type InternalSecurity, internalClient, internalServe, warnIfOpen } from '../../lib/rpc/internal-security.js';
import type { Logger } from '../../lib/rpc/log.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { decodeRequestsInHandlers } from '../../lib/rpc/request-decoding.js';
import { type RunningServer, type ServiceBinding, serve } from '../../lib/rpc/serve.js';
import type { ForwardResponse } from '../../lib/rpc/shard-wire.js';
import { coordinatorTelemetry } from '../../lib/telemetry/coordinator.js';
import type { SpanHandle } from '../../lib/telemetry/tracing.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { Engine, type EngineEvent } from './engine.js';
import { typedStatus } from './errors.js';
import { EventQueue } from './event-queue.js';
import { commonCapacity } from './kv-manager.js';
import { PipelineClient } from './pipeline-client.js';
import { Recovery } from './recovery.js';
import {
  checkImagePromptLength,
  checkPromptLength,
  defaultLimits,
  type GenerateRequestLike,
  type RequestLimits,
  type ValidImage,
  type ValidPart,
  type ValidRequest,
  validateGenerateRequest,
} from './request-validation.js';
import { resultSinkBinding } from './result-sink.js';
import type { PipelineShape, StageDescription } from './topology.js';
import { VqClient, type VqInfo } from './vq-client.js';

export const PUBLIC_PROTO = 'emu3/v1/emu3.proto';
export const PUBLIC_SERVICE = 'emu3.v1.Emu3';

export interface CoordinatorOptions {
  modelDir: string;
  shards: string[];
  vq: string;
  listen: string;
  /** Where the ResultSink listens; port 0 picks one. */
  sinkListen: string;
  /** The ResultSink address the last stage dials (default: the bound sink address). */
  sinkAdvertise?: string;
  maxQueue: number;
  maxBatchTokens: number;
  maxBatchSeqs: number;
  /** Micro-batches in flight (default: the number of stages). */
  maxInFlight?: number;
  prefixCacheEntries: number;
  minPrefixMatch: number;
  maxImages: number;
  /** Request limits beyond the defaults (coordinator flags). */
  limits?: Partial<RequestLimits>;
  maxMessageBytes: number;
  /** How long to wait for the shards' and the vq's first answer. */
  startTimeoutMs: number;
  drainTimeoutMs: number;
  /** A stage not back this long after it was lost fails the requests the engine holds (UNAVAILABLE). Default 30 s. */
  stageTimeoutMs?: number;
  /** Times one request is prefilled again after lost KV before it fails. Default 3. */
  maxRecoveries?: number;
  log: Logger;
  handleSignals?: boolean;
  /** Public API tokens (--auth-token-file): every public call but health needs one. Unset: no public auth. */
  publicAuth?: TokenFile;
  /**
   * The pipeline's secret and mTLS: presented to the shards and vq, demanded by the ResultSink. Its certificate also
   * serves TLS on the public port (no client certificate asked there: the public side authenticates by token).
   */
  security?: InternalSecurity;
}

export interface RunningCoordinator {
  server: RunningServer;
  sinkAddress: string;
  engine: Engine;
  shape: PipelineShape;
  shutdown(reason: string): Promise<void>;
  closed: Promise<void>;
}

/** The public proto with the options request-validation expects: camelCase, unset optionals stay undefined. */
function publicPackage(): protoLoader.PackageDefinition {
  const root = protoRoot();
  return protoLoader.loadSync([join(root, PUBLIC_PROTO), join(root, HEALTH_PROTO)], {
    keepCase: false,
    defaults: false,
    oneofs: true,
    longs: Number,
    enums: String,
    bytes: Buffer,
    includeDirs: [root],
  });
}

/** The coordinator's typed errors as statuses; anything else is left to the wrapper, which answers INTERNAL. */
function mapCoordinatorError(err: unknown): RpcError | undefined {
  const status = typedStatus(err);
  return status && new RpcError(status.code, status.message);
}

interface Deps {
  tokenizer: Emu3Tokenizer;
  engine: Engine;
  vq: VqClient;
  limits: RequestLimits;
  shape: PipelineShape;
  stages: StageDescription[];
  modelName: string;
  opts: CoordinatorOptions;
}

async function buildPrompt(
  deps: Deps,
  parts: ValidPart[],
  signal: AbortSignal,
  trace?: SpanHandle,
): Promise<{ prompt: number[]; grids: CodeGrid[]; vqMs: number }> {
  const grids: CodeGrid[] = [];
  let text = '';
  const started = performance.now();
  let index = 0;
  for (const p of parts) {
    if (p.kind === 'text') text += p.text;
    else grids.push(await deps.vq.encode(p.data, p.mimeType, `parts[${index}].image`, signal, trace));
    index++;
  }
  const vqMs = grids.length > 0 ? performance.now() - started : 0;
  return { prompt: understandingPromptIds(deps.tokenizer, text, grids), grids, vqMs };
}

/** The two prompts of an image request (the text parts joined, as the understanding prompt joins them). */
function imagePrompts(deps: Deps, v: Pick<ValidRequest, 'parts'>, image: ValidImage) {
  const text = v.parts.map((p) => (p.kind === 'text' ? p.text : '')).join('');
  const { prompt, negative } = generationPrompts(deps.tokenizer, text, image.grid, {
    negativePrompt: image.negativePrompt,
    qualitySuffix: image.qualitySuffix,
  });
  checkImagePromptLength(prompt.length, negative.length, image.grid, deps.limits.contextLength);
  return { prompt, negative };
}

type Send = (msg: object) => Promise<void>;

/**
 * TASK_GENERATE_IMAGE: the conditional and unconditional prompts go to the engine as one job (a guidance pair);
 * a row done is one progress message; the finished grid is decoded by the VQ service into the final PNG.
 */
async function generateImage(
  deps: Deps,
  v: ValidRequest,
  requestId: string,
  received: number,
  send: Send,
  signal: AbortSignal,
  obs: { span?: SpanHandle; event(e: Exclude<EngineEvent, { type: 'progress' }>): void; traceId?: string },
  log: Logger,
): Promise<void> {
  const image = v.image!;
  const { prompt, negative } = imagePrompts(deps, v, image);
  const seed = v.sampling.seed ?? (v.sampling.temperature === 0 ? 0 : randomInt(0, 2 ** 32));
  const events = new EventQueue();
  const handle = deps.engine.submit({
    trace: obs.span,
    prompt,
    image: { grid: image.grid, negativePrompt: negative, guidanceScale: image.guidanceScale },
    maxNewTokens: image.grid.height * (image.grid.width + 1) + 3,
    sampling: v.sampling,
    seed,
    topLogprobs: 0,
    returnTokenIds: false,
    onEvent: (e) => events.push(e),
  });
  const onAbort = () => handle.cancel();
  signal.addEventListener('abort', onAbort, { once: true });
  let queueMs = 0;
  try {
    for (;;) {
      const e = await events.next(signal);
      if (e.type === 'progress') {
        await send({
          progress: {
            rowsDone: e.rowsDone,
            rows: e.rows,
            rowCodes: image.previewRows ? Array.from(e.rowCodes) : [],
          },
        });
        continue;
      }
      obs.event(e);
      if (e.type === 'admitted') queueMs = e.queueMs;
      else if (e.type === 'error') throw mapCoordinatorError(e.error) ?? e.error;
      else if (e.type === 'final') {
        let png: { png: Buffer; width: number; height: number } | null = null;
        let vqMs = 0;
        if (e.image) {
          const started = performance.now();
          png = await deps.vq.decode(e.image, signal, obs.span);
          vqMs = performance.now() - started;
        }
        await send({
          final: {
            finishReason: e.finishReason,
            usage: e.usage,
            timings: { queueMs, vqMs, ttftMs: e.firstTokenAt - received, decodeMs: e.decodeMs },
            requestId,
            seed,
            stopString: '',
            ...(png && e.image
              ? {
                  image: {
                    png: png.png,
                    width: png.width,
                    height: png.height,
                    gridHeight: e.image.height,
                    gridWidth: e.image.width,
                    codes: image.returnCodes ? Array.from(e.image.codes) : [],
                  },
                }
              : {}),
          },
        });
        logFinished(log, 'generated image', requestId, e, received, obs.traceId, {
          grid: `${image.grid.height}x${image.grid.width}`,
        });
        return;
      }
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    if (signal.aborted) handle.cancel();
  }
}

/** The one log line of a finished request (text or image), with its trace id when it was traced. */
function logFinished(
  log: Logger,
  msg: string,
  requestId: string,
  e: { usage: { promptTokens: number; cachedTokens: number; completionTokens: number }; finishReason: string },
  received: number,
  traceId: string | undefined,
  extra: Record<string, unknown> = {},
): void {
  log.info(msg, {
    requestId,
    ...extra,
    promptTokens: e.usage.promptTokens,
    cachedTokens: e.usage.cachedTokens,
    completionTokens: e.usage.completionTokens,
    finish: e.finishReason,
    ms: Math.round(performance.now() - received),
    ...(traceId ? { traceId } : {}),
  });
}

function publicImplementation(deps: Deps, log: Logger): grpc.UntypedServiceImplementation {
  const { engine, limits, shape } = deps;
  return implement(
    { service: 'Emu3', log, mapError: mapCoordinatorError },
    {
      Generate: serverStream(
        coordinatorTelemetry().traced(deps.modelName, log, async (req: GenerateRequestLike, send, ctx, obs) => {
          const received = performance.now();
          const v = validateGenerateRequest(req, limits);
          const requestId = v.requestId || `req-${randomInt(0, 2 ** 47).toString(16)}`;
          obs.validated(requestId, v.sampling);
          if (v.task === 'generate')
            return generateImage(deps, v, requestId, received, send as Send, ctx.signal, obs, log);
          const { prompt, vqMs } = await buildPrompt(deps, v.parts, ctx.signal, obs.span);
          const maxNewTokens = checkPromptLength(prompt.length, v.sampling, limits.contextLength);
          obs.promptBuilt(prompt.length, received, vqMs);
          const seed = v.sampling.seed ?? (v.sampling.temperature === 0 ? 0 : randomInt(0, 2 ** 32));
          const events = new EventQueue();
          const handle = engine.submit({
            trace: obs.span,
            prompt,
            maxNewTokens,
            sampling: v.sampling,
            seed,
            topLogprobs: v.topLogprobs,
            returnTokenIds: v.returnTokenIds,
            onEvent: (e) => events.push(e),
          });
          const onAbort = () => handle.cancel();
          ctx.signal.addEventListener('abort', onAbort, { once: true });
          let queueMs = 0;
          try {
            for (;;) {
              const e = await events.next(ctx.signal);
              if (e.type === 'progress') continue; // image jobs only
              obs.event(e);
              if (e.type === 'admitted') queueMs = e.queueMs;
              else if (e.type === 'delta')
                await send({ delta: { text: e.text, tokenIds: e.tokenIds, logprobs: e.logprobs } });
              else if (e.type === 'error') throw mapCoordinatorError(e.error) ?? e.error;
              else {
                await send({
                  final: {
                    finishReason: e.finishReason,
                    usage: e.usage,
                    timings: { queueMs, vqMs, ttftMs: e.firstTokenAt - received, decodeMs: e.decodeMs },
                    requestId,
                    seed,
                    stopString: e.stopString,
                  },
                });
                logFinished(log, 'generated', requestId, e, received, obs.traceId);
                return;
              }
            }
          } finally {
            ctx.signal.removeEventListener('abort', onAbort);
            if (ctx.signal.aborted) handle.cancel();
          }
        }),
      ),
      Tokenize: unary(async (req: GenerateRequestLike, ctx) => {
        const v = validateGenerateRequest({ parts: req.parts, task: req.task, image: req.image }, limits);
        if (v.image) {
          const { prompt } = imagePrompts(deps, v, v.image);
          return { tokenIds: prompt, images: [{ height: v.image.grid.height, width: v.image.grid.width }] };
        }
        const { prompt, grids } = await buildPrompt(deps, v.parts, ctx.signal);
        return { tokenIds: prompt, images: grids.map((g) => ({ height: g.height, width: g.width })) };
      }),
      GetModelInfo: unary(async () => {
        const stats = engine.stats();
        const t = deps.tokenizer;
        return {
          modelName: deps.modelName,
          modelFingerprint: shape.fingerprint,
          vocabSize: shape.vocabSize,
          contextLength: limits.contextLength,
          numLayers: shape.numLayers,
          stages: deps.stages.map((s) => ({
            address: s.address,
            layerBegin: s.info.layer_begin,
            layerEnd: s.info.layer_end,
            precision: s.info.precision,
            device: s.info.device,
            adapter: s.info.adapter,
          })),
          bosTokenId: t.roles.bos,
          eosTokenId: t.roles.eos,
          padTokenId: t.roles.pad,
          visualTokenBegin: shape.visualTokenBegin,
          visualTokenEnd: shape.visualTokenEnd,
          limits: {
            maxImages: limits.maxImages,
            maxImageBytes: limits.maxImageBytes,
            maxTextChars: limits.maxTextChars,
            maxStopStrings: limits.maxStopStrings,
            maxStopChars: limits.maxStopChars,
            maxTopK: limits.maxTopK,
            maxTopLogprobs: limits.maxTopLogprobs,
            maxQueue: deps.opts.maxQueue,
          },
          kvCapacityTokens: shape.kvCapacityTokens,
          kvTokensInUse: stats.kvTokensReserved,
          imageArea: limits.imageArea ?? 0,
          maxImageCodes: limits.maxImageCodes,
        };
      }),
    },
  );
}

async function waitForVq(vq: VqClient, timeoutMs: number): Promise<VqInfo> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await vq.info(2000);
    } catch (err) {
      if (Date.now() >= until)
        throw new Error(
          `the VQ service at ${vq.address} did not answer within ${timeoutMs} ms: ${(err as Error).message}`,
        );
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

export async function startCoordinator(opts: CoordinatorOptions): Promise<RunningCoordinator> {
  const log = opts.log;
  const config = loadEmu3Config(opts.modelDir);
  const tokenizer = loadTokenizer(opts.modelDir);
  // A new coordinator's epoch is larger than any earlier one's: the shards drop an older epoch's KV when it arrives.
  const credentials = internalClient(opts.security);
  const pipeline = new PipelineClient(opts.shards, log, Date.now(), credentials);
  const vq = new VqClient(opts.vq, undefined, undefined, credentials);
  warnIfOpen(opts.security, log.child({ component: 'sink' }));
  const { stages, shape } = await pipeline.describe(opts.startTimeoutMs, config.numHiddenLayers);
  const vqInfo = await waitForVq(vq, opts.startTimeoutMs);
  await pipeline.resetAll();
  const capacity = commonCapacity(stages.map((s) => ({ slots: s.info.kv_slots, tokens: s.info.kv_capacity_tokens })));
  const limits: RequestLimits = {
    ...defaultLimits,
    ...opts.limits,
    contextLength: Math.min(config.maxPositionEmbeddings, shape.kvSlotTokens),
    maxImages: opts.maxImages,
    maxTopK: Math.min(opts.limits?.maxTopK ?? defaultLimits.maxTopK, shape.maxTopK || defaultLimits.maxTopK),
    // A config.json without image_area is not a generation model (the parsed config defaults it).
    imageArea: 'image_area' in config.raw ? config.imageArea : null,
    maxImageCodes: vqInfo.max_codes || defaultLimits.maxImageCodes,
  };
  const leaseMs = Math.min(...stages.map((s) => s.info.lease_ms || Number.POSITIVE_INFINITY));
  log.info('pipeline checked', {
    stages: stages.map((s) => `${s.address}[${s.info.layer_begin},${s.info.layer_end})`),
    fingerprint: shape.fingerprint.slice(0, 16),
    kvSlots: capacity.slots,
    kvTokens: capacity.tokens,
    contextLength: limits.contextLength,
    epoch: pipeline.epoch,
    leaseMs: Number.isFinite(leaseMs) ? leaseMs : null,
  });
  const describeStage = (i: number) =>
    `stage [${stages[i].info.layer_begin}, ${stages[i].info.layer_end}) at ${stages[i].address}`;

  let engine: Engine | null = null;
  const sink = await serve({
    address: opts.sinkListen,
    services: [resultSinkBinding((r) => engine?.onStepResult(r), log.child({ component: 'sink' }))],
    log: log.child({ component: 'sink' }),
    handleSignals: false,
    drainTimeoutMs: 1000,
    ...internalServe(opts.security),
  });
  const replyTo = opts.sinkAdvertise ?? sink.address;
  let closing = false;
  let recovery: Recovery | null = null;
  engine = new Engine(
    {
      scheduler: {
        stages: opts.maxInFlight ?? stages.length,
        maxBatchTokens: opts.maxBatchTokens,
        maxBatchSeqs: opts.maxBatchSeqs,
        maxRunning: capacity.slots,
        prefixCacheEntries: opts.prefixCacheEntries,
        minPrefixMatch: opts.minPrefixMatch,
      },
      kv: capacity,
      maxQueue: opts.maxQueue,
      tokenizer,
      eosId: tokenizer.roles.eos,
      replyTo,
      maxRecoveries: opts.maxRecoveries,
      onPipelineFailure: (reason) => recovery?.start(reason),
    },
    { send: (r) => pipeline.send(r) },
  );
  const running = engine;
  coordinatorTelemetry().watchEngine(() => running.stats(), capacity);
  const events = {
    onAck: (ack: ForwardResponse) => {
      // Informational: whatever stopped a batch also reached the ResultSink as a StepResult.
      if (ack.error)
        log.warn('stage 0 did not run a micro-batch', { microBatch: ack.micro_batch_id, error: ack.error });
    },
    onBroken: (err: Error) => {
      if (!closing) running.pipelineLost(err.message);
    },
  };
  let publicServer: RunningServer | null = null;
  recovery = new Recovery({
    pipeline,
    engine: running,
    describeStage,
    verify: async () => {
      const again = await pipeline.describe(2000, config.numHiddenLayers);
      if (again.shape.fingerprint !== shape.fingerprint)
        throw new Error(`the stages now serve checkpoint ${again.shape.fingerprint}, not ${shape.fingerprint}`);
    },
    reopen: () => pipeline.open(events),
    setServing: (serving) => {
      if (closing || !publicServer) return;
      const status = serving ? 'SERVING' : 'NOT_SERVING';
      publicServer.health.set(PUBLIC_SERVICE, status);
      publicServer.health.set('', status);
    },
    stageTimeoutMs: opts.stageTimeoutMs ?? 30_000,
    log,
  });
  pipeline.open(events);
  // Keeps the shards' coordinator lease: with no message for lease_ms they free this coordinator's KV.
  const heartbeat = Number.isFinite(leaseMs)
    ? setInterval(() => running.heartbeat(), Math.max(50, Math.floor(leaseMs / 4)))
    : null;
  heartbeat?.unref();

  // Per-stage compute over time, for bubble (idle) metrics: a line a second while micro-batches run.
  let lastBatches = 0;
  const statsTimer = setInterval(() => {
    const s = running.stats();
    if (s.microBatches === lastBatches) return;
    lastBatches = s.microBatches;
    log.info('engine stats', { ...s, stageComputeMs: s.stageComputeMs.map((ms) => +ms.toFixed(2)) });
  }, 1000);
  statsTimer.unref();

  const pkg = publicPackage();
  const definition = (grpc.loadPackageDefinition(pkg).emu3 as grpc.GrpcObject).v1 as grpc.GrpcObject;
  const services: ServiceBinding[] = [
    decodeRequestsInHandlers({
      name: PUBLIC_SERVICE,
      definition: (definition.Emu3 as grpc.ServiceClientConstructor).service,
      implementation: publicImplementation(
        { tokenizer, engine, vq, limits, shape, stages, modelName: basename(opts.modelDir), opts },
        log,
      ),
    }),
  ];
  const reflection = new ReflectionService(pkg);
  reflection.addToServer({
    addService: (def: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation) => {
      const first = Object.values(def)[0] as { path: string };
      services.push({ name: first.path.split('/')[1], definition: def, implementation });
    },
  });
  const server = await serve({
    address: opts.listen,
    services,
    log,
    maxReceiveMessageBytes: opts.maxMessageBytes,
    drainTimeoutMs: opts.drainTimeoutMs,
    handleSignals: opts.handleSignals,
    auth: opts.publicAuth
      ? { source: '--auth-token-file', tokens: () => opts.publicAuth!.tokens(), open: isHealth }
      : undefined,
    tls: opts.security?.tls,
    onDrainStart: () => running.beginDrain(),
    onDrainTimeout: () => running.cancelRunning(),
    onClose: async () => {
      closing = true;
      recovery.close();
      if (heartbeat) clearInterval(heartbeat);
      clearInterval(statsTimer);
      pipeline.close();
      vq.close();
      await sink.shutdown('coordinator stopped');
    },
  });
  publicServer = server;
  recovery.watch();
  return {
    server,
    sinkAddress: sink.address,
    engine,
    shape,
    shutdown: (reason) => server.shutdown(reason),
    closed: server.closed,
  };
}
