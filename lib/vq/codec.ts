// VqCodec: images ⇄ VQ codes with the graphs of encoder-graph.ts / decoder-graph.ts, ORT in a worker thread.
//   encode(pixels [3, H, W] float32 in [−1, 1] (preprocessed), H, W) → { h: H/8, w: W/8, codes: Int32Array [h·w] }
//   decode(codes Int32Array [h·w] row-major, h, w) → Float32Array [3, 8h, 8w], the raw decoder output (≈[−1, 1])
// One codec = one worker = one encoder and one decoder session; requests run one at a time in arrival order.
import { Worker } from 'node:worker_threads';
import type { Device } from '../onnx/stage-graph.js';
import { loadVqConfig, spatialFactor, type VqConfig } from './config.js';
import { defaultCacheDir } from './graph-cache.js';

/** A request the codec refuses before running anything (bad size, bad code): the caller's mistake. */
export class VqInputError extends Error {
  override name = 'VqInputError';
}

export interface VqCodecOptions {
  /** Where built graphs are cached (default $EMU3_CACHE_DIR, else <vq dir>/.emu3-cache if writable, else ~/.cache/emu3-serve). */
  cacheDir?: string;
  /** ORT intra-op threads per session (0 = ORT's default: all cores). */
  threads?: number;
  /** Where ORT runs both graphs (default cpu; docs/gpu.md). */
  device?: Device;
  log?: (msg: string) => void;
}

export interface WorkerInit {
  vqDir: string;
  cacheDir: string;
  threads: number;
  device: Device;
}

export type WorkerRequest =
  | { type: 'encode'; id: number; pixels: Float32Array; height: number; width: number }
  | { type: 'decode'; id: number; codes: Int32Array; h: number; w: number };

export type WorkerReply =
  | { type: 'log'; msg: string }
  | { type: 'ready'; error?: string }
  | { type: 'encoded'; id: number; codes: Int32Array }
  | { type: 'decoded'; id: number; pixels: Float32Array }
  | { type: 'failed'; id: number; error: string };

interface Pending {
  resolve: (v: Int32Array | Float32Array) => void;
  reject: (e: Error) => void;
}

export class VqCodec {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;
  /** Set once the worker has died: every later request fails with it instead of waiting forever. */
  private failure: Error | null = null;

  private constructor(
    private readonly worker: Worker,
    readonly config: VqConfig,
    readonly vqDir: string,
    /** Where ORT runs this codec's graphs. */
    readonly device: Device,
  ) {
    worker.on('message', (msg: WorkerReply) => this.onReply(msg));
    worker.on('error', (e) => this.fail(new Error(`VQ ${vqDir}: worker crashed: ${e.message}`)));
    worker.on('exit', (code) => {
      if (!this.closed) this.fail(new Error(`VQ ${vqDir}: worker exited with code ${code}`));
    });
  }

  /** Reads DIR/config.json, builds or reuses the cached graphs, and starts the worker's ORT sessions. */
  static async open(vqDir: string, opts: VqCodecOptions = {}): Promise<VqCodec> {
    const config = loadVqConfig(vqDir);
    const init: WorkerInit = {
      vqDir,
      cacheDir: opts.cacheDir ?? defaultCacheDir(vqDir),
      threads: opts.threads ?? 0,
      device: opts.device ?? 'cpu',
    };
    const worker = new Worker(new URL('./codec-worker.js', import.meta.url), { workerData: init });
    await new Promise<void>((resolve, reject) => {
      const onMessage = (msg: WorkerReply) => {
        if (msg.type === 'log') opts.log?.(msg.msg);
        if (msg.type !== 'ready') return;
        worker.off('message', onMessage);
        worker.off('error', onError);
        if (msg.error) {
          void worker.terminate();
          reject(new Error(`VQ ${vqDir}: ${msg.error}`));
        } else resolve();
      };
      const onError = (e: Error) => reject(new Error(`VQ ${vqDir}: worker failed to start: ${e.message}`));
      worker.on('message', onMessage);
      worker.once('error', onError);
    });
    return new VqCodec(worker, config, vqDir, init.device);
  }

  /** Image side length divisor (8): H and W must be multiples of it. */
  get factor(): number {
    return spatialFactor(this.config);
  }

  get codebookSize(): number {
    return this.config.codebookSize;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  async encode(
    pixels: Float32Array,
    height: number,
    width: number,
  ): Promise<{ h: number; w: number; codes: Int32Array }> {
    const f = this.factor;
    for (const [name, v] of [
      ['height', height],
      ['width', width],
    ] as const) {
      if (!Number.isInteger(v) || v < f || v % f !== 0) {
        throw new VqInputError(`encode: image ${name} ${v} must be a positive multiple of ${f}`);
      }
    }
    if (pixels.length !== 3 * height * width) {
      throw new VqInputError(
        `encode: pixels hold ${pixels.length} values; [3, ${height}, ${width}] needs ${3 * height * width}`,
      );
    }
    const codes = (await this.send({ type: 'encode', id: 0, pixels, height, width })) as Int32Array;
    return { h: height / f, w: width / f, codes };
  }

  async decode(codes: Int32Array, h: number, w: number): Promise<Float32Array> {
    for (const [name, v] of [
      ['h', h],
      ['w', w],
    ] as const) {
      if (!Number.isInteger(v) || v < 1) throw new VqInputError(`decode: grid ${name} ${v} must be a positive integer`);
    }
    if (codes.length !== h * w)
      throw new VqInputError(`decode: ${codes.length} codes do not fill a ${h}×${w} grid (${h * w})`);
    const size = this.config.codebookSize;
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (!(c >= 0 && c < size)) {
        throw new VqInputError(
          `decode: code ${c} at row ${Math.floor(i / w)}, column ${i % w} is outside the codebook [0, ${size})`,
        );
      }
    }
    return (await this.send({ type: 'decode', id: 0, codes, h, w })) as Float32Array;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.failAll(new Error(`VQ ${this.vqDir}: codec closed`));
    await this.worker.terminate();
  }

  private send(req: WorkerRequest): Promise<Int32Array | Float32Array> {
    if (this.closed) return Promise.reject(new Error(`VQ ${this.vqDir}: codec closed`));
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...req, id });
    });
  }

  private onReply(msg: WorkerReply): void {
    if (msg.type === 'log' || msg.type === 'ready') return;
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.type === 'failed') p.reject(new Error(`VQ ${this.vqDir}: ${msg.error}`));
    else p.resolve(msg.type === 'encoded' ? msg.codes : msg.pixels);
  }

  private fail(e: Error): void {
    this.failure ??= e;
    this.failAll(e);
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}
