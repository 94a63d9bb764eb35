// The ONNX graph of one pipeline stage: decoder layers [first, end) of an Emu3 checkpoint, with the token embedding
// on the first stage and the final norm + lm_head on the last (EMU3.md §1.2). One stage with all layers is the whole
// model. Tokens are flattened: every activation is [T, hidden] with T = batch × new positions; only attention sees
// the [batch, seq] structure.
//
// Inputs                                  Outputs
//   input_ids  int32 [B, S]  (first)        logits     float [B, vocab]  (last: the last position of each row)
//   hidden_in  float [T, D]  (otherwise)    hidden_out float [T, D]      (otherwise)
//   position_ids int64 [B, S]               layers.N.new_key / new_value float [B, S, kvHeads·headDim]
//   past_length int64 [1]  P = the longest past among the rows (≥ 1; attention reads arena positions [0, P))
//   past_mask float [B, 1, 1, P]  0 where position j < that row's past length, −inf elsewhere
//   causal_mask float [1, 1, G·S, S]  0 where new position j ≤ the query's position s (row g·S + s), −inf elsewhere
//   layers.N.past_key / past_value float [B, kvHeads, maxLen, headDim]   (the KV arena, read only)
//
// The KV arena is owned by JS and fed as an input (ORT wraps inputs without copying); the graph returns only the new
// positions' post-rotary K and V, which the runtime writes into the arena (DESIGN.md §3, §5).
import type { Checkpoint } from '../model/checkpoint.js';
import { tensorNames } from '../model/checkpoint.js';
import type { Emu3Config } from '../model/config.js';
import { concatFloat32 } from '../util/float32.js';
import type { GraphBuilder } from './graph.js';
import { type Int4Scheme, quantizeInt4 } from './int4.js';
import { addSamplingHead } from './sampling-head.js';

export type Precision = 'fp32' | 'int4';
export const PRECISIONS: readonly Precision[] = ['fp32', 'int4'];

/** Every precision and op choice of the graph, decided in one place. */
interface LinearPlan {
  kind: 'fp32' | 'int4';
  scheme: Int4Scheme;
  /** MatMulNBits accuracy_level: 4 = int8 compute, the fast CPU path (DESIGN.md §8). */
  accuracyLevel: number;
}

function linearPlan(precision: Precision): LinearPlan {
  return precision === 'int4'
    ? { kind: 'int4', scheme: 'asymmetric', accuracyLevel: 4 }
    : { kind: 'fp32', scheme: 'asymmetric', accuracyLevel: 0 };
}

export interface StageSpec {
  first: number;
  /** Exclusive. */
  end: number;
  precision: Precision;
}

export interface StageShape {
  isFirst: boolean;
  isLast: boolean;
  hiddenSize: number;
  vocabSize: number;
  /** Query heads; heads ÷ kvHeads query heads share each kv head. */
  heads: number;
  kvHeads: number;
  headDim: number;
  layers: number[];
}

export function stageShape(config: Emu3Config, spec: StageSpec): StageShape {
  return {
    isFirst: spec.first === 0,
    isLast: spec.end === config.numHiddenLayers,
    hiddenSize: config.hiddenSize,
    vocabSize: config.vocabSize,
    heads: config.numAttentionHeads,
    kvHeads: config.numKeyValueHeads,
    headDim: config.headDim,
    layers: Array.from({ length: spec.end - spec.first }, (_, i) => spec.first + i),
  };
}

export const io = {
  inputIds: 'input_ids',
  hiddenIn: 'hidden_in',
  positionIds: 'position_ids',
  pastLength: 'past_length',
  pastMask: 'past_mask',
  causalMask: 'causal_mask',
  hiddenOut: 'hidden_out',
  logits: 'logits',
  pastKey: (layer: number) => `layers.${layer}.past_key`,
  pastValue: (layer: number) => `layers.${layer}.past_value`,
  newKey: (layer: number) => `layers.${layer}.new_key`,
  newValue: (layer: number) => `layers.${layer}.new_value`,
};

