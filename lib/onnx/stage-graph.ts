// The ONNX graph of one pipeline stage: decoder layers [first, end) of an Emu3 checkpoint, with the token embedding
// on the first stage and the final norm + lm_head on the last (docs/model.md, "Forward pass"). One stage with all layers is the whole
// model. One run serves a whole micro-batch, whatever its mix of decode rows and prefill chunks: every per-token
// step (embedding, norms, projections, rotary, MLP) runs once over the call's T tokens flattened in item order, so
// each weight is read once per run; only attention is per sequence, in two branches over the same flat tokens:
//
//   decode  the items with one new token: [R_d, 1] query rows
//   chunk   the items with several (prefill chunks): [R_c, S] rows padded to the longest of them
//
// Each branch gathers its rows' q, k, v from the flat tokens (`<branch>.tokens`: the flat index of each row
// position; padding repeats a real token) and attends over its own slice of the KV arena; `token_rows` then picks
// each flat token's output among the branches' rows (decode rows first, then chunk rows × S), so padding is never
// read. A branch with no items is fed a one-row dummy (token 0, one zero past position), which nothing reads.
//
// Inputs                                          Outputs
//   input_ids  int32 [T]     (first)                logits     float [B, vocab]  (last: each item's last token)
//   hidden_in  float [T, D]  (otherwise)            hidden_out float [T, D]      (otherwise; item order)
//   position_ids int64 [T]                          layers.N.new_key / new_value float [T, kvHeads·headDim]
//   token_rows int64 [T]
//   last_tokens int64 [B]    (last): the flat index of each item's last token
//   per branch b in decode, chunk:
//     b.tokens int64 [R, S]   (S = 1 for decode)
//     b.past_length int64 [1]  P = the longest past among the branch's rows (≥ 1; attention reads positions [0, P))
//     b.past_mask float [R, 1, 1, P]  0 where position j < that row's past length, −inf elsewhere
//     layers.N.b.past_key / past_value float [R, kvHeads, maxLen, headDim]   (the branch's rows of the arena)
//   chunk.causal_mask float [1, 1, G·S, S]  0 where new position j ≤ the query's position s (row g·S + s)
//
// The KV arena is owned by JS and fed as inputs (ORT wraps inputs without copying); the graph returns only the new
// positions' post-rotary K and V, which the runtime writes into the arena (docs/architecture.md, "Stage graphs and devices", "KV lifecycle").
//
// With `kvOnDevice` (webgpu) the arena lives on the device instead (lib/runtime/device-kv.ts), and the KV inputs and
// outputs differ: each layer's whole arena is one input, each branch picks its rows by slot and computes its past
// mask in the graph from the rows' past lengths (so no input grows with the context), and the graph returns the
// arena with the new positions written (ScatterND), which stays on the device as the next run's input:
//   layers.N.key_cache / value_cache float [slots, kvHeads, maxLen, headDim] → layers.N.key_cache_out / value_cache_out
//   kv.write_index int64 [T, kvHeads, 3]: (slot, head, position) of each new token's K and V
//   per branch, instead of b.past_mask and the past inputs: b.rows int64 [R] (slots), b.row_starts float [R, 1, 1, 1]
import type { Checkpoint } from '../model/checkpoint.js';
import { tensorNames } from '../model/checkpoint.js';
import type { Emu3Config } from '../model/config.js';
import { floatToHalf } from '../model/dtype.js';
import { concatFloat32 } from '../util/float32.js';
import type { GraphBuilder } from './graph.js';
import { type Int4Scheme, quantizeInt4 } from './int4.js';
import { addSamplingHead } from './sampling-head.js';

/** fp16: weights (and a device KV arena) in IEEE half, activations and attention in fp32; webgpu only. */
export type Precision = 'fp32' | 'int4' | 'fp16';
export const PRECISIONS: readonly Precision[] = ['fp32', 'int4', 'fp16'];

/** The precision a device runs when none is asked for: fp16 on webgpu (half the bytes to read per token), else fp32. */
export function defaultPrecision(device: Device | undefined): Precision {
  return device === 'webgpu' ? 'fp16' : 'fp32';
}

