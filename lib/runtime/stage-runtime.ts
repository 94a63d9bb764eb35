// A pipeline stage on this machine: decoder layers [first, end) of a checkpoint, its ORT session in a worker thread
// and a KV arena for `maxSequences` sequences of up to `maxSequenceLength` tokens. This is what a shard wraps.
//
//   const rt = await StageRuntime.open({ modelDir, layers: [0, 32], precision: 'fp32', maxSequences: 8, maxSequenceLength: 4096 });
//   await rt.forward([{ slot: 0, start: 0, length: 12 }], { tokens })   // prefill (or one chunk of it)
//   await rt.forward([{ slot: 0, start: 12, length: 1 }, { slot: 3, start: 40, length: 1 }], { tokens })  // decode
//
// The last stage returns the logits of the last new position of each item ([items, vocab]); other stages return
// the hidden states of all new positions ([tokens, hidden]) in item order, ready for the next stage. Each call is one
// ORT run, whatever its mix of decodes and prefill chunks. Hidden states move to the worker without a copy: the
// caller's Float32Array is detached by the call (see forward).
import { Worker } from 'node:worker_threads';
import type { SamplingRow } from '../onnx/sampling-head.js';
import type { Device, Precision, StageShape } from '../onnx/stage-graph.js';
import {
  type ForwardInput,
  type ForwardItem,
  type ForwardOutput,
  postTransferring,
  type ReadyInfo,
  type Reply,
  type Request,
  type TransferStats,
  type WorkerInit,
} from './protocol.js';

export type { SamplingRow } from '../onnx/sampling-head.js';
export type { ForwardInput, ForwardItem, ForwardOutput, SampledOutput, TransferStats } from './protocol.js';

export type KvPlacement = 'host' | 'device';

/** The arena's placement for these options (see StageRuntimeOptions.kv); device needs the webgpu device. */
export function kvPlacement(opts: Pick<StageRuntimeOptions, 'device' | 'kv'>): KvPlacement {
  const kv = opts.kv ?? (opts.device === 'webgpu' ? 'device' : 'host');
  if (kv !== 'host' && kv !== 'device') throw new Error(`kv "${kv}" is not one of host|device`);
  if (kv === 'device' && opts.device !== 'webgpu')
    throw new Error(`kv device needs device webgpu (got ${opts.device ?? 'cpu'})`);
  return kv;
}

export interface StageRuntimeOptions {
  modelDir: string;
  /** [first, end): end is exclusive. */
  layers: [number, number];
  precision: Precision;
  /** Where ORT runs the stage (default cpu). */
  device?: Device;
  /**
   * Where the KV arena lives: host (JS memory, fed to every run) or device (resident on the webgpu device, only
   * hidden states and results cross: device-kv.ts). Default: device on webgpu, host otherwise.
   */
  kv?: KvPlacement;
  maxSequences: number;
  maxSequenceLength: number;
  /**
   * int4 on cpu: build the int8 prefill path (default true), and the fewest tokens of a run that take it (default
   * INT8_PATH_MIN_TOKENS; a bench and test knob).
   */
  int8Prefill?: boolean;
  int8MinTokens?: number;
  cacheDir?: string;
  /** ORT intra-op threads (default: all cores). */
  threads?: number;
  /**
   * Whether idle ORT pool threads spin-wait for work (ORT's default, true). Stages that share cores with other busy
   * processes should pass false: a spinning thread takes a core another stage could compute on.
   */
  spin?: boolean;
  log?: (msg: string) => void;
}

/** The forward input as it goes to the worker, and the buffers that move with it (see StageRuntime.forward). */
function movable(input: ForwardInput): { input: ForwardInput; transfer: ArrayBuffer[] } {
  if (!('hidden' in input)) return { input, transfer: [] };
  const h = input.hidden;
  const whole = h.buffer instanceof ArrayBuffer && h.byteOffset === 0 && h.byteLength === h.buffer.byteLength;
  const own = whole ? h : h.slice();
  return { input: { hidden: own }, transfer: [own.buffer as ArrayBuffer] };
}

type WithoutId<T> = T extends unknown ? Omit<T, 'id'> : never;
type Pending = { resolve: (v: ForwardOutput | TransferStats | undefined) => void; reject: (e: Error) => void };

export class StageRuntime {
  private nextId = 1;
  private readonly transferred = { hostToDevice: 0, deviceToHost: 0 };
  private readonly pending = new Map<number, Pending>();
  private closed = false;

  private constructor(
    private readonly worker: Worker,
    private readonly info: ReadyInfo,
  ) {
    worker.on('message', (reply: Reply) => this.onReply(reply));
    worker.on('error', (e) => this.failAll(e));
    worker.on('exit', (code) => this.failAll(new Error(`stage worker exited (code ${code})`)));
  }

