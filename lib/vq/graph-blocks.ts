// The VQ building blocks (docs/model.md, "Blocks") as ONNX nodes, shared by the encoder and decoder graphs. Each block
// reads its parameters by upstream name, so node names follow the checkpoint (`encoder.down.3.attn.0.q`).
import type { GraphBuilder } from '../onnx/graph.js';
import type { Device } from '../onnx/stage-graph.js';
import { GROUP_NORM_GROUPS } from './config.js';
import { type Affine, type Conv3d, sumTimeSlices, type VqWeights } from './weights.js';

/** GroupNorm epsilon in every 2-D block (docs/model.md, "Blocks"). */
export const GROUP_NORM_EPS = 1e-6;

/** Causal 3-D convs pad time by this many zero frames in front, whatever the kernel (docs/model.md, "Blocks"). */
export const CAUSAL_TIME_PAD = 2;

/** A normalisation applied to a C-channel tensor: GroupNorm in the encoder, SpatialNorm(·, zq) in the decoder. */
export type Norm = (x: string, prefix: string, channels: number) => string;

/**
 * Which form of the graph to build. 'shaped' (CPU, CUDA) restores image shapes from Shape(x). 'shape-free' (webgpu)
 * never reads a shape at run time: ORT's WebGPU provider runs convolutions channels-last, and its layout rewrite turns
 * every Shape(x) into a Gather over the shape that it places on the CPU (24 nodes in the encoder, 33 in the
 * decoder); built without Shape, every node of both graphs is on the WebGPU device.
 */
export type VqGraphForm = 'shaped' | 'shape-free';

/** The form each device runs. */
export function graphFormFor(device: Device): VqGraphForm {
  return device === 'webgpu' ? 'shape-free' : 'shaped';
}

export class VqBlocks {
  constructor(
    readonly g: GraphBuilder,
    readonly w: VqWeights,
    readonly form: VqGraphForm = 'shaped',
  ) {}

  /** Conv2d with the checkpoint's `${prefix}.weight` [out, in, k, k] and `.bias`. */
  conv(
    x: string,
    prefix: string,
    out: number,
    inp: number,
    k: number,
    opts: { stride?: number; pads?: number[] } = {},
  ): string {
    const weight = this.w.read(`${prefix}.weight`, [out, inp, k, k]);
    const bias = this.w.read(`${prefix}.bias`, [out]);
    return this.convWith(x, prefix, weight, bias, [out, inp, k, k], opts);
  }

  convWith(
    x: string,
    name: string,
    weight: Float32Array,
    bias: Float32Array | null,
    shape: number[],
    opts: { stride?: number; pads?: number[] } = {},
  ): string {
    const k = shape[2];
    const p = (k - 1) / 2;
    const inputs = [x, this.g.weight(`${name}.weight`, 'float', shape, weight)];
    if (bias) inputs.push(this.g.weight(`${name}.bias`, 'float', [shape[0]], bias));
    return this.g.op('Conv', inputs, name, {
      kernel_shape: [k, shape[3]],
      pads: opts.pads ?? [p, p, p, p],
      strides: [opts.stride ?? 1, opts.stride ?? 1],
    });
  }

  silu(x: string): string {
    return this.g.op('Mul', [x, this.g.op('Sigmoid', [x], `${x}.sigmoid`)], `${x}.silu`);
  }

  /**
   * GroupNorm(32 groups, eps 1e-6, affine) as InstanceNormalization over [1, 32, C/32·H·W] (the same statistics:
   * mean and biased variance per group), then the per-channel affine.
   */
  groupNorm(x: string, prefix: string, channels: number, paramPrefix = prefix): string {
    const gamma = this.w.read(`${paramPrefix}.weight`, [channels]);
    const beta = this.w.read(`${paramPrefix}.bias`, [channels]);
    const normed = this.groupNormPlain(x, prefix, channels);
    return this.affine(normed, prefix, { scale: gamma, shift: beta });
  }

  /**
   * GroupNorm without its affine part. Shape-free form: [1, C, H, W] → [1, 32, C/32·H, W] keeps W (Reshape's 0), so
   * the way back [1, C, H, W] needs no Shape(x); the statistics (over all of a group's values) are the same.
   */
  groupNormPlain(x: string, prefix: string, channels: number): string {
    const g = this.g;
    const shapeFree = this.form === 'shape-free';
    const grouped = g.op(
      'Reshape',
      [
        x,
        g.constInt64(`${prefix}.group_shape`, shapeFree ? [0, GROUP_NORM_GROUPS, -1, 0] : [0, GROUP_NORM_GROUPS, -1]),
      ],
      `${prefix}.grouped`,
    );
    const ones = g.constFloat(`${prefix}.ones`, new Array(GROUP_NORM_GROUPS).fill(1));
    const zeros = g.constFloat(`${prefix}.zeros`, new Array(GROUP_NORM_GROUPS).fill(0));
    const normed = g.op('InstanceNormalization', [grouped, ones, zeros], `${prefix}.group_normed`, {
      epsilon: { float: GROUP_NORM_EPS },
    });
    const back = shapeFree
      ? g.constInt64(`${prefix}.image_shape`, [0, channels, -1, 0])
      : g.op('Shape', [x], `${prefix}.shape`);
    return g.op('Reshape', [normed, back], `${prefix}.normed`);
  }

