// The worker thread that owns a stage's ORT session and KV arena (session.run blocks its thread, so it must not be
// the thread that serves gRPC). It builds or reuses the cached graph, then serves requests strictly one at a time.
import { availableParallelism } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import type ort from 'onnxruntime-node';
import { Checkpoint } from '../model/checkpoint.js';
import { ensureStageGraph } from '../onnx/graph-cache.js';
import { samplingIo } from '../onnx/sampling-head.js';
import { io, kvElementBytes, type StageShape } from '../onnx/stage-graph.js';
import { DeviceKv } from './device-kv.js';
import { createDeviceSession } from './device-session.js';
import { adapterName } from './gpu-adapter.js';
import { type ForwardOutput, postTransferring, type Reply, type Request, type WorkerInit } from './protocol.js';
import { StageExecutor } from './stage-executor.js';
import { kvPlacement } from './stage-runtime.js';

const port = parentPort;
if (!port) throw new Error('stage-worker.js must run in a worker thread');
const post = (reply: Reply, transfer: ArrayBuffer[] = []) => postTransferring(port, reply, transfer);
const log = (message: string) => post({ type: 'log', message });

async function open(init: WorkerInit): Promise<StageExecutor> {
  const ckpt = Checkpoint.open(init.modelDir);
  let cached: ReturnType<typeof ensureStageGraph>;
  const kvOnDevice = kvPlacement(init) === 'device';
  try {
    cached = ensureStageGraph(
      ckpt,
      {
        first: init.layers[0],
        end: init.layers[1],
        precision: init.precision,
        device: init.device,
        kvOnDevice,
        int8Prefill: init.int8Prefill,
      },
      { cacheDir: init.cacheDir, log },
    );
  } finally {
    ckpt.close();
  }
  const session = await createSession(cached.onnxPath, init, kvOnDevice ? cached.shape : null);
  const shape = cached.shape;
  const deviceKv =
    kvOnDevice && cached.kvGraphs
      ? await DeviceKv.create(
          {
            layers: shape.layers.length,
            rows: init.maxSequences,
            kvHeads: shape.kvHeads,
            maxLen: init.maxSequenceLength,
            headDim: shape.headDim,
          },
          cached.kvGraphs,
        )
      : undefined;
  const adapter = adapterName(init.device ?? 'cpu');
  if (adapter) log(`webgpu adapter: ${adapter} (the Vulkan device vulkaninfo lists; ORT does not report it)`);
  if (deviceKv) log(`kv arena: resident on the ${init.device} device`);
  const executor = new StageExecutor(session, shape, init.maxSequences, init.maxSequenceLength, deviceKv, {
    int8MinTokens: init.int8MinTokens,
  });
  post({
    type: 'ready',
    info: {
      shape: cached.shape,
      kvBytes: deviceKv ? (executor.arena.bytes / 4) * kvElementBytes(init.precision) : executor.arena.bytes,
      weightBytes: cached.weightBytes,
      reusedGraph: cached.reused,
      onnxPath: cached.onnxPath,
      adapter,
      kv: deviceKv ? 'device' : 'host',
    },
  });
  return executor;
}

/** The stage's ORT session on its device; a device that cannot be opened is an error saying what to install. */
async function createSession(
  onnxPath: string,
  init: WorkerInit,
  deviceKvShape: StageShape | null,
): Promise<ort.InferenceSession> {
  // A device arena's updated tensors stay on the device, and so do a last stage's logits and full rows unless a run
  // asks for them (stage-executor.ts); every other output comes to host memory. Such a session's runs fetch every
  // output, so a location looked up by fetch position (as some binding versions do) is the output's own.
  const kvOutputs = deviceKvShape?.layers.flatMap((l) => [io.keyCacheOut(l), io.valueCacheOut(l)]) ?? [];
  if (deviceKvShape?.isLast) kvOutputs.push(io.logits, samplingIo.logprobs);
  return createDeviceSession(onnxPath, init.device ?? 'cpu', {
    ...(kvOutputs.length > 0
      ? { preferredOutputLocation: Object.fromEntries(kvOutputs.map((name) => [name, 'gpu-buffer' as const])) }
      : {}),
    intraOpNumThreads: init.threads ?? availableParallelism(),
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
    ...(init.spin === false ? { extra: { session: { intra_op: { allow_spinning: '0' } } } } : {}),
  });
}

/** The output's buffers, each once (ORT's outputs own theirs), so the reply moves them instead of copying. */
function outputBuffers(output: ForwardOutput): ArrayBuffer[] {
  const arrays =
    'logits' in output
      ? [output.logits]
      : 'hidden' in output
        ? [output.hidden]
        : [output.topIds, output.topLogprobs, ...output.fullRows];
  const buffers = new Set<ArrayBuffer>();
  for (const a of arrays) if (a && a.buffer instanceof ArrayBuffer) buffers.add(a.buffer);
  return [...buffers];
}

async function handle(executor: StageExecutor, req: Request): Promise<void> {
  const before = { ...executor.transfers };
  const transfer = () => ({
    hostToDevice: executor.transfers.hostToDevice - before.hostToDevice,
    deviceToHost: executor.transfers.deviceToHost - before.deviceToHost,
  });
  try {
    switch (req.type) {
      case 'forward': {
        const output = await executor.forward(req.items, req.input, req.sampling);
        post({ type: 'result', id: req.id, output, transfer: transfer() }, outputBuffers(output));
        return;
      }
      case 'copyKv':
        await executor.copyKv(req.from, req.to, req.length);
        post({ type: 'result', id: req.id, transfer: transfer() });
        return;
      case 'stats':
        post({ type: 'result', id: req.id, stats: structuredClone(executor.transfers) });
        return;
      case 'free':
        executor.free(req.slot);
        break;
      case 'close':
        post({ type: 'result', id: req.id });
        port?.close();
        return;
    }
    post({ type: 'result', id: req.id });
  } catch (e) {
    post({ type: 'error', id: req.id, error: e instanceof Error ? e.message : String(e) });
  }
}

try {
  const executor = await open(workerData as WorkerInit);
  let queue = Promise.resolve();
  port.on('message', (req: Request) => {
    queue = queue.then(() => handle(executor, req));
  });
} catch (e) {
  post({ type: 'failed', error: e instanceof Error ? e.message : String(e) });
}
