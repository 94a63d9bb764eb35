// The worker thread that owns a stage's ORT session and KV arena (session.run blocks its thread, so it must not be
// the thread that serves gRPC). It builds or reuses the cached graph, then serves requests strictly one at a time.
import { availableParallelism } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import type ort from 'onnxruntime-node';
import { Checkpoint } from '../model/checkpoint.js';
import { ensureStageGraph } from '../onnx/graph-cache.js';
import { createDeviceSession } from './device-session.js';
import { type ForwardOutput, postTransferring, type Reply, type Request, type WorkerInit } from './protocol.js';
import { StageExecutor } from './stage-executor.js';

const port = parentPort;
if (!port) throw new Error('stage-worker.js must run in a worker thread');
const post = (reply: Reply, transfer: ArrayBuffer[] = []) => postTransferring(port, reply, transfer);
const log = (message: string) => post({ type: 'log', message });

async function open(init: WorkerInit): Promise<StageExecutor> {
  const ckpt = Checkpoint.open(init.modelDir);
  let cached: ReturnType<typeof ensureStageGraph>;
  try {
    cached = ensureStageGraph(
      ckpt,
      {
        first: init.layers[0],
        end: init.layers[1],
        precision: init.precision,
        device: init.device,
        int8Prefill: init.int8Prefill,
      },
      { cacheDir: init.cacheDir, log },
    );
  } finally {
    ckpt.close();
  }
  const session = await createSession(cached.onnxPath, init);
  const executor = new StageExecutor(session, cached.shape, init.maxSequences, init.maxSequenceLength, {
    int8MinTokens: init.int8MinTokens,
  });
  post({
    type: 'ready',
    info: {
      shape: cached.shape,
      kvBytes: executor.arena.bytes,
      weightBytes: cached.weightBytes,
      reusedGraph: cached.reused,
      onnxPath: cached.onnxPath,
    },
  });
  return executor;
}

/** The stage's ORT session on its device; a device that cannot be opened is an error saying what to install. */
async function createSession(onnxPath: string, init: WorkerInit): Promise<ort.InferenceSession> {
  return createDeviceSession(onnxPath, init.device ?? 'cpu', {
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
  try {
    switch (req.type) {
      case 'forward': {
        const output = await executor.forward(req.items, req.input, req.sampling);
        post({ type: 'result', id: req.id, output }, outputBuffers(output));
        return;
      }
      case 'copyKv':
        executor.copyKv(req.from, req.to, req.length);
        break;
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