const MS = 'com.microsoft';

interface Ctx {
  g: GraphBuilder;
  ckpt: Checkpoint;
  c: Emu3Config;
  plan: LinearPlan;
  /** Shape tensors computed once: [B, S, -1] for reshaping flat tokens back to rows. */
  rowsShape: string;
  cos: string;
  sin: string;
  /** Slice constants. */
  zero: string;
  big: string;
  axis2: string;
  axis3: string;
}

/** Validates the layer range against the config; the message names the limit. */
export function checkStageSpec(config: Emu3Config, spec: StageSpec): void {
  const n = config.numHiddenLayers;
  if (
    !Number.isInteger(spec.first) ||
    !Number.isInteger(spec.end) ||
    spec.first < 0 ||
    spec.end > n ||
    spec.first >= spec.end
  ) {
    throw new Error(`layer range [${spec.first}, ${spec.end}) must satisfy 0 ≤ first < end ≤ ${n} (num_hidden_layers)`);
  }
  if (!PRECISIONS.includes(spec.precision))
    throw new Error(`precision "${spec.precision}" is not one of ${PRECISIONS.join('|')}`);
}

/** Adds the whole stage to `g` (the caller saves it). Reads and writes one tensor at a time. */
export function buildStageGraph(g: GraphBuilder, ckpt: Checkpoint, spec: StageSpec): StageShape {
  const c = ckpt.config;
  checkStageSpec(c, spec);
  const shape = stageShape(c, spec);
  g.useOpset(MS, 1);
  const tokens = shape.isFirst ? g.input(io.inputIds, 'int32', ['batch', 'seq']) : null;
  const hiddenIn = shape.isFirst ? null : g.input(io.hiddenIn, 'float', ['tokens', c.hiddenSize]);
  const positions = g.input(io.positionIds, 'int64', ['batch', 'seq']);
  g.input(io.pastLength, 'int64', [1]);
  g.input(io.pastMask, 'float', ['batch', 1, 1, 'past_len']);
  g.input(io.causalMask, 'float', [1, 1, 'group_rows', 'seq']);
  const rowsShape = g.op(
    'Concat',
    [g.op('Shape', [positions], 'rows_shape.bs'), g.constInt64('minus_one', [-1])],
    'rows_shape',
    { axis: 0 },
  );
  const [cos, sin] = rotaryTables(g, c);
  const ctx: Ctx = {
    g,
    ckpt,
    c,
    plan: linearPlan(spec.precision),
    rowsShape,
    cos,
    sin,
    zero: g.constInt64('slice.zero', [0]),
    big: g.constInt64('slice.end', [2 ** 31 - 1]),
    axis2: g.constInt64('slice.axis2', [2]),
    axis3: g.constInt64('slice.axis3', [3]),
  };

  let h = tokens ? embed(ctx, tokens) : (hiddenIn as string);
  for (const layer of shape.layers) h = decoderLayer(ctx, layer, h, positions);
  if (shape.isLast) {
    g.output(lmHead(ctx, h), 'float', ['batch', c.vocabSize]);
    addSamplingHead(g, io.logits, c.vocabSize); // sampling.* inputs/outputs (sampling-head.ts)
  } else {
    g.output(g.op('Identity', [h], io.hiddenOut), 'float', ['tokens', c.hiddenSize]);
  }
  return shape;
}

/** h = embed_tokens[input_ids], kept in fp32 whatever the precision. */
function embed(ctx: Ctx, tokens: string): string {
  const { g, c } = ctx;
  const table = g.weight(
    'embed_tokens',
    'float',
    [c.vocabSize, c.hiddenSize],
    ctx.ckpt.read(tensorNames.embed, [c.vocabSize, c.hiddenSize]),
  );
  const flat = g.op('Reshape', [tokens, g.constInt64('flat_shape', [-1])], 'embed.ids');
  return g.op('Gather', [table, flat], 'embed', { axis: 0 });
}

