// A stage's KV arena resident on the webgpu device: per layer a K and a V tensor [slots, kvHeads, maxLen, headDim]
// that never visit host memory. They are made once by the kv-init graph; each stage run takes them as inputs and
// returns them with its new positions written (stage-graph.ts, kvOnDevice), and those outputs, still on the device,
// replace them; prefix reuse (copyKv) is a run of the kv-copy graph per tensor (kv-graphs.ts). Slot s is arena row s:
// each branch picks its rows by slot inside the graph, so nothing is ever relocated.
//
// What the node binding allows (measured, onnxruntime-node 1.30): device outputs (`preferredOutputLocation:
// 'gpu-buffer'`) are accepted as inputs of any session on the same device; a pre-allocated device fetch is NOT
// filled (ORT returns a new buffer), a graph input is never updated in place, and reading a device tensor from JS
// (getData/download) aborts the process ("not implemented" thrown as a C string). So every arena update is a new
// buffer: ScatterND copies the arena on the device, then writes the new tokens. And a session with device outputs
// runs through the binding's IO binding, which never unbinds an output: a run fetching other outputs than the run
// before fails ("Output count mismatch"), so such a session always fetches the same outputs.
import ort from 'onnxruntime-node';
import { kvGraphIo } from '../onnx/kv-graphs.js';
import type { ArenaShape } from './kv-arena.js';

type Session = Pick<ort.InferenceSession, 'run' | 'release'>;

export class DeviceKv {
  private constructor(
    readonly shape: ArenaShape,
    readonly keys: ort.Tensor[],
    readonly values: ort.Tensor[],
    private readonly copier: Session,
    private readonly init: Session,
    private readonly reader: Session,
  ) {}

  /** Opens the init and copy graphs on the webgpu device and makes a zero arena. */
  static async create(shape: ArenaShape, graphs: { init: string; copy: string; read: string }): Promise<DeviceKv> {
    const options: ort.InferenceSession.SessionOptions = {
      executionProviders: ['webgpu'],
      preferredOutputLocation: 'gpu-buffer',
    };
    const init = await ort.InferenceSession.create(graphs.init, options);
    const copier = await ort.InferenceSession.create(graphs.copy, options);
    const reader = await ort.InferenceSession.create(graphs.read, { executionProviders: ['webgpu'] });
    const dims = [shape.rows, shape.kvHeads, shape.maxLen, shape.headDim];
    const feeds = { [kvGraphIo.shape]: new ort.Tensor('int64', BigInt64Array.from(dims, BigInt), [4]) };
    const make = async () => (await init.run(feeds))[kvGraphIo.cache] as ort.Tensor;
    const keys: ort.Tensor[] = [];
    const values: ort.Tensor[] = [];
    for (let l = 0; l < shape.layers; l++) {
      keys.push(await make());
      values.push(await make());
    }
    // The init session stays open: releasing a webgpu session while another worker's stage has device tensors
    // crashed the process (SIGSEGV, measured with two stages in one process).
    return new DeviceKv(shape, keys, values, copier, init, reader);
  }

  /** A float device tensor's values in host memory (through the kv-read graph: JS cannot read a device tensor). */
  async download(t: ort.Tensor): Promise<Float32Array> {
    return (await this.reader.run({ [kvGraphIo.x]: t }))[kvGraphIo.y].data as Float32Array;
  }

  /** Replaces layer l's tensors with a run's outputs (the old ones are released). */
  replace(layer: number, key: ort.Tensor, value: ort.Tensor): void {
    this.keys[layer].dispose();
    this.values[layer].dispose();
    this.keys[layer] = key;
    this.values[layer] = value;
  }

  /** Copies positions [0, length) of row `from` into row `to` on the device, every layer. */
  async copyPrefix(from: number, to: number, length: number): Promise<void> {
    if (from === to || length === 0) return;
    const { kvHeads } = this.shape;
    const n = length * kvHeads;
    const index = (row: number) => {
      const idx = new BigInt64Array(n * 3);
      for (let h = 0; h < kvHeads; h++) {
        for (let t = 0; t < length; t++) idx.set([BigInt(row), BigInt(h), BigInt(t)], (h * length + t) * 3);
      }
      return new ort.Tensor('int64', idx, [n, 3]);
    };
    const feeds = { [kvGraphIo.from]: index(from), [kvGraphIo.to]: index(to) };
    for (let l = 0; l < this.shape.layers; l++) {
      const copy = async (t: ort.Tensor) =>
        (await this.copier.run({ ...feeds, [kvGraphIo.cache]: t }))[kvGraphIo.cacheOut] as ort.Tensor;
      this.replace(l, await copy(this.keys[l]), await copy(this.values[l]));
    }
  }

  async release(): Promise<void> {
    for (const t of [...this.keys, ...this.values]) t.dispose();
    await this.copier.release();
    await this.init.release();
    await this.reader.release();
  }
}