  /** y = x·scale[c] + shift[c] over [1, C, H, W]. */
  affine(x: string, name: string, a: Affine): string {
    const c = a.scale.length;
    const scaled = this.g.op('Mul', [x, this.g.weight(`${name}.scale`, 'float', [c, 1, 1], a.scale)], `${name}.scaled`);
    return this.g.op('Add', [scaled, this.g.weight(`${name}.shift`, 'float', [c, 1, 1], a.shift)], `${name}.out`);
  }

  /** ResnetBlock: shortcut(x) + conv2(act(N2(conv1(act(N1(x)))))). Dropout is the identity at inference. */
  resnet(x: string, prefix: string, cin: number, cout: number, norm: Norm): string {
    let h = this.silu(norm(x, `${prefix}.norm1`, cin));
    h = this.conv(h, `${prefix}.conv1`, cout, cin, 3);
    h = this.silu(norm(h, `${prefix}.norm2`, cout));
    h = this.conv(h, `${prefix}.conv2`, cout, cout, 3);
    const shortcut = cin === cout ? x : this.conv(x, `${prefix}.nin_shortcut`, cout, cin, 1);
    return this.g.op('Add', [shortcut, h], `${prefix}.out`);
  }

  /** Single-head AttnBlock over all H·W positions: x + proj_out(v · softmax(qᵀk / √C)ᵀ). */
  attention(x: string, prefix: string, channels: number, norm: Norm): string {
    const g = this.g;
    const n = norm(x, `${prefix}.norm`, channels);
    if (this.form === 'shape-free') return this.attentionShapeFree(x, n, prefix, channels);
    const flat = g.constInt64(`${prefix}.flat_shape`, [0, channels, -1]);
    const project = (which: string) =>
      g.op('Reshape', [this.conv(n, `${prefix}.${which}`, channels, channels, 1), flat], `${prefix}.${which}.flat`);
    const qScaled = g.op(
      'Mul',
      [project('q'), g.constFloat(`${prefix}.inv_sqrt_c`, [1 / Math.sqrt(channels)], [])],
      `${prefix}.q.scaled`,
    );
    const qT = g.op('Transpose', [qScaled], `${prefix}.qT`, { perm: [0, 2, 1] });
    const scores = g.op('MatMul', [qT, project('k')], `${prefix}.scores`);
    const probs = g.op('Softmax', [scores], `${prefix}.probs`, { axis: -1 });
    const vT = g.op('Transpose', [project('v')], `${prefix}.vT`, { perm: [0, 2, 1] });
    const oT = g.op('MatMul', [probs, vT], `${prefix}.oT`);
    const o = g.op('Transpose', [oT], `${prefix}.o`, { perm: [0, 2, 1] });
    const oImage = g.op('Reshape', [o, g.op('Shape', [x], `${prefix}.x_shape`)], `${prefix}.o_image`);
    const proj = this.conv(oImage, `${prefix}.proj_out`, channels, channels, 1);
    return g.op('Add', [x, proj], `${prefix}.out`);
  }

  /**
   * The same attention without reading a shape: q stays an image, qᵀ [1, H, W, C] times k [1, C, H·W] broadcasts to
   * scores [1, H, W, H·W], and probs times vᵀ [1, H·W, C] is [1, H, W, C], transposed back to [1, C, H, W].
   */
  private attentionShapeFree(x: string, n: string, prefix: string, channels: number): string {
    const g = this.g;
    const flat = g.constInt64(`${prefix}.flat_shape`, [0, channels, -1]);
    const project = (which: string) => this.conv(n, `${prefix}.${which}`, channels, channels, 1);
    const flatten = (which: string) => g.op('Reshape', [project(which), flat], `${prefix}.${which}.flat`);
    const qScaled = g.op(
      'Mul',
      [project('q'), g.constFloat(`${prefix}.inv_sqrt_c`, [1 / Math.sqrt(channels)], [])],
      `${prefix}.q.scaled`,
    );
    const qT = g.op('Transpose', [qScaled], `${prefix}.qT`, { perm: [0, 2, 3, 1] });
    const scores = g.op('MatMul', [qT, flatten('k')], `${prefix}.scores`);
    const probs = g.op('Softmax', [scores], `${prefix}.probs`, { axis: -1 });
    const vT = g.op('Transpose', [flatten('v')], `${prefix}.vT`, { perm: [0, 2, 1] });
    const oT = g.op('MatMul', [probs, vT], `${prefix}.oT`);
    const oImage = g.op('Transpose', [oT], `${prefix}.o_image`, { perm: [0, 3, 1, 2] });
    const proj = this.conv(oImage, `${prefix}.proj_out`, channels, channels, 1);
    return g.op('Add', [x, proj], `${prefix}.out`);
  }

