// The shard process: load layers [first, end) of a checkpoint into a StageRuntime (ORT in a worker thread, KV arena
// sized from the budget), serve emu3.internal.v1.Shard + grpc.health.v1 until SIGTERM/SIGINT, then drain: open
// Forward streams finish what they queued and end, the links close, the worker stops.
import { Checkpoint } from '../../lib/model/checkpoint.js';
import { loadEmu3Config } from '../../lib/model/config.js';
import {
  checkStageSpec,
  type Device,
  INT8_PATH_MIN_TOKENS,
  kvElementBytes,
  type Precision,
} from '../../lib/onnx/stage-graph.js';
import { type InternalSecurity, internalClient, internalServe, warnIfOpen } from '../../lib/rpc/internal-security.js';
import type { Logger } from '../../lib/rpc/log.js';
import { type RunningServer, serve } from '../../lib/rpc/serve.js';
import { kvPlacement, StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { shardTelemetry } from '../../lib/telemetry/shard.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import { DEFAULT_KV_BUDGET_BYTES, DEFAULT_MAX_SLOTS, kvCapacity } from './capacity.js';
import { NextHop, ReplyAllowlist, ResultSinks } from './links.js';
import { ShardService } from './service.js';

/** The largest SamplingSide.top_k accepted (Emu3-Gen's default is 2048, docs/architecture.md, "Sampling split"). */
export const MAX_TOP_K = 4096;

/** --coordinator-lease default (the coordinator sends a Heartbeat at least every lease ÷ 4). */
export const DEFAULT_LEASE_MS = 10_000;

export interface ShardServerOptions {
  modelDir: string;
  /** [first, end): end is exclusive. */
  layers: [number, number];
  /** host:port; port 0 picks a free one. */
  address: string;
  /** The next stage's address; required for every stage but the last. */
  next?: string;
  precision: Precision;
  /** Where ORT runs the stage (default cpu). */
  device?: Device;
  /** int4 on cpu: build the int8 prefill path (default true; StageSpec.int8Prefill). */
  int8Prefill?: boolean;
  kvBudgetBytes?: number;
  maxSlots?: number;
  slotTokens?: number;
  cacheDir?: string;
  /** ORT intra-op threads (default: all cores). */
  threads?: number;
  /** Whether idle ORT threads spin (default true); see StageRuntimeOptions.spin. */
  spin?: boolean;
  /** --coordinator-lease: free all KV after this long without a ForwardRequest of the current epoch; 0 = never. */
  leaseMs?: number;
  log: Logger;
  drainTimeoutMs?: number;
  handleSignals?: boolean;
  /**
   * --allow-reply-to: the coordinator ResultSink addresses this stage may send results and errors to; a micro-batch
   * whose reply_to is another address is not run. Required (at least one).
   */
  allowReplyTo: string[];
  /** The pipeline's secret and mTLS, demanded of callers and presented to the next stage and the ResultSink. */
  security?: InternalSecurity;
}

export interface RunningShard {
  server: RunningServer;
  service: ShardService;
  /** Drains and stops (idempotent). */
  shutdown(reason: string): Promise<void>;
}

export async function startShardServer(opts: ShardServerOptions): Promise<RunningShard> {
  const { log, modelDir } = opts;
  const [first, end] = opts.layers;
  const config = loadEmu3Config(modelDir);
  const device = opts.device ?? 'cpu';
  checkStageSpec(config, { first, end, precision: opts.precision, device });
  const isLast = end === config.numHiddenLayers;
  if (!isLast && !opts.next)
    throw new Error(`--next is required: layers [${first}, ${end}) end before layer ${config.numHiddenLayers}`);
  if (isLast && opts.next)
    throw new Error(`--next ${opts.next} given, but layers [${first}, ${end}) include the last layer (no next stage)`);
  const allowlist = new ReplyAllowlist(opts.allowReplyTo);
  if (allowlist.list().length === 0)
    throw new Error(
      '--allow-reply-to is required: the coordinator ResultSink address(es) (its --sink-advertise, else its --sink-listen) this stage may send results to',
    );
  const ckpt = Checkpoint.open(modelDir);
  let fingerprint: string;
  try {
    fingerprint = ckpt.fingerprint();
  } finally {
    ckpt.close();
  }
  // The visual ids come from the tokenizer files, never from constants (docs/model.md, "Special tokens and ids").
  const visual = isLast ? loadTokenizer(modelDir).visual : { start: 0, count: 0 };
  const capacity = kvCapacity({
    layers: end - first,
    kvHeads: config.numKeyValueHeads,
    headDim: config.headDim,
    maxPositions: config.maxPositionEmbeddings,
    budgetBytes: opts.kvBudgetBytes ?? DEFAULT_KV_BUDGET_BYTES,
    maxSlots: opts.maxSlots ?? DEFAULT_MAX_SLOTS,
    slotTokens: opts.slotTokens,
    elementBytes: kvPlacement({ device }) === 'device' ? kvElementBytes(opts.precision) : 4,
  });
  log.info('loading stage', { modelDir, layers: [first, end], precision: opts.precision, device, ...capacity });
  const started = performance.now();
  const runtime = await StageRuntime.open({
    modelDir,
    layers: [first, end],
    precision: opts.precision,
    device,
    int8Prefill: opts.int8Prefill,
    maxSequences: capacity.slots,
    maxSequenceLength: capacity.slotTokens,
    cacheDir: opts.cacheDir,
    threads: opts.threads,
    spin: opts.spin,
    log: (msg) => log.info('stage', { detail: msg }),
  });
  log.info('stage ready', {
    ms: Math.round(performance.now() - started),
    reusedGraph: runtime.reusedGraph,
    device,
    ...(runtime.adapter ? { adapter: runtime.adapter, kv: runtime.kv } : {}),
    ...(runtime.shape.int8Prefill ? { int8Prefill: `runs of ≥ ${INT8_PATH_MIN_TOKENS} tokens` } : {}),
  });

  const where = `stage [${first}, ${end})`;
  const credentials = internalClient(opts.security);
  const sinks = new ResultSinks(log, allowlist, credentials);
  const next = opts.next
    ? new NextHop(
        opts.next,
        log,
        (lost, why) =>
          sinks.deliver(lost.replyTo, {
            micro_batch_id: lost.microBatchId,
            results: [],
            stage_compute_ms: [],
            error: {
              kind: 'STAGE_ERROR_KIND_STAGE_LOST',
              message: `${where} could not pass micro-batch ${lost.microBatchId} on: ${why}`,
              sequence_id: 0,
              status_code: 0,
            },
            refusals: lost.refusals,
          }),
        credentials,
      )
    : undefined;
  const service = new ShardService(
    runtime,
    {
      precision: opts.precision,
      device,
      fingerprint,
      numLayers: config.numHiddenLayers,
      capacity,
      leaseMs: opts.leaseMs ?? DEFAULT_LEASE_MS,
      limits: {
        where,
        isFirst: first === 0,
        isLast,
        vocabSize: config.vocabSize,
        hiddenSize: config.hiddenSize,
        maxTopK: Math.min(MAX_TOP_K, config.vocabSize),
        visualBegin: visual.start,
        visualEnd: visual.start + visual.count,
      },
    },
    { next, sinks, replyAllowlist: allowlist },
    log,
  );
  warnIfOpen(opts.security, log);
  shardTelemetry().watchStage([first, end], () => service.ledger, capacity);
  shardTelemetry().watchTransfers(() => runtime.hostTransfers);
  const close = async () => {
    service.stopLease();
    next?.close();
    sinks.close();
    await runtime.close();
  };
  let server: RunningServer;
  try {
    server = await serve({
      address: opts.address,
      services: [service.binding()],
      log,
      drainTimeoutMs: opts.drainTimeoutMs,
      handleSignals: opts.handleSignals,
      onClose: close,
      ...internalServe(opts.security),
    });
  } catch (err) {
    await close();
    throw err;
  }
  // serve() starts its drain on the same signals; the Forward streams must end for that drain to finish.
  if (opts.handleSignals !== false) {
    process.once('SIGTERM', () => service.beginDrain());
    process.once('SIGINT', () => service.beginDrain());
  }
  return {
    server,
    service,
    shutdown: (reason) => {
      service.beginDrain();
      return server.shutdown(reason);
    },
  };
}