/**
 * Where a stage's ORT session runs: the CPU; ONNX Runtime's WebGPU execution provider (Dawn over Vulkan), which the
 * npm package contains; or its CUDA provider, which it does not (its libraries are a separate download).
 */
export type Device = 'cpu' | 'webgpu' | 'cuda';
export const DEVICES: readonly Device[] = ['cpu', 'webgpu', 'cuda'];

/** Every precision and op choice of the graph, decided in one place. */
interface LinearPlan {
  kind: 'fp32' | 'int4' | 'fp16';
  scheme: Int4Scheme;
  /** MatMulNBits accuracy_level: 4 = int8 compute, the fast CPU path (measured fastest here). */
  accuracyLevel: number;
  /**
   * Attention scores q·kᵀ·scale as com.microsoft FusedMatMul (transB, alpha: one CPU kernel, measured fastest
   * here), or as Transpose + MatMul + Mul, which ORT's WebGPU provider runs (it has no FusedMatMul kernel: those
   * nodes fell back to the CPU, with a copy of q and K across the bus each).
   */
  fusedScores: boolean;
}

function linearPlan(precision: Precision, device: Device): LinearPlan {
  const fusedScores = device !== 'webgpu';
  return precision === 'int4'
    ? { kind: 'int4', scheme: 'asymmetric', accuracyLevel: 4, fusedScores }
    : { kind: precision, scheme: 'asymmetric', accuracyLevel: 0, fusedScores };
}

export interface StageSpec {
  first: number;
  /** Exclusive. */
  end: number;
  precision: Precision;
  /** Default cpu. The graph differs per device only where a device lacks a kernel. */
  device?: Device;
  /** The KV arena as device-resident graph inputs and outputs (see the header); default false (JS-owned arena). */
  kvOnDevice?: boolean;
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
  /** The sampling head's on-device variant (webgpu): its feeds are deviceSamplingFeeds. */
  deviceSampling?: boolean;
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
    ...(spec.device === 'webgpu' ? { deviceSampling: true } : {}),
  };
}

/** The two attention branches: rows with one new token, and rows with several (padded to the longest). */
export type Branch = 'decode' | 'chunk';
export const BRANCHES: readonly Branch[] = ['decode', 'chunk'];

export const io = {
  inputIds: 'input_ids',
  hiddenIn: 'hidden_in',
  positionIds: 'position_ids',
  tokenRows: 'token_rows',
  lastTokens: 'last_tokens',
  branchTokens: (b: Branch) => `${b}.tokens`,
  pastLength: (b: Branch) => `${b}.past_length`,
  pastMask: (b: Branch) => `${b}.past_mask`,
  causalMask: 'chunk.causal_mask',
  hiddenOut: 'hidden_out',
  logits: 'logits',
  pastKey: (layer: number, b: Branch) => `layers.${layer}.${b}.past_key`,
  pastValue: (layer: number, b: Branch) => `layers.${layer}.${b}.past_value`,
  newKey: (layer: number) => `layers.${layer}.new_key`,
  newValue: (layer: number) => `layers.${layer}.new_value`,
  keyCache: (layer: number) => `layers.${layer}.key_cache`,
  valueCache: (layer: number) => `layers.${layer}.value_cache`,
  keyCacheOut: (layer: number) => `layers.${layer}.key_cache_out`,
  valueCacheOut: (layer: number) => `layers.${layer}.value_cache_out`,
  kvWriteIndex: 'kv.write_index',
  branchRows: (b: Branch) => `${b}.rows`,
  rowStarts: (b: Branch) => `${b}.row_starts`,
};

const MS = 'com.microsoft';

interface Ctx {
  g: GraphBuilder;
  ckpt: Checkpoint;
  c: Emu3Config;
  plan: LinearPlan;
  /** position_ids as [1, T], the shape RotaryEmbedding takes. */
  positions: string;
  cos: string;
  sin: string;
  kvOnDevice: boolean;
  /** 0, 1, … as floats (the device past mask's positions), made on first use. */
  kvPositions?: string;
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
  if (spec.device !== undefined && !DEVICES.includes(spec.device))
    throw new Error(`device "${spec.device}" is not one of ${DEVICES.join('|')}`);
  if (spec.precision === 'fp16' && spec.device !== 'webgpu')
    throw new Error(`precision fp16 needs device webgpu (got ${spec.device ?? 'cpu'}): use fp32 or int4 there`);
}