  static open(opts: StageRuntimeOptions): Promise<StageRuntime> {
    const [first, end] = opts.layers;
    for (const [name, v] of [
      ['maxSequences', opts.maxSequences],
      ['maxSequenceLength', opts.maxSequenceLength],
    ] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`StageRuntime: ${name} must be an integer ≥ 1, got ${v}`);
    }
    kvPlacement(opts);
    const { log = () => {}, ...init } = opts;
    const worker = new Worker(new URL('./stage-worker.js', import.meta.url), { workerData: init satisfies WorkerInit });
    return new Promise((resolve, reject) => {
      const onMessage = (reply: Reply) => {
        if (reply.type === 'log') log(reply.message);
        else if (reply.type === 'failed') {
          cleanup();
          void worker.terminate();
          reject(new Error(`stage [${first}, ${end}) of ${opts.modelDir}: ${reply.error}`));
        } else if (reply.type === 'ready') {
          cleanup();
          const rt = new StageRuntime(worker, reply.info);
          worker.on('message', (r: Reply) => r.type === 'log' && log(r.message));
          resolve(rt);
        }
      };
      const onError = (e: Error) => {
        cleanup();
        reject(e);
      };
      const cleanup = () => {
        worker.off('message', onMessage);
        worker.off('error', onError);
      };
      worker.on('message', onMessage);
      worker.on('error', onError);
    });
  }

  get shape(): StageShape {
    return this.info.shape;
  }
  get first(): number {
    return this.info.shape.layers[0];
  }
  /** Exclusive. */
  get last(): number {
    return this.info.shape.layers[this.info.shape.layers.length - 1] + 1;
  }
  get isFirst(): boolean {
    return this.info.shape.isFirst;
  }
  get isLast(): boolean {
    return this.info.shape.isLast;
  }
  get hiddenSize(): number {
    return this.info.shape.hiddenSize;
  }
  get vocabSize(): number {
    return this.info.shape.vocabSize;
  }
  /** Bytes of the KV arena. */
  get kvBytes(): number {
    return this.info.kvBytes;
  }
  /** Bytes of the stage's weight file. */
  get weightBytes(): number {
    return this.info.weightBytes;
  }
  /** The webgpu adapter's name ('' on cpu). */
  get adapter(): string {
    return this.info.adapter;
  }
  /** Where the KV arena lives (StageRuntimeOptions.kv). */
  get kv(): KvPlacement {
    return this.info.kv;
  }
  /** Whether the graph came from the cache rather than being built now. */
  get reusedGraph(): boolean {
    return this.info.reusedGraph;
  }

  /**
   * Runs new tokens of `items` (one session run for the whole call). On the last stage, `opts.sampling` (one row per
   * item) returns the in-graph head's top-K candidates (and full rows where asked) instead of the logits.
   *
   * `input.hidden` is transferred to the worker, not copied: when the array spans its whole ArrayBuffer (as a
   * `new Float32Array(n)` or a previous stage's output does), that buffer is DETACHED by this call and the caller's
   * array reads as empty afterwards; a view into a larger buffer is copied once (its own bytes only) and left as
   * it was. `input.tokens` is copied (it is small) and stays usable.
   */
  forward(items: ForwardItem[], input: ForwardInput, opts: { sampling?: SamplingRow[] } = {}): Promise<ForwardOutput> {
    const moved = movable(input);
    return this.request(
      { type: 'forward', items, input: moved.input, sampling: opts.sampling },
      moved.transfer,
    ) as Promise<ForwardOutput>;
  }

  /** Copies the first `length` cached positions of `fromSlot` into `toSlot` (prefix reuse). */
  async copyKv(fromSlot: number, toSlot: number, length: number): Promise<void> {
    await this.request({ type: 'copyKv', from: fromSlot, to: toSlot, length });
  }

  /** Host↔device bytes of every forward and copyKv so far (kept here from each reply, so it reads at once). */
  get hostTransfers(): { hostToDevice: number; deviceToHost: number } {
    return { ...this.transferred };
  }

  /** Host memory fed to and returned by the stage's runs so far (and by its last run): protocol.ts TransferStats. */
  async stats(): Promise<TransferStats> {
    return (await this.request({ type: 'stats' })) as unknown as TransferStats;
  }

  /** Marks a slot empty (its next use starts at 0). */
  async free(slot: number): Promise<void> {
    await this.request({ type: 'free', slot });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.request({ type: 'close' }).catch(() => {});
    this.closed = true;
    await this.worker.terminate();
  }

  private request(
    req: WithoutId<Request>,
    transfer: ArrayBuffer[] = [],
  ): Promise<ForwardOutput | TransferStats | undefined> {
    if (this.closed) return Promise.reject(new Error('StageRuntime is closed'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      postTransferring(this.worker, { ...req, id } as Request, transfer);
    });
  }

  private onReply(reply: Reply): void {
    if (reply.type !== 'result' && reply.type !== 'error') return;
    if (reply.type === 'result' && reply.transfer) {
      this.transferred.hostToDevice += reply.transfer.hostToDevice;
      this.transferred.deviceToHost += reply.transfer.deviceToHost;
    }
    const p = this.pending.get(reply.id);
    if (!p) return;
    this.pending.delete(reply.id);
    if (reply.type === 'error') p.reject(new Error(reply.error));
    else p.resolve(reply.output ?? reply.stats);
  }

  private failAll(e: Error): void {
    this.closed = true;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}
