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
//   int8_path bool []  (int4 on cpu, StageShape.int8Prefill): run the layers' int8 branch instead of the int4 one
//
// An int4 stage on the CPU carries its layers twice, as the two branches of one If: MatMulNBits (int4 weights,
// what decode steps read: half the bytes) and the int8 path (the same int4 weights re-quantised per channel to int8,
// multiplied as integers by DynamicQuantizeMatMul: 2–3× faster for prefill's many rows). The runtime picks the int8
// branch for runs of INT8_PATH_MIN_TOKENS tokens or more.
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
import { fromFloat32 } from '../model/dtype.js';
import { concatFloat32 } from '../util/float32.js';
import type { GraphBuilder, NodeDef, ValueInfo } from './graph.js';
import { dequantizeInt4, type Int4Scheme, type Int4Weight, quantizeInt4 } from './int4.js';
import { type Int8Columns, quantizeInt8Columns } from './int8.js';
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
  /**
   * fp32 Gemm; fp16 Gemm on half weights (webgpu); int4 MatMulNBits; int8: the int4 weights re-quantised per output
   * channel to int8 and multiplied by activations quantised to uint8 per row (com.microsoft DynamicQuantizeMatMul,
   * whose u8·s8 GEMM MLAS runs on AVX-512 VNNI, or AMX where the CPU has it: 2–3× MatMulNBits at 128–2048 rows here).
   */
  kind: 'fp32' | 'int4' | 'int8' | 'fp16';
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

/**
 * Whether an int4 stage also carries the int8 prefill path: on the CPU (its only user is MLAS's integer GEMM), unless
 * the spec turns it off. It costs one byte per layer weight beside the int4 copy (not for lm_head, which always sees
 * one row per item).
 */
export function hasInt8Prefill(spec: StageSpec): boolean {
  return spec.precision === 'int4' && (spec.device ?? 'cpu') === 'cpu' && spec.int8Prefill !== false;
}

/**
 * The runtime takes the int8 path for a run of at least this many tokens. Below it the int4 kernel wins: it reads
 * half the bytes, and a decode step is bound by reading the weights (bench/prefill-profile.ts, BENCHMARKS.md).
 */
export const INT8_PATH_MIN_TOKENS = 16;

export interface StageSpec {
  first: number;
  /** Exclusive. */
  end: number;
  precision: Precision;
  /** Default cpu. The graph differs per device only where a device lacks a kernel. */
  device?: Device;
  /** int4 on cpu: carry the int8 prefill path (default true; see hasInt8Prefill). */
  int8Prefill?: boolean;
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
  /** The graph has the int8 prefill path and its `int8_path` input (hasInt8Prefill). */
  int8Prefill: boolean;
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
    int8Prefill: hasInt8Prefill(spec),
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
  int8Path: 'int8_path',
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
  /** Prefix of every node name of the layers ('' or the If branch's, e.g. 'int8.'). */
  prefix: string;
  /** Weights shared by both If branches, by initializer base name (norms), and each linear's int4 weight. */
  shared: Map<string, string>;
  int4: Map<string, Int4Weight>;
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
  /** The chunk branch's whole mask [R, 1, G·S, S + P]: causal over the new positions, then the past mask. */
  chunkMask: string;
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
    prefix: '',
    shared: new Map(),
    int4: new Map(),
    positions,
    cos,
    sin,
    kvOnDevice,
    zero: g.constInt64('slice.zero', [0]),
    big: g.constInt64('slice.end', [2 ** 31 - 1]),
    axis2: g.constInt64('slice.axis2', [2]),
    axis3: g.constInt64('slice.axis3', [3]),
    chunkMask: '',
  };
  ctx.chunkMask = joinChunkMask(g, kvOnDevice ? devicePastMask(ctx, 'chunk') : io.pastMask('chunk'));

  const input = tokens ? embed(ctx, tokens) : (hiddenIn as string);
  const h = shape.int8Prefill ? layersWithInt8Path(ctx, shape, input) : layerStack(ctx, shape, input);
  if (shape.isLast) {
    g.output(lmHead(ctx, h), 'float', ['batch', c.vocabSize]);
    // sampling.* inputs/outputs (sampling-head.ts); on webgpu the variant with every node on the device
    addSamplingHead(g, io.logits, c.vocabSize, { onDevice: shape.deviceSampling });
  } else {
    g.output(g.op('Identity', [h], io.hiddenOut), 'float', ['tokens', c.hiddenSize]);
  }
  return shape;
}