function decoderLayer(ctx: Ctx, layer: number, h: string, positions: string): string {
  const { g } = ctx;
  const names = tensorNames.layer(layer);
  const p = `layers.${layer}`;
  const a = rmsnorm(ctx, `${p}.input_norm`, names.inputNorm, h);
  const o = attention(ctx, layer, a, positions);
  // h1 = h + o and m = RMSNorm_post(h1) in one fused op (output 3 is the sum).
  const weight = normWeight(ctx, names.postNorm, `${p}.post_norm.weight`);
  const [m, , , h1] = g.node(
    'SkipSimplifiedLayerNormalization',
    [h, o, weight],
    [`${p}.post_norm`, '', '', `${p}.attn_residual`],
    {
      epsilon: { float: ctx.c.rmsNormEps },
    },
    { domain: MS },
  );
  const d = mlp(ctx, layer, m);
  return g.op('Add', [h1, d], `${p}.mlp_residual`);
}

/** RMSNorm in fp32: x · rsqrt(mean(x²) + eps) · weight. */
function rmsnorm(ctx: Ctx, name: string, tensor: string, x: string): string {
  const weight = normWeight(ctx, tensor, `${name}.weight`);
  return ctx.g.op('SimplifiedLayerNormalization', [x, weight], name, {
    axis: -1,
    epsilon: { float: ctx.c.rmsNormEps },
    stash_type: 1,
  });
}

function normWeight(ctx: Ctx, tensor: string, name: string): string {
  return ctx.g.weight(name, 'float', [ctx.c.hiddenSize], ctx.ckpt.read(tensor, [ctx.c.hiddenSize]));
}

/** q, k, v (one fused projection), rotate_half RoPE on q and k, grouped-query attention over arena + new, o_proj. */
function attention(ctx: Ctx, layer: number, a: string, positions: string): string {
  const { g, c } = ctx;
  const names = tensorNames.layer(layer);
  const p = `layers.${layer}.attn`;
  const qDim = c.numAttentionHeads * c.headDim;
  const kvDim = c.numKeyValueHeads * c.headDim;
  const qkvWeight = concatFloat32([
    ctx.ckpt.readLinear(names.q, qDim, c.hiddenSize),
    ctx.ckpt.readLinear(names.k, kvDim, c.hiddenSize),
    ctx.ckpt.readLinear(names.v, kvDim, c.hiddenSize),
  ]);
  const qkv = linear(ctx, `${p}.qkv`, qkvWeight, qDim + 2 * kvDim, c.hiddenSize, a);
  const rows = g.op('Reshape', [qkv, ctx.rowsShape], `${p}.qkv_rows`);
  const [q, k, v] = g.node(
    'Split',
    [rows, g.constInt64(`${p}.split`, [qDim, kvDim, kvDim])],
    [`${p}.q`, `${p}.k`, `${p}.v`],
    { axis: 2 },
  );
  const qRot = rotary(ctx, `${p}.q_rot`, q, positions, c.numAttentionHeads);
  const kRot = rotary(ctx, io.newKey(layer), k, positions, c.numKeyValueHeads);
  g.output(kRot, 'float', ['batch', 'seq', kvDim]);
  const vNew = g.op('Identity', [v], io.newValue(layer));
  g.output(vNew, 'float', ['batch', 'seq', kvDim]);
  const attn = attend(ctx, layer, qRot, kRot, vNew);
  return linear(ctx, `${p}.o`, ctx.ckpt.readLinear(names.o, c.hiddenSize, qDim), c.hiddenSize, qDim, attn);
}