/** Adds the whole stage to `g` (the caller saves it). Reads and writes one tensor at a time. */
export function buildStageGraph(g: GraphBuilder, ckpt: Checkpoint, spec: StageSpec): StageShape {
  const c = ckpt.config;
  checkStageSpec(c, spec);
  const shape = stageShape(c, spec);
  g.useOpset(MS, 1);
  const tokens = shape.isFirst ? g.input(io.inputIds, 'int32', ['tokens']) : null;
  const hiddenIn = shape.isFirst ? null : g.input(io.hiddenIn, 'float', ['tokens', c.hiddenSize]);
  const positions = g.op(
    'Unsqueeze',
    [g.input(io.positionIds, 'int64', ['tokens']), g.constInt64('positions.axis', [0])],
    'positions',
  );
  g.input(io.tokenRows, 'int64', ['tokens']);
  const kvOnDevice = spec.kvOnDevice === true;
  for (const b of BRANCHES) {
    g.input(io.branchTokens(b), 'int64', [`${b}_rows`, b === 'decode' ? 1 : 'chunk_len']);
    g.input(io.pastLength(b), 'int64', [1]);
    if (kvOnDevice) {
      g.input(io.branchRows(b), 'int64', [`${b}_rows`]);
      g.input(io.rowStarts(b), 'float', [`${b}_rows`, 1, 1, 1]);
    } else g.input(io.pastMask(b), 'float', [`${b}_rows`, 1, 1, `${b}_past_len`]);
  }
  if (kvOnDevice) g.input(io.kvWriteIndex, 'int64', ['tokens', c.numKeyValueHeads, 3]);
  g.input(io.causalMask, 'float', [1, 1, 'chunk_group_rows', 'chunk_len']);
  const [cos, sin] = rotaryTables(g, c);
  const ctx: Ctx = {
    g,
    ckpt,
    c,
    plan: linearPlan(spec.precision, spec.device ?? 'cpu'),
    positions,
    cos,
    sin,
    kvOnDevice,
    zero: g.constInt64('slice.zero', [0]),
    big: g.constInt64('slice.end', [2 ** 31 - 1]),
    axis2: g.constInt64('slice.axis2', [2]),
    axis3: g.constInt64('slice.axis3', [3]),
  };

  let h = tokens ? embed(ctx, tokens) : (hiddenIn as string);
  for (const layer of shape.layers) h = decoderLayer(ctx, layer, h);
  if (shape.isLast) {
    g.output(lmHead(ctx, h), 'float', ['batch', c.vocabSize]);
    // sampling.* inputs/outputs (sampling-head.ts); on webgpu the variant with every node on the device
    addSamplingHead(g, io.logits, c.vocabSize, { onDevice: shape.deviceSampling });
  } else {
    g.output(g.op('Identity', [h], io.hiddenOut), 'float', ['tokens', c.hiddenSize]);
  }
  return shape;
}

/** h = embed_tokens[input_ids], kept in fp32 whatever the precision (fp16: the table is half, the rows cast back). */
function embed(ctx: Ctx, tokens: string): string {
  const { g, c } = ctx;
  const rows = ctx.ckpt.read(tensorNames.embed, [c.vocabSize, c.hiddenSize]);
  if (ctx.plan.kind === 'fp16') {
    const table = g.weight('embed_tokens', 'float16', [c.vocabSize, c.hiddenSize], toHalf(rows));
    return g.op('Cast', [g.op('Gather', [table, tokens], 'embed_half', { axis: 0 })], 'embed', { to: FLOAT });
  }
  const table = g.weight('embed_tokens', 'float', [c.vocabSize, c.hiddenSize], rows);
  return g.op('Gather', [table, tokens], 'embed', { axis: 0 });
}

const FLOAT = 1;
const FLOAT16 = 10;

function toHalf(x: Float32Array): Uint16Array {
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = floatToHalf(x[i]);
  return out;
}

/** The element type of a device KV arena: half with fp16 weights, else float. */
export function kvElemType(precision: Precision): 'float' | 'float16' {
  return precision === 'fp16' ? 'float16' : 'float';
}