/** Concat(causal mask broadcast to every row, past mask broadcast to every query): built once, read by every layer. */
function joinChunkMask(g: GraphBuilder, past: string): string {
  const one = g.constInt64('chunk.mask.one', [1]);
  const rows = g.op('Shape', [past], 'chunk.mask.rows', { start: 0, end: 1 });
  const queries = g.op('Shape', [io.causalMask], 'chunk.mask.queries', { start: 2, end: 3 });
  const causal = g.op(
    'Expand',
    [io.causalMask, g.op('Concat', [rows, one, one, one], 'chunk.mask.causal_shape', { axis: 0 })],
    'chunk.mask.causal',
  );
  const pastAll = g.op(
    'Expand',
    [past, g.op('Concat', [one, one, queries, one], 'chunk.mask.past_shape', { axis: 0 })],
    'chunk.mask.past',
  );
  return g.op('Concat', [causal, pastAll], 'chunk.mask', { axis: 3 });
}

/** The layers one after another; declares each layer's new K/V as graph outputs. Returns the last hidden state. */
function layerStack(ctx: Ctx, shape: StageShape, input: string): string {
  let h = input;
  for (const layer of shape.layers) {
    const kv = { key: io.newKey(layer), value: io.newValue(layer) };
    h = decoderLayer(ctx, layer, h, kv);
    if (ctx.kvOnDevice) continue; // the arena outputs carry the new K/V (writeCache)
    ctx.g.output(kv.key, 'float', ['tokens', ctx.c.numKeyValueHeads * ctx.c.headDim]);
    ctx.g.output(kv.value, 'float', ['tokens', ctx.c.numKeyValueHeads * ctx.c.headDim]);
  }
  return h;
}

/**
 * The layers twice, as the two branches of one If on the `int8_path` input: int8 linear layers (then) and int4
 * (else), everything else the same. The branches are built layer by layer side by side, so each weight is read and
 * quantised once. Returns the If's hidden-state output.
 */
function layersWithInt8Path(ctx: Ctx, shape: StageShape, input: string): string {
  const { g, c } = ctx;
  const kvDim = c.numKeyValueHeads * c.headDim;
  const int4Plan = ctx.plan;
  const int8Plan: LinearPlan = { ...ctx.plan, kind: 'int8' };
  const branches = [
    { prefix: 'int8.', plan: int8Plan, nodes: [] as NodeDef[], outputs: [] as ValueInfo[], h: input },
    { prefix: 'int4.', plan: int4Plan, nodes: [] as NodeDef[], outputs: [] as ValueInfo[], h: input },
  ];
  for (const layer of shape.layers) {
    // int4 first: it quantises each linear's weight, which the int8 branch then re-quantises.
    for (const b of [branches[1], branches[0]]) {
      const kv = { key: `${b.prefix}${io.newKey(layer)}`, value: `${b.prefix}${io.newValue(layer)}` };
      b.h = g.withNodes(b.nodes, () => decoderLayer({ ...ctx, prefix: b.prefix, plan: b.plan }, layer, b.h, kv));
      b.outputs.push(
        { name: kv.key, type: 'float', dims: ['tokens', kvDim] },
        { name: kv.value, type: 'float', dims: ['tokens', kvDim] },
      );
    }
    ctx.int4.clear();
  }
  const graphs = branches.map((b) => {
    const last = g.withNodes(b.nodes, () => g.op('Identity', [b.h], `${b.prefix}hidden`));
    return {
      name: `${b.prefix}layers`,
      nodes: b.nodes,
      outputs: [{ name: last, type: 'float' as const, dims: ['tokens', c.hiddenSize] }, ...b.outputs],
    };
  });
  g.input(io.int8Path, 'bool', []);
  const kvNames = shape.layers.flatMap((layer) => [io.newKey(layer), io.newValue(layer)]);
  const [h] = g.node('If', [io.int8Path], ['layers.hidden', ...kvNames], {
    then_branch: { graph: graphs[0] },
    else_branch: { graph: graphs[1] },
  });
  for (const name of kvNames) g.output(name, 'float', ['tokens', kvDim]);
  return h;
}