/**
 * softmax(q·kᵀ/√d + mask)·v over the arena's first past_length positions and the new ones, kv head j serving query
 * heads jG..jG+G−1. Written out rather than GroupQueryAttention, which allocates and fills a present buffer as long
 * as the arena's slots (max_len) on every run: here a step costs the used context (one slice of it), not the
 * capacity. Query rows are laid out g-major, [B, kvHeads, G·S, d], so each kv head is one batched matmul.
 */
function attend(ctx: Ctx, layer: number, q: string, k: string, v: string): string {
  const { g, c } = ctx;
  const p = `layers.${layer}.attn`;
  const KV = c.numKeyValueHeads;
  const G = c.numAttentionHeads / KV;
  const d = c.headDim;
  const shape = (name: string, dims: number[]) => g.constInt64(`${p}.${name}`, dims);
  // [B, S, H·d] → [B, KV, G·S, d]
  const q5 = g.op('Reshape', [q, shape('q5_shape', [0, 0, KV, G, d])], `${p}.q5`);
  const qT = g.op('Transpose', [q5], `${p}.q5t`, { perm: [0, 2, 3, 1, 4] });
  const q4 = g.op('Reshape', [qT, shape('q4_shape', [0, 0, -1, d])], `${p}.q4`);
  // new k, v: [B, S, KV·d] → [B, KV, S, d]
  const heads = (x: string, name: string) =>
    g.op('Transpose', [g.op('Reshape', [x, shape(`${name}_shape`, [0, 0, KV, d])], `${p}.${name}4`)], `${p}.${name}t`, {
      perm: [0, 2, 1, 3],
    });
  const kNew = heads(k, 'k');
  const vNew = heads(v, 'v');
  const arena = (name: string) =>
    g.op(
      'Slice',
      [g.input(name, 'float', ['batch', KV, 'max_len', d]), ctx.zero, io.pastLength, ctx.axis2],
      `${name}.used`,
    );
  const kPast = arena(io.pastKey(layer));
  const vPast = arena(io.pastValue(layer));
  const scale = { float: 1 / Math.sqrt(d) };
  const scores = (x: string, name: string) =>
    g.op('FusedMatMul', [q4, x], `${p}.${name}`, { alpha: scale, transA: 0, transB: 1 }, MS);
  const sPast = g.op('Add', [scores(kPast, 'scores_past'), io.pastMask], `${p}.scores_past_masked`);
  const sNew = g.op('Add', [scores(kNew, 'scores_new'), io.causalMask], `${p}.scores_new_masked`);
  const probs = g.op('Softmax', [g.op('Concat', [sPast, sNew], `${p}.scores`, { axis: 3 })], `${p}.probs`, {
    axis: -1,
  });
  const pPast = g.op('Slice', [probs, ctx.zero, io.pastLength, ctx.axis3], `${p}.probs_past`);
  const pNew = g.op('Slice', [probs, io.pastLength, ctx.big, ctx.axis3], `${p}.probs_new`);
  const out = g.op(
    'Add',
    [g.op('MatMul', [pPast, vPast], `${p}.out_past`), g.op('MatMul', [pNew, vNew], `${p}.out_new`)],
    `${p}.out4`,
  );
  // [B, KV, G·S, d] → [B, KV, G, S, d] → [B, S, KV, G, d] → [B·S, H·d]
  const o5 = g.op('Reshape', [out, shape('o5_shape', [0, 0, G, -1, d])], `${p}.o5`);
  const oT = g.op('Transpose', [o5], `${p}.o5t`, { perm: [0, 3, 1, 2, 4] });
  return g.op('Reshape', [oT, shape('out_shape', [-1, c.numAttentionHeads * d])], `${p}.out`);
}

/** x·cos + rotate_half(x)·sin with positions per token (NOT interleaved). */
function rotary(ctx: Ctx, name: string, x: string, positions: string, heads: number): string {
  return ctx.g.op('RotaryEmbedding', [x, positions, ctx.cos, ctx.sin], name, { interleaved: 0, num_heads: heads }, MS);
}

