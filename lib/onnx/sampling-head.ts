// The last stage's whole-vocabulary logit work, in the graph after lm_head (docs/architecture.md, "Sampling split"), so the full logits never
// leave ORT. Per row, in transformers' order:
//
//   guided    = cfg_on ? s·(lsm(logits) − lsm(logits[partner])) + lsm(logits[partner]) : logits
//                                                                          classifier-free guidance (Emu3-Gen)
//   masked    = Where(mask_begin ≤ id < mask_end or not keep_begin ≤ id < keep_end, -inf, guided)
//                                                                          task mask (begin = end: none) and the
//                                                                          image-layout constraint (keep [0, vocab): none)
//   penalised = ScatterElements(masked, ids, g < 0 ? g·p : g/p)            g = GatherElements(masked, ids); HF penalty
//   scaled    = penalised / temperature                                    1 for greedy
//   lse       = ReduceLogSumExp(scaled)                                    over the whole vocabulary, in float64
//   top_logprobs, top_ids = TopK(scaled, K) − lse                          most likely first, ties by lower id
//   logprobs  = scaled − lse                                               the full row: fetch only when asked
//
// ORT computes only what the fetched outputs need, so a step that wants only candidates never builds the full row.
// Penalty ids are a padded [B, P] list: padding repeats the row's first id (or id 0 with penalty 1), and since every
// write of one id carries the same value, the duplicates of ScatterElements are harmless.
//
// Guidance pairs two rows of one run: the conditional row names the unconditional row (`cfg_partner`, a row index of
// the same run) and takes upstream's UnbatchedClassifierFreeGuidanceLogitsProcessor score, with lsm the log-softmax
// over the whole vocabulary (its log-sum-exp in float64, as below). The unconditional row itself is left as it is
// (its partner is itself, cfg_on 0): only the conditional row's candidates are drawn from.
//
// On a device (`onDevice`, for webgpu, which has no float64 and no int64 comparisons) every node runs there: the
// log-sum-exps are max + log Σ exp(x − max) in float32 (a parallel reduction: measured within 1e-5 of float64 on the
// real vocabulary, sampling-head.test.ts), the id ranges are int32 (ids < 2³¹) and cfg_on is a bool; the feeds are
// converted by deviceSamplingFeeds.
import type { Dim, GraphBuilder } from './graph.js';

/** ONNX TensorProto element types for Cast. */
const FLOAT = 1;
const DOUBLE = 11;
const BOOL = 9;

export const samplingIo = {
  maskBegin: 'sampling.mask_begin',
  maskEnd: 'sampling.mask_end',
  penaltyIds: 'sampling.penalty_ids',
  penalty: 'sampling.penalty',
  temperature: 'sampling.temperature',
  keepBegin: 'sampling.keep_begin',
  keepEnd: 'sampling.keep_end',
  cfgOn: 'sampling.cfg_on',
  cfgPartner: 'sampling.cfg_partner',
  cfgScale: 'sampling.cfg_scale',
  topK: 'sampling.top_k',
  topLogprobs: 'sampling.top_logprobs',
  topIds: 'sampling.top_ids',
  logprobs: 'sampling.logprobs',
};

/** What the head does to one row (mirrors emu3.internal.v1.SamplingSide after the shard has validated it). */
export interface SamplingRow {
  /** Ids [begin, end) get -inf; begin = end for none. */
  maskBegin: number;
  maskEnd: number;
  /** HF repetition penalty; 1 = off. */
  repetitionPenalty: number;
  /** Ids the penalty applies to, each in [0, vocab). */
  penalisedIds: ArrayLike<number>;
  /** Divides the logits; 1 = unscaled (greedy). */
  temperature: number;
  /** Candidates wanted for this row (the run returns the largest K of its rows for all of them). */
  topK: number;
  /** This row also wants the whole row of logprobs. */
  fullRow: boolean;
  /** Only ids [keepBegin, keepEnd) may be drawn (the image-layout constraint). Default [0, vocab): all. */
  keepBegin?: number;
  keepEnd?: number;
  /** Classifier-free guidance: the unconditional row's index in this run and the scale. Default none. */
  cfg?: { partnerRow: number; scale: number } | null;
}

/** A row that leaves the logits as they are. */
export const NEUTRAL_ROW: SamplingRow = {
  maskBegin: 0,
  maskEnd: 0,
  repetitionPenalty: 1,
  penalisedIds: [],
  temperature: 1,
  topK: 1,
  fullRow: false,
};