/** h = embed_tokens[input_ids], kept in fp32 whatever the precision (fp16: the table is half, the rows cast back). */
function embed(ctx: Ctx, tokens: string): string {
  const { g, c } = ctx;
  const rows = ctx.ckpt.read(tensorNames.embed, [c.vocabSize, c.hiddenSize]);
  if (ctx.plan.kind === 'fp16') {
    const table = g.weight('embed_tokens', 'float16', [c.vocabSize, c.hiddenSize], fromFloat32('F16', rows));
    return g.op('Cast', [g.op('Gather', [table, tokens], 'embed_half', { axis: 0 })], 'embed', { to: FLOAT });
  }
  const table = g.weight('embed_tokens', 'float', [c.vocabSize, c.hiddenSize], rows);
  return g.op('Gather', [table, tokens], 'embed', { axis: 0 });
}

const FLOAT = 1;
const FLOAT16 = 10;

/** The element type of a device KV arena: half with fp16 weights, else float. */
export function kvElemType(precision: Precision): 'float' | 'float16' {
  return precision === 'fp16' ? 'float16' : 'float';
}

/** Bytes per element of a device KV arena (kvElemType). */
export function kvElementBytes(precision: Precision): number {
  return precision === 'fp16' ? 2 : 4;
}

/** Names for the layer's new K and V (post-rotary), which the caller makes graph or branch outputs. */
interface KvNames {
  key: string;
  value: string;
}