/** down(silu(gate(m)) · up(m)). */
function mlp(ctx: Ctx, layer: number, m: string): string {
  const { g, c } = ctx;
  const names = tensorNames.layer(layer);
  const p = `layers.${layer}.mlp`;
  const I = c.intermediateSize;
  const D = c.hiddenSize;
  const gate = linear(ctx, `${p}.gate`, ctx.ckpt.readLinear(names.gate, I, D), I, D, m);
  const up = linear(ctx, `${p}.up`, ctx.ckpt.readLinear(names.up, I, D), I, D, m);
  const silu = g.op('Mul', [gate, g.op('Sigmoid', [gate], `${p}.gate_sigmoid`)], `${p}.silu`);
  const hidden = g.op('Mul', [silu, up], `${p}.act`);
  return linear(ctx, `${p}.down`, ctx.ckpt.readLinear(names.down, D, I), D, I, hidden);
}

/** Final norm and lm_head on the last position of each row only. */
function lmHead(ctx: Ctx, h: string): string {
  const { g, c } = ctx;
  const rows = g.op('Reshape', [h, ctx.rowsShape], 'head.rows');
  const last = g.op(
    'Slice',
    [rows, g.constInt64('head.start', [-1]), g.constInt64('head.end', [2 ** 31 - 1]), g.constInt64('head.axis', [1])],
    'head.last',
  );
  const flat = g.op('Reshape', [last, g.constInt64('head.flat', [-1, c.hiddenSize])], 'head.last_flat');
  const normed = rmsnorm(ctx, 'norm', tensorNames.norm, flat);
  const weight = ctx.ckpt.readLinear(tensorNames.lmHead, c.vocabSize, c.hiddenSize);
  const logits = linear(ctx, 'lm_head', weight, c.vocabSize, c.hiddenSize, normed);
  return g.op('Identity', [logits], io.logits);
}

/** y = x · Wᵀ for a torch-layout [out, in] weight: Gemm(transB) in fp32, MatMulNBits in int4. */
function linear(ctx: Ctx, name: string, weight: Float32Array, out: number, inp: number, x: string): string {
  const { g, plan } = ctx;
  if (plan.kind === 'fp32') {
    const w = g.weight(`${name}.weight`, 'float', [out, inp], weight);
    return g.op('Gemm', [x, w], name, { transB: 1 });
  }
  const q = quantizeInt4(weight, out, inp, plan.scheme);
  const inputs = [
    x,
    g.weight(`${name}.qweight`, 'uint8', [out, q.blocks, 16], q.packed),
    g.weight(`${name}.scales`, 'float', [out * q.blocks], q.scales),
  ];
  if (q.zeroPoints) inputs.push(g.weight(`${name}.zero_points`, 'uint8', [q.zeroPoints.length], q.zeroPoints));
  return g.op(
    'MatMulNBits',
    inputs,
    name,
    { K: inp, N: out, bits: 4, block_size: 32, accuracy_level: plan.accuracyLevel },
    MS,
  );
}

/** cos/sin tables [maxPositions, headDim/2] for rotate_half RoPE with the config's theta, computed in float64. */
function rotaryTables(g: GraphBuilder, c: Emu3Config): [string, string] {
  const half = c.headDim / 2;
  const positions = c.maxPositionEmbeddings;
  const cos = new Float32Array(positions * half);
  const sin = new Float32Array(positions * half);
  for (let i = 0; i < half; i++) {
    const invFreq = 1 / c.ropeTheta ** ((2 * i) / c.headDim);
    for (let pos = 0; pos < positions; pos++) {
      cos[pos * half + i] = Math.cos(pos * invFreq);
      sin[pos * half + i] = Math.sin(pos * invFreq);
    }
  }
  return [
    g.weight('rotary.cos', 'float', [positions, half], cos),
    g.weight('rotary.sin', 'float', [positions, half], sin),
  ];
}