/** The feeds whose type differs on the device (see the header). */
const DEVICE_RANGES = [samplingIo.maskBegin, samplingIo.maskEnd, samplingIo.keepBegin, samplingIo.keepEnd];

/** Adds the head after `logits` ([batch, vocab]); declares its inputs and outputs. */
export function addSamplingHead(
  g: GraphBuilder,
  logits: string,
  vocab: number,
  opts: { onDevice?: boolean } = {},
): void {
  const onDevice = opts.onDevice === true;
  const rows: Dim[] = ['batch', 1];
  const rangeType = onDevice ? 'int32' : 'int64';
  const maskBegin = g.input(samplingIo.maskBegin, rangeType, rows);
  const maskEnd = g.input(samplingIo.maskEnd, rangeType, rows);
  const penaltyIds = g.input(samplingIo.penaltyIds, 'int64', ['batch', 'penalised']);
  const penalty = g.input(samplingIo.penalty, 'float', rows);
  const temperature = g.input(samplingIo.temperature, 'float', rows);
  const k = g.input(samplingIo.topK, 'int64', [1]);
  const keepBegin = g.input(samplingIo.keepBegin, rangeType, rows);
  const keepEnd = g.input(samplingIo.keepEnd, rangeType, rows);
  const cfgOn = g.input(samplingIo.cfgOn, onDevice ? 'bool' : 'int64', rows);
  const cfgPartner = g.input(samplingIo.cfgPartner, 'int64', ['batch']);
  const cfgScale = g.input(samplingIo.cfgScale, 'float', rows);

  const p = 'sampling';
  const lastAxis = g.constInt64(`${p}.last_axis`, [-1]);
  // log Σ exp(x) over the last axis, keepdims: float64 on the CPU, max-shifted float32 on a device.
  const logSumExp = (x: string, name: string) => {
    if (onDevice) {
      const max = g.op('ReduceMax', [x, lastAxis], `${name}.max`, { keepdims: 1 });
      const sum = g.op(
        'ReduceSum',
        [g.op('Exp', [g.op('Sub', [x, max], `${name}.shifted`)], `${name}.exp`), lastAxis],
        `${name}.sum`,
        { keepdims: 1 },
      );
      return g.op('Add', [max, g.op('Log', [sum], `${name}.log_sum`)], `${name}.lse`);
    }
    const lse64 = g.op(
      'ReduceLogSumExp',
      [g.op('Cast', [x], `${name}.f64`, { to: DOUBLE }), lastAxis],
      `${name}.lse_f64`,
      { keepdims: 1 },
    );
    return g.op('Cast', [lse64], `${name}.lse`, { to: FLOAT });
  };
  const logSoftmax = (x: string, name: string) => {
    if (onDevice) return g.op('Sub', [x, logSumExp(x, name)], `${name}.lsm`);
    const lse64 = g.op(
      'ReduceLogSumExp',
      [g.op('Cast', [x], `${name}.f64`, { to: DOUBLE }), lastAxis],
      `${name}.lse_f64`,
      { keepdims: 1 },
    );
    return g.op('Sub', [x, g.op('Cast', [lse64], `${name}.lse`, { to: FLOAT })], `${name}.lsm`);
  };
  const lsm = logSoftmax(logits, `${p}.cfg`);
  const partnerLsm = g.op('Gather', [lsm, cfgPartner], `${p}.cfg_partner_lsm`, { axis: 0 });
  const guidedScores = g.op(
    'Add',
    [g.op('Mul', [cfgScale, g.op('Sub', [lsm, partnerLsm], `${p}.cfg_diff`)], `${p}.cfg_scaled`), partnerLsm],
    `${p}.cfg_scores`,
  );
  const guided = g.op(
    'Where',
    [onDevice ? cfgOn : g.op('Cast', [cfgOn], `${p}.cfg_on_bool`, { to: BOOL }), guidedScores, logits],
    `${p}.guided`,
  );
  const ids = onDevice
    ? g.constInt32(
        `${p}.id_row`,
        Array.from({ length: vocab }, (_, i) => i),
        [1, vocab],
      )
    : g.op(
        'Unsqueeze',
        [
          g.op(
            'Range',
            [
              g.constInt64(`${p}.zero`, [0], []),
              g.constInt64(`${p}.vocab`, [vocab], []),
              g.constInt64(`${p}.one`, [1], []),
            ],
            `${p}.ids`,
          ),
          g.constInt64(`${p}.axis0`, [0]),
        ],
        `${p}.id_row`,
      );
  const inMask = g.op(
    'And',
    [g.op('GreaterOrEqual', [ids, maskBegin], `${p}.ge_begin`), g.op('Less', [ids, maskEnd], `${p}.lt_end`)],
    `${p}.in_mask`,
  );
  const kept = g.op(
    'And',
    [g.op('GreaterOrEqual', [ids, keepBegin], `${p}.ge_keep`), g.op('Less', [ids, keepEnd], `${p}.lt_keep`)],
    `${p}.in_keep`,
  );
  const minusInf = g.constFloat(`${p}.minus_inf`, [Number.NEGATIVE_INFINITY], []);
  // The WebGPU provider has no Or: kept and not masked, with And and Not.
  const masked = onDevice
    ? g.op(
        'Where',
        [g.op('And', [g.op('Not', [inMask], `${p}.outside_mask`), kept], `${p}.allowed`), guided, minusInf],
        `${p}.masked`,
      )
    : g.op(
        'Where',
        [g.op('Or', [inMask, g.op('Not', [kept], `${p}.out_of_keep`)], `${p}.removed`), minusInf, guided],
        `${p}.masked`,
      );

  const picked = g.op('GatherElements', [masked, penaltyIds], `${p}.picked`, { axis: 1 });
  const isNegative = g.op('Less', [picked, g.constFloat(`${p}.zero_f`, [0], [])], `${p}.picked_negative`);
  const penalisedValues = g.op(
    'Where',
    [
      isNegative,
      g.op('Mul', [picked, penalty], `${p}.picked_times_penalty`),
      g.op('Div', [picked, penalty], `${p}.picked_over_penalty`),
    ],
    `${p}.picked_penalised`,
  );
  const penalised = g.op('ScatterElements', [masked, penaltyIds, penalisedValues], `${p}.penalised`, { axis: 1 });
  const scaled = g.op('Div', [penalised, temperature], `${p}.scaled`);

  // Summed in float64 on the CPU: a float32 sum over 184,622 terms is off by ~1e-4 in the log (measured, a serial
  // sum); the cast costs little.
  const lse = logSumExp(scaled, `${p}.scaled`);
  const [values, indices] = g.node('TopK', [scaled, k], [`${p}.top_values`, samplingIo.topIds], {
    axis: -1,
    largest: 1,
    sorted: 1,
  });
  // WebGPU's TopK returns −FLT_MAX for −inf entries (measured): those are −inf again, as on the CPU.
  const top = onDevice
    ? g.op(
        'Where',
        [
          g.op('Less', [values, g.constFloat(`${p}.below_finite`, [-3e38], [])], `${p}.top_removed`),
          minusInf,
          g.op('Sub', [values, lse], `${p}.top_shifted`),
        ],
        samplingIo.topLogprobs,
      )
    : g.op('Sub', [values, lse], samplingIo.topLogprobs);
  g.output(top, 'float', ['batch', 'k']);
  g.output(indices, 'int64', ['batch', 'k']);
  g.output(g.op('Sub', [scaled, lse], samplingIo.logprobs), 'float', ['batch', vocab]);
}