function decoderLayer(ctx: Ctx, layer: number, h: string, kv: KvNames): string {
  const { g } = ctx;
  const names = tensorNames.layer(layer);
  const p = `${ctx.prefix}layers.${layer}`;
  const a = rmsnorm(ctx, `${p}.input_norm`, names.inputNorm, h, `layers.${layer}.input_norm.weight`);
  const o = attention(ctx, layer, a, kv);
  // h1 = h + o and m = RMSNorm_post(h1) in one fused op (output 3 is the sum).
  const weight = normWeight(ctx, names.postNorm, `layers.${layer}.post_norm.weight`);
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
function rmsnorm(ctx: Ctx, name: string, tensor: string, x: string, weightName = `${name}.weight`): string {
  const weight = normWeight(ctx, tensor, weightName);
  return ctx.g.op('SimplifiedLayerNormalization', [x, weight], name, {
    axis: -1,
    epsilon: { float: ctx.c.rmsNormEps },
    stash_type: 1,
  });
}

/** A norm's weight, one initializer however many branches use it. */
function normWeight(ctx: Ctx, tensor: string, name: string): string {
  let w = ctx.shared.get(name);
  if (!w) {
    w = ctx.g.weight(name, 'float', [ctx.c.hiddenSize], ctx.ckpt.read(tensor, [ctx.c.hiddenSize]));
    ctx.shared.set(name, w);
  }
  return w;
}

/**
 * q, k, v (one fused projection over all T tokens), rotate_half RoPE on q and k with per-token positions,
 * grouped-query attention per branch over arena + new, o_proj over all T tokens.
 */
function attention(ctx: Ctx, layer: number, a: string, kv: KvNames): string {
  const { g, c } = ctx;
  const names = tensorNames.layer(layer);
  const p = `${ctx.prefix}layers.${layer}.attn`;
  const qDim = c.numAttentionHeads * c.headDim;
  const kvDim = c.numKeyValueHeads * c.headDim;
  const qkvWeight = () =>
    concatFloat32([
      ctx.ckpt.readLinear(names.q, qDim, c.hiddenSize),
      ctx.ckpt.readLinear(names.k, kvDim, c.hiddenSize),
      ctx.ckpt.readLinear(names.v, kvDim, c.hiddenSize),
    ]);
  const qkv = linear(ctx, `layers.${layer}.attn.qkv`, qkvWeight, qDim + 2 * kvDim, c.hiddenSize, a);
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
  const kRot = flat(rotary(ctx, `${p}.k_rot`, k, c.numKeyValueHeads), kvDim, kv.key);
  const vNew = flat(v, kvDim, kv.value);
  if (ctx.kvOnDevice) {
    writeCache(ctx, io.keyCache(layer), io.keyCacheOut(layer), kRot);
    writeCache(ctx, io.valueCache(layer), io.valueCacheOut(layer), vNew);
  }
  const branchRows = BRANCHES.map((b) => attend(ctx, layer, b, qRot, kRot, vNew));
  const rowsOut = g.op('Concat', branchRows, `${p}.branch_rows`, { axis: 0 });
  const attn = g.op('Gather', [rowsOut, io.tokenRows], `${p}.out`, { axis: 0 });
  const oWeight = () => ctx.ckpt.readLinear(names.o, c.hiddenSize, qDim);
  return linear(ctx, `layers.${layer}.attn.o`, oWeight, c.hiddenSize, qDim, attn);
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
  const p = `${ctx.prefix}layers.${layer}.attn.${branch}`;
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
  const arena = (name: string) => {
    // Declared once, whichever If branch asks first.
    if (!ctx.shared.has(name))
      ctx.shared.set(name, g.input(name, 'float', [`${branch}_rows`, KV, `${branch}_max_len`, d]));
    return g.op('Slice', [name, ctx.zero, pastLength, ctx.axis2], `${ctx.prefix}${name}.used`);
  };
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
  // New positions first, then the past: a row's real scores then sit at the same places whatever the branch's
  // longest past, and the −inf past padding of shorter rows is a tail of exact zeros after the softmax, so a row's
  // result does not depend on its batch (measured: past-first moved logits by ~1e-5 on emu3-tiny).
  let out: string;
  if (branch === 'chunk') {
    // Keys and values joined (small: d per position) so that scores, mask, softmax and ·V each make one pass over the
    // [G·S, S + P] score matrix, which at prefill is the big tensor (past 1536: 64 MiB per layer).
    const kAll = g.op('Concat', [kNew, kPast], `${p}.k_all`, { axis: 2 });
    const vAll = g.op('Concat', [vNew, vPast], `${p}.v_all`, { axis: 2 });
    const masked = g.op('Add', [scores(kAll, 'scores'), ctx.chunkMask], `${p}.scores_masked`);
    const probs = g.op('Softmax', [masked], `${p}.probs`, { axis: -1 });
    out = g.op('MatMul', [probs, vAll], `${p}.out4`);
  } else {
    const pastMask = ctx.kvOnDevice ? devicePastMask(ctx, branch) : io.pastMask(branch);
    const sPast = g.op('Add', [scores(kPast, 'scores_past'), pastMask], `${p}.scores_past_masked`);
    // A decode row's one new key is its own position: always visible, no mask.
    const sNew = scores(kNew, 'scores_new');
    const probs = g.op('Softmax', [g.op('Concat', [sNew, sPast], `${p}.scores`, { axis: 3 })], `${p}.probs`, {
      axis: -1,
    });
    const newLength = g.op('Shape', [sNew], `${p}.new_length`, { start: 3, end: 4 });
    const pNew = g.op('Slice', [probs, ctx.zero, newLength, ctx.axis3], `${p}.probs_new`);
    const pPast = g.op('Slice', [probs, newLength, ctx.big, ctx.axis3], `${p}.probs_past`);
    out = g.op(
      'Add',
      [g.op('MatMul', [pPast, vPast], `${p}.out_past`), g.op('MatMul', [pNew, vNew], `${p}.out_new`)],
      `${p}.out4`,
    );
  }
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
  const p = `${ctx.prefix}layers.${layer}.mlp`;
  const I = c.intermediateSize;
  const D = c.hiddenSize;
  const [gate, up] = linearPair(
    ctx,
    [`layers.${layer}.mlp.gate`, `layers.${layer}.mlp.up`],
    [() => ctx.ckpt.readLinear(names.gate, I, D), () => ctx.ckpt.readLinear(names.up, I, D)],
    I,
    D,
    m,
  );
  const silu = g.op('Mul', [gate, g.op('Sigmoid', [gate], `${p}.gate_sigmoid`)], `${p}.silu`);
  const hidden = g.op('Mul', [silu, up], `${p}.act`);
  return linear(ctx, `layers.${layer}.mlp.down`, () => ctx.ckpt.readLinear(names.down, D, I), D, I, hidden);
}

/** Final norm and lm_head on the last token of each item only. */
function lmHead(ctx: Ctx, h: string): string {
  const { g, c } = ctx;
  const last = g.op('Gather', [h, g.input(io.lastTokens, 'int64', ['batch'])], 'head.last', { axis: 0 });
  const normed = rmsnorm(ctx, 'norm', tensorNames.norm, last);
  const weight = () => ctx.ckpt.readLinear(tensorNames.lmHead, c.vocabSize, c.hiddenSize);
  const logits = linear(ctx, 'lm_head', weight, c.vocabSize, c.hiddenSize, normed);
  return g.op('Identity', [logits], io.logits);
}

/**
 * y = x · Wᵀ for a torch-layout [out, in] weight: Gemm(transB) in fp32; in fp16 the same on x cast to half, the
 * product cast back (so norms, rotary and softmax stay fp32); MatMulNBits in int4; the int8 path's
 * DynamicQuantizeMatMul (linearInt8). `name` names the weights (the same in both If branches: the int8 branch
 * re-quantises the int4 branch's weight of that name); node names get the branch prefix.
 */
function linear(ctx: Ctx, name: string, weight: () => Float32Array, out: number, inp: number, x: string): string {
  const { g, plan } = ctx;
  const node = `${ctx.prefix}${name}`;
  if (plan.kind === 'fp32') {
    const w = g.weight(`${name}.weight`, 'float', [out, inp], weight());
    return g.op('Gemm', [x, w], node, { transB: 1 });
  }
  if (plan.kind === 'fp16') {
    const w = g.weight(`${name}.weight`, 'float16', [out, inp], fromFloat32('F16', weight()));
    const xHalf = g.op('Cast', [x], `${node}.in_half`, { to: FLOAT16 });
    return g.op('Cast', [g.op('Gemm', [xHalf, w], `${node}.half`, { transB: 1 })], node, { to: FLOAT });
  }
  if (plan.kind === 'int8') return linearInt8(g, node, quantizeInt8Columns(int4Values(ctx, name), out, inp), x);
  const q = quantizeInt4(weight(), out, inp, plan.scheme);
  if (ctx.prefix) ctx.int4.set(name, q);
  const inputs = [
    x,
    g.weight(`${name}.qweight`, 'uint8', [out, q.blocks, 16], q.packed),
    g.weight(`${name}.scales`, 'float', [out * q.blocks], q.scales),
  ];
  if (q.zeroPoints) inputs.push(g.weight(`${name}.zero_points`, 'uint8', [q.zeroPoints.length], q.zeroPoints));
  return g.op(
    'MatMulNBits',
    inputs,
    node,
    { K: inp, N: out, bits: 4, block_size: 32, accuracy_level: plan.accuracyLevel },
    MS,
  );
}

/** The values of the int4 branch's weight `name` (built first), which the int8 branch re-quantises. */
function int4Values(ctx: Ctx, name: string): Float32Array {
  const q = ctx.int4.get(name);
  if (!q) throw new Error(`stage graph: the int8 branch needs ${name}'s int4 weight first`);
  return dequantizeInt4(q);
}

/**
 * Two linears of the same input (gate and up). The int8 path multiplies them as one [in, 2·out] weight (one
 * quantisation of the activations, one GEMM with a wider N, which MLAS runs faster); the others run them apart.
 */
function linearPair(
  ctx: Ctx,
  names: [string, string],
  weights: [() => Float32Array, () => Float32Array],
  out: number,
  inp: number,
  x: string,
): [string, string] {
  if (ctx.plan.kind !== 'int8')
    return [linear(ctx, names[0], weights[0], out, inp, x), linear(ctx, names[1], weights[1], out, inp, x)];
  const halves = names.map((name) => int4Values(ctx, name));
  const node = `${ctx.prefix}${names[0]}_${names[1].split('.').pop()}`;
  const both = linearInt8(ctx.g, node, quantizeInt8Columns(concatFloat32(halves), 2 * out, inp), x);
  const [a, b] = ctx.g.node(
    'Split',
    [both, ctx.g.constInt64(`${node}.split`, [out, out])],
    [`${node}.0`, `${node}.1`],
    {
      axis: 1,
    },
  );
  return [a, b];
}

/**
 * x · Wᵀ with W in int8 per output channel and x quantised per row: each row is divided by its largest magnitude,
 * so DynamicQuantizeMatMul's one uint8 range for the whole tensor ([-1, 1]) is every row's own range (a step of
 * 1/127.5 of that row's largest value), and the product is scaled back per row.
 */
export function linearInt8(g: GraphBuilder, node: string, w: Int8Columns, x: string): string {
  const amax = g.op(
    'Max',
    [
      g.op('ReduceMax', [g.op('Abs', [x], `${node}.abs`), g.constInt64(`${node}.axis`, [1])], `${node}.row_max`, {
        keepdims: 1,
      }),
      g.constFloat(`${node}.tiny`, [1e-30], []),
    ],
    `${node}.row_scale`,
  );
  const unit = g.op('Div', [x, amax], `${node}.rows_unit`);
  const y = g.op(
    'DynamicQuantizeMatMul',
    [
      unit,
      g.weight(`${node}.int8_weight`, 'int8', [w.k, w.n], w.values),
      g.weight(`${node}.int8_scales`, 'float', [w.n], w.scales),
    ],
    `${node}.int8`,
    {},
    MS,
  );
  return g.op('Mul', [y, amax], node);
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