  /** Nearest-neighbour upsampling by an integer factor (pixel repetition, as torch's nearest at integer ratios). */
  upsampleNearest(x: string, name: string, factor: number): string {
    const scales = this.g.constFloat(`${name}.scales`, [1, 1, factor, factor]);
    return this.g.op('Resize', [x, '', scales], name, {
      mode: 'nearest',
      coordinate_transformation_mode: 'asymmetric',
      nearest_mode: 'floor',
    });
  }

  /**
   * A CausalConv3d over a list of frames (each a [1, C, H, W] tensor), time padded by 2 zero frames in front. Output
   * frame t = Σ_k conv2d(frame[t·stride + k − 2]; W[:,:,k]) + b; zero frames drop out and repeated inputs (same tensor)
   * have their kernel slices summed first — which gives the single-image form exactly
   * (docs/model.md, "Single-image form"). `outputs` limits how many leading output frames are built.
   */
  causalConvFrames(frames: string[], name: string, conv: Conv3d, stride: number, outputs?: number): string[] {
    const [cout, cin, kt, kh, kw] = conv.shape;
    const padded = frames.length + CAUSAL_TIME_PAD;
    const total = Math.floor((padded - kt) / stride) + 1;
    const count = Math.min(total, outputs ?? total);
    // Spatial padding ((k − s)//2 + (k − s)%2, (k − s)//2) with stride 1 is symmetric for odd kernels.
    const pads = [
      kh - 1 - Math.floor((kh - 1) / 2),
      kw - 1 - Math.floor((kw - 1) / 2),
      Math.floor((kh - 1) / 2),
      Math.floor((kw - 1) / 2),
    ];
    const result: string[] = [];
    for (let t = 0; t < count; t++) {
      const slicesByFrame = new Map<string, number[]>();
      for (let k = 0; k < kt; k++) {
        const j = t * stride + k - CAUSAL_TIME_PAD;
        if (j < 0 || j >= frames.length) continue;
        const list = slicesByFrame.get(frames[j]) ?? [];
        list.push(k);
        slicesByFrame.set(frames[j], list);
      }
      const terms: string[] = [];
      let first = true;
      for (const [frame, ks] of slicesByFrame) {
        const weight = sumTimeSlices(conv, ks);
        terms.push(
          this.convWith(frame, `${name}.t${t}.k${ks.join('')}`, weight, first ? conv.bias : null, [cout, cin, kh, kw], {
            pads,
          }),
        );
        first = false;
      }
      if (terms.length === 0) throw new Error(`${name}: output frame ${t} sees only padding`);
      let sum = terms[0];
      for (let i = 1; i < terms.length; i++) sum = this.g.op('Add', [sum, terms[i]], `${name}.t${t}.sum`);
      result.push(sum);
    }
    return result;
  }

  /** TemporalResnetBlock over frames: x + conv2(act(BN2(conv1(act(BN1(x)))))), causal (3,3,3) convs. */
  temporalResnet(frames: string[], prefix: string, channels: number, outputs?: number): string[] {
    const bn1 = this.w.batchNormAffine(`${prefix}.norm1`, channels);
    const bn2 = this.w.batchNormAffine(`${prefix}.norm2`, channels);
    const conv1 = this.w.readConv3d(`${prefix}.conv1.conv`, channels, channels, [3, 3, 3]);
    const conv2 = this.w.readConv3d(`${prefix}.conv2.conv`, channels, channels, [3, 3, 3]);
    let h = frames.map((f, t) => this.silu(this.affine(f, `${prefix}.norm1.t${t}`, bn1)));
    h = this.causalConvFrames(h, `${prefix}.conv1`, conv1, 1, outputs);
    h = h.map((f, t) => this.silu(this.affine(f, `${prefix}.norm2.t${t}`, bn2)));
    h = this.causalConvFrames(h, `${prefix}.conv2`, conv2, 1, outputs);
    return h.map((f, t) => this.g.op('Add', [frames[t], f], `${prefix}.t${t}.out`));
  }
}