export interface FeedTensor {
  type: 'int64' | 'float32' | 'int32' | 'bool';
  data: BigInt64Array | Float32Array | Int32Array | Uint8Array;
  dims: number[];
}

/** samplingFeeds as the onDevice head takes them: int32 id ranges, a bool cfg_on. */
export function deviceSamplingFeeds(feeds: Record<string, FeedTensor>): Record<string, FeedTensor> {
  const out = { ...feeds };
  for (const name of DEVICE_RANGES)
    out[name] = { ...feeds[name], type: 'int32', data: Int32Array.from(feeds[name].data as BigInt64Array, Number) };
  const on = feeds[samplingIo.cfgOn];
  out[samplingIo.cfgOn] = { ...on, type: 'bool', data: Uint8Array.from(on.data as BigInt64Array, (v) => (v ? 1 : 0)) };
  return out;
}

/** The K one run uses: the largest top_k of its rows, at most the vocabulary. */
export function runTopK(rows: readonly SamplingRow[], vocab: number): number {
  return Math.min(vocab, Math.max(1, ...rows.map((r) => r.topK)));
}

/**
 * The head's input tensors for `rows` (the run's rows in order), with `k` candidates per row (default: the rows' largest
 * topK). Throws naming the row and field on a bad value.
 */
export function samplingFeeds(
  rows: readonly SamplingRow[],
  vocab: number,
  k = runTopK(rows, vocab),
): Record<string, FeedTensor> {
  const B = rows.length;
  const P = Math.max(1, ...rows.map((r) => r.penalisedIds.length));
  const maskBegin = new BigInt64Array(B);
  const maskEnd = new BigInt64Array(B);
  const penaltyIds = new BigInt64Array(B * P);
  const penalty = new Float32Array(B);
  const temperature = new Float32Array(B);
  const keepBegin = new BigInt64Array(B);
  const keepEnd = new BigInt64Array(B);
  const cfgOn = new BigInt64Array(B);
  const cfgPartner = new BigInt64Array(B);
  const cfgScale = new Float32Array(B);
  rows.forEach((r, b) => {
    const where = `sampling row ${b}`;
    if (!(r.temperature > 0) || !Number.isFinite(r.temperature))
      throw new Error(`${where}: temperature ${r.temperature} must be finite and > 0 (1 for greedy)`);
    if (!(r.repetitionPenalty > 0) || !Number.isFinite(r.repetitionPenalty))
      throw new Error(`${where}: repetitionPenalty ${r.repetitionPenalty} must be finite and > 0 (1 for off)`);
    const kb = r.keepBegin ?? 0;
    const ke = r.keepEnd ?? vocab;
    if (!Number.isInteger(kb) || !Number.isInteger(ke) || kb < 0 || ke > vocab || kb >= ke)
      throw new Error(`${where}: keep range [${kb}, ${ke}) must be a non-empty part of [0, ${vocab})`);
    keepBegin[b] = BigInt(kb);
    keepEnd[b] = BigInt(ke);
    cfgPartner[b] = BigInt(b);
    if (r.cfg) {
      const { partnerRow, scale } = r.cfg;
      if (!Number.isInteger(partnerRow) || partnerRow < 0 || partnerRow >= B || partnerRow === b)
        throw new Error(`${where}: guidance partner row ${partnerRow} must be another row of the run (0..${B - 1})`);
      if (!Number.isFinite(scale)) throw new Error(`${where}: guidance scale ${scale} must be finite`);
      cfgOn[b] = 1n;
      cfgPartner[b] = BigInt(partnerRow);
      cfgScale[b] = scale;
    }
    maskBegin[b] = BigInt(r.maskBegin);
    maskEnd[b] = BigInt(r.maskEnd);
    temperature[b] = r.temperature;
    const n = r.penalisedIds.length;
    penalty[b] = n > 0 ? r.repetitionPenalty : 1;
    for (let j = 0; j < P; j++) {
      const id = n > 0 ? r.penalisedIds[j < n ? j : 0] : 0;
      if (!Number.isInteger(id) || id < 0 || id >= vocab)
        throw new Error(`${where}: penalised id ${id} is outside the vocabulary [0, ${vocab})`);
      penaltyIds[b * P + j] = BigInt(id);
    }
  });
  return {
    [samplingIo.maskBegin]: { type: 'int64', data: maskBegin, dims: [B, 1] },
    [samplingIo.maskEnd]: { type: 'int64', data: maskEnd, dims: [B, 1] },
    [samplingIo.penaltyIds]: { type: 'int64', data: penaltyIds, dims: [B, P] },
    [samplingIo.penalty]: { type: 'float32', data: penalty, dims: [B, 1] },
    [samplingIo.temperature]: { type: 'float32', data: temperature, dims: [B, 1] },
    [samplingIo.topK]: { type: 'int64', data: BigInt64Array.of(BigInt(k)), dims: [1] },
    [samplingIo.keepBegin]: { type: 'int64', data: keepBegin, dims: [B, 1] },
    [samplingIo.keepEnd]: { type: 'int64', data: keepEnd, dims: [B, 1] },
    [samplingIo.cfgOn]: { type: 'int64', data: cfgOn, dims: [B, 1] },
    [samplingIo.cfgPartner]: { type: 'int64', data: cfgPartner, dims: [B] },
    [samplingIo.cfgScale]: { type: 'float32', data: cfgScale, dims: [B, 1] },
  };
}