/** Bytes per element of a device KV arena (kvElemType). */
export function kvElementBytes(precision: Precision): number {
  return precision === 'fp16' ? 2 : 4;
}

function decoderLayer(ctx: Ctx, layer: number, h: string): string {
  const { g } = ctx;
  const names = tensorNames.layer(layer);
  const p = `layers.${layer}`;
  const a = rmsnorm(ctx, `${p}.input_norm`, names.inputNorm, h);
  const o = attention(ctx, layer, a);
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

/**
 * q, k, v (one fused projection over all T tokens), rotate_half RoPE on q and k with per-token positions,
 * grouped-query attention per branch over arena + new, o_proj over all T tokens.
 */
function attention(ctx: Ctx, layer: number, a: string): string {
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
  // [T, ·] → [1, T, ·]: RotaryEmbedding takes (batch, seq, hidden) with positions (batch, seq).
  const rows = g.op('Unsqueeze', [qkv, g.constInt64(`${p}.axis0`, [0])], `${p}.qkv_seq`);
  const [q, k, v] = g.node(
    'Split',
    [rows, g.constInt64(`${p}.split`, [qDim, kvDim, kvDim])],
    [`${p}.q`, `${p}.k`, `${p}.v`],
    { axis: 2 },
  );
  const flat = (x: string, dim: number, name: string) =>
    g.op('Reshape', [x, g.constInt64(`${name}.shape`, [-1, dim])], name);
  const qRot = flat(rotary(ctx, `${p}.q_rot`, q, c.numAttentionHeads), qDim, `${p}.q_flat`);
  const kRot = flat(rotary(ctx, `${p}.k_rot`, k, c.numKeyValueHeads), kvDim, io.newKey(layer));
  const vNew = flat(v, kvDim, io.newValue(layer));
  if (ctx.kvOnDevice) {
    writeCache(ctx, io.keyCache(layer), io.keyCacheOut(layer), kRot);
    writeCache(ctx, io.valueCache(layer), io.valueCacheOut(layer), vNew);
  } else {
    g.output(kRot, 'float', ['tokens', kvDim]);
    g.output(vNew, 'float', ['tokens', kvDim]);
  }
  const branchRows = BRANCHES.map((b) => attend(ctx, layer, b, qRot, kRot, vNew));
  const rowsOut = g.op('Concat', branchRows, `${p}.branch_rows`, { axis: 0 });
  const attn = g.op('Gather', [rowsOut, io.tokenRows], `${p}.out`, { axis: 0 });
  return linear(ctx, `${p}.o`, ctx.ckpt.readLinear(names.o, c.hiddenSize, qDim), c.hiddenSize, qDim, attn);
}

/**
 * One branch's rows: softmax(q·kᵀ/√d + mask)·v over the arena's first past_length positions and the row's new ones,
 * kv head j serving query heads jG..jG+G−1. Written out rather than GroupQueryAttention, which allocates and fills
 * a present buffer as long as the arena's slots (max_len) on every run: here a step costs the used context (one
 * slice of it), not the capacity. Query rows are laid out g-major, [R, kvHeads, G·S, d], so each kv head is one
 * batched matmul. Returns [R·S, H·d].
 */
function attend(ctx: Ctx, layer: number, branch: Branch, qFlat: string, kFlat: string, vFlat: string): string {
  const { g, c } = ctx;
  const p = `layers.${layer}.attn.${branch}`;
  const KV = c.numKeyValueHeads;
  const G = c.numAttentionHeads / KV;
  const d = c.headDim;
  const shape = (name: string, dims: number[]) => g.constInt64(`${p}.${name}`, dims);
  const pick = (x: string, name: string) => g.op('Gather', [x, io.branchTokens(branch)], `${p}.${name}`, { axis: 0 });
  // [R, S, H·d] → [R, KV, G·S, d]
  const q5 = g.op('Reshape', [pick(qFlat, 'q'), shape('q5_shape', [0, 0, KV, G, d])], `${p}.q5`);
  const qT = g.op('Transpose', [q5], `${p}.q5t`, { perm: [0, 2, 3, 1, 4] });
  const q4 = g.op('Reshape', [qT, shape('q4_shape', [0, 0, -1, d])], `${p}.q4`);
  // new k, v: [R, S, KV·d] → [R, KV, S, d]
  const heads = (x: string, name: string) =>
    g.op(
      'Transpose',
      [g.op('Reshape', [pick(x, name), shape(`${name}_shape`, [0, 0, KV, d])], `${p}.${name}4`)],
      `${p}.${name}t`,
      { perm: [0, 2, 1, 3] },
    );
  const kNew = heads(kFlat, 'k');
  const vNew = heads(vFlat, 'v');
  const pastLength = io.pastLength(branch);
  const arena = (name: string) =>
    g.op(
      'Slice',
      [g.input(name, 'float', [`${branch}_rows`, KV, `${branch}_max_len`, d]), ctx.zero, pastLength, ctx.axis2],
      `${name}.used`,
    );
  // On the device: the used positions of the whole arena, then the branch's rows (slots) among them.
  const resident = (cache: string) => {
    const rows = g.op(
      'Gather',
      [g.op('Slice', [cache, ctx.zero, pastLength, ctx.axis2], `${p}.${cache}.used`), io.branchRows(branch)],
      `${p}.${cache}.rows`,
      { axis: 0 },
    );
    return ctx.plan.kind === 'fp16' ? g.op('Cast', [rows], `${p}.${cache}.rows_float`, { to: FLOAT }) : rows;
  };
  const kPast = ctx.kvOnDevice ? resident(io.keyCache(layer)) : arena(io.pastKey(layer, branch));
  const vPast = ctx.kvOnDevice ? resident(io.valueCache(layer)) : arena(io.pastValue(layer, branch));
  const pastMask = ctx.kvOnDevice ? devicePastMask(ctx, branch) : io.pastMask(branch);
  const scale = 1 / Math.sqrt(d);
  const scores = (x: string, name: string) =>
    ctx.plan.fusedScores
      ? g.op('FusedMatMul', [q4, x], `${p}.${name}`, { alpha: { float: scale }, transA: 0, transB: 1 }, MS)
      : g.op(
          'Mul',
          [
            g.op('MatMul', [q4, g.op('Transpose', [x], `${p}.${name}_kt`, { perm: [0, 1, 3, 2] })], `${p}.${name}_qk`),
            g.constFloat(`${p}.${name}_scale`, [scale], []),
          ],
          `${p}.${name}`,
        );
  const sPast = g.op('Add', [scores(kPast, 'scores_past'), pastMask], `${p}.scores_past_masked`);
  // A decode row's one new key is its own position: always visible, no mask.
  const sNew =
    branch === 'decode'
      ? scores(kNew, 'scores_new')
      : g.op('Add', [scores(kNew, 'scores_new'), io.causalMask], `${p}.scores_new_masked`);
  // New positions first, then the past: a row's real scores then sit at the same places whatever the branch's
  // longest past, and the −inf past padding of shorter rows is a tail of exact zeros after the softmax, so a row's
  // result does not depend on its batch (measured: past-first moved logits by ~1e-5 on emu3-tiny).
  const probs = g.op('Softmax', [g.op('Concat', [sNew, sPast], `${p}.scores`, { axis: 3 })], `${p}.probs`, {
    axis: -1,
  });
  const newLength = g.op('Shape', [sNew], `${p}.new_length`, { start: 3, end: 4 });
  const pNew = g.op('Slice', [probs, ctx.zero, newLength, ctx.axis3], `${p}.probs_new`);
  const pPast = g.op('Slice', [probs, newLength, ctx.big, ctx.axis3], `${p}.probs_past`);
  const out = g.op(
    'Add',
    [g.op('MatMul', [pPast, vPast], `${p}.out_past`), g.op('MatMul', [pNew, vNew], `${p}.out_new`)],
    `${p}.out4`,
  );
  // [R, KV, G·S, d] → [R, KV, G, S, d] → [R, S, KV, G, d] → [R·S, H·d]
  const o5 = g.op('Reshape', [out, shape('o5_shape', [0, 0, G, -1, d])], `${p}.o5`);
  const oT = g.op('Transpose', [o5], `${p}.o5t`, { perm: [0, 3, 1, 2, 4] });
  return g.op('Reshape', [oT, shape('out_shape', [-1, c.numAttentionHeads * d])], `${p}.out`);
}

/**
 * The device arena's input and its updated copy: ScatterND writes each new token's K or V ([T, kvHeads·d] →
 * [T, kvHeads, d]) at kv.write_index. ORT gives the output a new buffer (it neither updates a graph input in place
 * nor fills a pre-allocated fetch through the node binding), so the kernel first copies the arena on the device.
 */
function writeCache(ctx: Ctx, cache: string, out: string, flatNew: string): void {
  const { g, c } = ctx;
  const type = ctx.plan.kind === 'fp16' ? 'float16' : 'float';
  g.input(cache, type, ['slots', c.numKeyValueHeads, 'max_len', c.headDim]);
  const shaped = g.op(
    'Reshape',
    [flatNew, g.constInt64(`${out}.updates_shape`, [-1, c.numKeyValueHeads, c.headDim])],
    `${out}.updates`,
  );
  const updates = type === 'float16' ? g.op('Cast', [shaped], `${out}.updates_half`, { to: FLOAT16 }) : shaped;
  g.op('ScatterND', [cache, io.kvWriteIndex, updates], out);
  g.output(out, type, ['slots', c.numKeyValueHeads, 'max_len', c.headDim]);
}

/** b.past_mask computed on the device: 0 where position j < the row's past length, −inf elsewhere; [R, 1, 1, P]. */
function devicePastMask(ctx: Ctx, branch: Branch): string {
  const { g, c } = ctx;
  const p = `${branch}.device_mask`;
  ctx.kvPositions ??= g.constFloat(
    'kv.positions',
    Array.from({ length: c.maxPositionEmbeddings }, (_, j) => j),
  );
  const used = g.op('Slice', [ctx.kvPositions, ctx.zero, io.pastLength(branch)], `${p}.positions`);
  const visible = g.op('Less', [used, io.rowStarts(branch)], `${p}.visible`);
  return g.op(
    'Where',
    [visible, g.constFloat(`${p}.zero`, [0], []), g.constFloat(`${p}.ninf`, [Number.NEGATIVE_INFINITY], [])],
    p,
  );
}

/** x·cos + rotate_half(x)·sin with positions per token (NOT interleaved). */
function rotary(ctx: Ctx, name: string, x: string, heads: number): string {
  return ctx.g.op(
    'RotaryEmbedding',
    [x, ctx.positions, ctx.cos, ctx.sin],
    name,
    { interleaved: 0, num_heads: heads },
    MS,
  );
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

/** Final norm and lm_head on the last token of each item only. */
function lmHead(ctx: Ctx, h: string): string {
  const { g, c } = ctx;
  const last = g.op('Gather', [h, g.input(io.lastTokens, 'int64', ['batch'])], 'head.last', { axis: 0 });
  const normed = rmsnorm(ctx, 'norm', tensorNames.norm, last);
  const weight = ctx.ckpt.readLinear(tensorNames.lmHead, c.vocabSize, c.hiddenSize);
  const logits = linear(ctx, 'lm_head', weight, c.vocabSize, c.hiddenSize, normed);
  return g.op('Identity', [logits], io.logits);
}

/**
 * y = x · Wᵀ for a torch-layout [out, in] weight: Gemm(transB) in fp32; in fp16 the same on x cast to half, the
 * product cast back (so norms, rotary and softmax stay fp32); MatMulNBits in int4.
 */
function linear(ctx: Ctx, name: string, weight: Float32Array, out: number, inp: number, x: string): string {
  const { g, plan } = ctx;
  if (plan.kind === 'fp32') {
    const w = g.weight(`${name}.weight`, 'float', [out, inp], weight);
    return g.op('Gemm', [x, w], name, { transB: 1 });
  }
  if (plan.kind === 'fp16') {
    const w = g.weight(`${name}.weight`, 'float16', [out, inp], toHalf(weight));
    const xHalf = g.op('Cast', [x], `${name}.in_half`, { to: FLOAT16 });
    return g.op('Cast', [g.op('Gemm', [xHalf, w], `${name}.half`, { transB: 1 })], name, { to: FLOAT });
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
