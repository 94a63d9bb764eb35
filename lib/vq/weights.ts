// Reads the VQ checkpoint (config.json + model.safetensors, upstream names, docs/model.md "Parameter names") and turns
// the 3-D / BatchNorm parameters into what the single-image graphs need (docs/model.md, "Single-image form").
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { CheckpointError } from '../model/errors.js';
import { SafetensorsFile } from '../model/safetensors.js';
import { loadVqConfig, type VqConfig } from './config.js';

/** BatchNorm3d epsilon (torch default; docs/model.md, "Blocks"). */
export const BATCH_NORM_EPS = 1e-5;

export interface Affine {
  scale: Float32Array;
  shift: Float32Array;
}

/** A CausalConv3d's parameters: weight [out, in, kt, kh, kw] and bias [out]. */
export interface Conv3d {
  weight: Float32Array;
  bias: Float32Array;
  shape: [number, number, number, number, number];
}

export class VqWeights {
  private constructor(
    readonly dir: string,
    readonly config: VqConfig,
    readonly file: SafetensorsFile,
  ) {}

  static open(dir: string): VqWeights {
    const config = loadVqConfig(dir);
    const file = SafetensorsFile.open(join(dir, 'model.safetensors'));
    return new VqWeights(dir, config, file);
  }

  has(name: string): boolean {
    return this.file.tensors.has(name);
  }

  /** A float tensor by its upstream name, checked against the expected shape. */
  read(name: string, shape: number[]): Float32Array {
    const info = this.file.info(name);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new CheckpointError(
        `${this.file.path}: tensor ${name} has shape ${JSON.stringify(info.shape)}, expected ${JSON.stringify(shape)}`,
      );
    }
    return this.file.readF32(name);
  }

  readConv3d(prefix: string, out: number, inp: number, kernel: [number, number, number]): Conv3d {
    const shape: Conv3d['shape'] = [out, inp, ...kernel];
    return { weight: this.read(`${prefix}.weight`, shape), bias: this.read(`${prefix}.bias`, [out]), shape };
  }

  /** BatchNorm3d in eval mode folded into y = x·scale + shift (computed in float64). */
  batchNormAffine(prefix: string, channels: number): Affine {
    const w = this.read(`${prefix}.weight`, [channels]);
    const b = this.read(`${prefix}.bias`, [channels]);
    const mean = this.read(`${prefix}.running_mean`, [channels]);
    const v = this.read(`${prefix}.running_var`, [channels]);
    const scale = new Float32Array(channels);
    const shift = new Float32Array(channels);
    for (let c = 0; c < channels; c++) {
      const s = w[c] / Math.sqrt(v[c] + BATCH_NORM_EPS);
      scale[c] = s;
      shift[c] = b[c] - mean[c] * s;
    }
    return { scale, shift };
  }

  /** Codebook E [codebook_size, embed_dim]. */
  codebook(): Float32Array {
    return this.read('quantize.embedding.weight', [this.config.codebookSize, this.config.embedDim]);
  }

  /**
   * A cheap identity of the weights: sha256 over config.json, the safetensors header, the file size and 16 sampled
   * 64 KiB windows of the data (never the whole file).
   */
  fingerprint(): string {
    const h = createHash('sha256');
    h.update(readFileSync(join(this.dir, 'config.json')));
    h.update(this.file.headerBytes);
    h.update(String(this.file.fileSize));
    const window = 64 * 1024;
    const samples = 16;
    for (let i = 0; i < samples; i++) {
      const at = Math.floor(((this.file.fileSize - window) * i) / (samples - 1));
      h.update(this.file.readAt(Math.max(0, at), window));
    }
    return h.digest('hex');
  }

  close(): void {
    this.file.close();
  }
}

/** Σ over the given time indices of a 3-D kernel's slices: [out, in, kh, kw] (summed in float64). */
export function sumTimeSlices(conv: Conv3d, ks: number[]): Float32Array {
  const [out, inp, kt, kh, kw] = conv.shape;
  const plane = kh * kw;
  const res = new Float32Array(out * inp * plane);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inp; i++) {
      for (let p = 0; p < plane; p++) {
        let s = 0;
        for (const k of ks) {
          if (k < 0 || k >= kt) throw new RangeError(`time slice ${k} outside kernel depth ${kt}`);
          s += conv.weight[((o * inp + i) * kt + k) * plane + p];
        }
        res[(o * inp + i) * plane + p] = s;
      }
    }
  }
  return res;
}
