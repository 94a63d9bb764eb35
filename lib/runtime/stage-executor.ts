// Runs one stage's ORT session over a KV arena (inside the worker thread). A call may mix sequences of different
// lengths (prefill chunks and decodes): items are grouped by new-token count, each group is one session run over
// contiguous arena rows (one query length per run keeps the attention's masks and reshapes simple), and results are put back in the
// caller's order.
import ort from 'onnxruntime-node';
import { NEUTRAL_ROW, runTopK, type SamplingRow, samplingFeeds, samplingIo } from '../onnx/sampling-head.js';
import { io, type StageShape } from '../onnx/stage-graph.js';
import { concatFloat32 } from '../util/float32.js';
import { KvArena } from './kv-arena.js';
import type { ForwardInput, ForwardItem, ForwardOutput, SampledOutput } from './protocol.js';

type GroupResult =
  | { logits: Float32Array }
  | { hidden: Float32Array }
  | { topIds: BigInt64Array; topLogprobs: Float32Array; full?: Float32Array };

export class StageExecutor {
  readonly arena: KvArena;

  constructor(
    private readonly session: ort.InferenceSession,
    readonly shape: StageShape,
    readonly maxSequences: number,
    readonly maxSequenceLength: number,
  ) {
    this.arena = new KvArena({
      layers: shape.layers.length,
      rows: maxSequences,
      kvHeads: shape.kvHeads,
      maxLen: maxSequenceLength,
      headDim: shape.headDim,
    });
  }

  /** With `sampling` (last stage, one row per item) the in-graph head answers instead of the logits. */
  async forward(items: ForwardItem[], input: ForwardInput, sampling?: SamplingRow[]): Promise<ForwardOutput> {
    const offsets = this.validate(items, input);
    const D = this.shape.hiddenSize;
    const V = this.shape.vocabSize;
    const total = offsets[items.length];
    let sampled: SampledOutput | undefined;
    if (sampling) {
      if (!this.shape.isLast) throw new Error('forward: sampling rows are for the last stage only');
      if (sampling.length !== items.length)
        throw new Error(`forward: ${sampling.length} sampling rows for ${items.length} items (one per item)`);
      const k = runTopK(sampling, V);
      sampled = {
        k,
        topIds: new Int32Array(items.length * k),
        topLogprobs: new Float32Array(items.length * k),
        fullRows: items.map(() => null),
      };
    }
    const out = sampled
      ? new Float32Array(0)
      : this.shape.isLast
        ? new Float32Array(items.length * V)
        : new Float32Array(total * D);
    const groups = new Map<number, number[]>();
    items.forEach((item, i) => {
      const group = groups.get(item.length) ?? [];
      group.push(i);
      groups.set(item.length, group);
    });
    for (const [length, members] of groups) {
      const firstRow = this.arena.gather(members.map((i) => items[i].slot));
      members.sort((a, b) => this.arena.row(items[a].slot) - this.arena.row(items[b].slot));
      const rows = sampled && sampling ? { rows: members.map((i) => sampling[i]), k: sampled.k } : undefined;
      const result = await this.runGroup(items, members, length, firstRow, input, offsets, rows);
      members.forEach((itemIndex, b) => {
        if ('topIds' in result && sampled) {
          const k = sampled.k;
          for (let j = 0; j < k; j++) sampled.topIds[itemIndex * k + j] = Number(result.topIds[b * k + j]);
          sampled.topLogprobs.set(result.topLogprobs.subarray(b * k, (b + 1) * k), itemIndex * k);
          if (result.full && sampling?.[itemIndex].fullRow)
            sampled.fullRows[itemIndex] = result.full.slice(b * V, (b + 1) * V);
        } else if ('logits' in result) out.set(result.logits.subarray(b * V, (b + 1) * V), itemIndex * V);
        else if ('hidden' in result)
          out.set(result.hidden.subarray(b * length * D, (b + 1) * length * D), offsets[itemIndex] * D);
      });
    }
    if (sampled) return sampled;
    return this.shape.isLast ? { logits: out } : { hidden: out };
  }

  copyKv(from: number, to: number, length: number): void {
    this.checkSlot(from, 'from');
    this.checkSlot(to, 'to');
    if (!Number.isInteger(length) || length < 0 || length > this.arena.filled[from]) {
      throw new Error(
        `copyKv: length ${length} must be an integer in [0, ${this.arena.filled[from]}] (tokens cached in slot ${from})`,
      );
    }
    this.arena.copy(from, to, length);
  }

  free(slot: number): void {
    this.checkSlot(slot, 'slot');
    this.arena.filled[slot] = 0;
  }

  private async runGroup(
    items: ForwardItem[],
    members: number[],
    length: number,
    firstRow: number,
    input: ForwardInput,
    offsets: number[],
    sampling?: { rows: SamplingRow[]; k: number },
  ): Promise<GroupResult> {
    const B = members.length;
    const { hiddenSize: D, kvHeads, headDim } = this.shape;
    const L = this.maxSequenceLength;
    const feeds: Record<string, ort.Tensor> = {};
    if ('tokens' in input) {
      const ids = new Int32Array(B * length);
      members.forEach((i, b) => ids.set(input.tokens.subarray(offsets[i], offsets[i] + length), b * length));
      feeds[io.inputIds] = new ort.Tensor('int32', ids, [B, length]);
    } else {
      const hidden =
        members.every((m, b) => m === b) && B === items.length
          ? input.hidden
          : concatFloat32(members.map((i) => input.hidden.subarray(offsets[i] * D, (offsets[i] + length) * D)));
      feeds[io.hiddenIn] = new ort.Tensor('float32', hidden, [B * length, D]);
    }
    const positions = new BigInt64Array(B * length);
    members.forEach((i, b) => {
      const { start } = items[i];
      for (let t = 0; t < length; t++) positions[b * length + t] = BigInt(start + t);
    });
    feeds[io.positionIds] = new ort.Tensor('int64', positions, [B, length]);
    for (const [name, t] of Object.entries(
      attentionFeeds(
        members.map((i) => items[i].start),
        length,
        this.shape.heads / kvHeads,
      ),
    ))
      feeds[name] = t;
    this.shape.layers.forEach((layer, l) => {
      const view = this.arena.view(l, firstRow, B);
      feeds[io.pastKey(layer)] = new ort.Tensor('float32', view.key, [B, kvHeads, L, headDim]);
      feeds[io.pastValue(layer)] = new ort.Tensor('float32', view.value, [B, kvHeads, L, headDim]);
    });
    const fetches = this.shape.layers.flatMap((layer) => [io.newKey(layer), io.newValue(layer)]);
    if (this.shape.isLast) {
      // The head's inputs are always fed; only the fetched outputs are computed (no full row unless asked).
      const rows = sampling?.rows ?? members.map(() => NEUTRAL_ROW);
      for (const [name, t] of Object.entries(samplingFeeds(rows, this.shape.vocabSize, sampling?.k)))
        feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
      if (!sampling) fetches.push(io.logits);
      else {
        fetches.push(samplingIo.topIds, samplingIo.topLogprobs);
        if (rows.some((r) => r.fullRow)) fetches.push(samplingIo.logprobs);
      }
    } else fetches.push(io.hiddenOut);
    const result = await this.session.run(feeds, fetches);
    this.shape.layers.forEach((layer, l) => {
      const newKey = result[io.newKey(layer)].data as Float32Array;
      const newValue = result[io.newValue(layer)].data as Float32Array;
      members.forEach((i, b) => {
        this.arena.write(l, items[i].slot, items[i].start, length, newKey, newValue, b * length * kvHeads * headDim);
      });
    });
    for (const i of members) this.arena.filled[items[i].slot] = items[i].start + length;
    if (this.shape.isLast && sampling) {
      return {
        topIds: result[samplingIo.topIds].data as BigInt64Array,
        topLogprobs: result[samplingIo.topLogprobs].data as Float32Array,
        full: result[samplingIo.logprobs]?.data as Float32Array | undefined,
      };
    }
    if (this.shape.isLast) return { logits: result[io.logits].data as Float32Array };
    return { hidden: result[io.hiddenOut].data as Float32Array };
  }

  /** Checks items and input; returns each item's first token index in the flat input (and the total at the end). */
  private validate(items: ForwardItem[], input: ForwardInput): number[] {
    if (items.length === 0) throw new Error('forward: items is empty');
    if (items.length > this.maxSequences)
      throw new Error(`forward: ${items.length} items but maxSequences is ${this.maxSequences}`);
    const seen = new Set<number>();
    const offsets = [0];
    items.forEach((item, i) => {
      const where = `forward: items[${i}]`;
      this.checkSlot(item.slot, `${where}.slot`);
      if (seen.has(item.slot)) throw new Error(`${where}.slot ${item.slot} appears twice in one call`);
      seen.add(item.slot);
      if (!Number.isInteger(item.length) || item.length < 1)
        throw new Error(`${where}.length must be an integer ≥ 1, got ${item.length}`);
      const filled = this.arena.filled[item.slot];
      if (!Number.isInteger(item.start) || item.start < 0 || item.start > filled) {
        throw new Error(`${where}.start ${item.start} must be in [0, ${filled}] (tokens cached in slot ${item.slot})`);
      }
      if (item.start + item.length > this.maxSequenceLength) {
        throw new Error(
          `${where}: start ${item.start} + length ${item.length} exceeds maxSequenceLength ${this.maxSequenceLength}`,
        );
      }
      offsets.push(offsets[i] + item.length);
    });
    const tokens = offsets[items.length];
    if (this.shape.isFirst) {
      if (!('tokens' in input)) throw new Error('forward: the first stage takes { tokens }, not { hidden }');
      if (input.tokens.length !== tokens)
        throw new Error(`forward: tokens has ${input.tokens.length} ids, items need ${tokens}`);
      const V = this.shape.vocabSize;
      const bad = input.tokens.findIndex((t) => t < 0 || t >= V);
      if (bad >= 0)
        throw new Error(`forward: tokens[${bad}] = ${input.tokens[bad]} is outside the vocabulary [0, ${V})`);
    } else {
      if (!('hidden' in input)) throw new Error('forward: a stage after the first takes { hidden }, not { tokens }');
      const want = tokens * this.shape.hiddenSize;
      if (input.hidden.length !== want)
        throw new Error(
          `forward: hidden has ${input.hidden.length} values, items need ${tokens} × ${this.shape.hiddenSize} = ${want}`,
        );
    }
    return offsets;
  }

  private checkSlot(slot: number, what: string): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxSequences) {
      throw new Error(`${what} ${slot} must be an integer in [0, ${this.maxSequences}) (maxSequences)`);
    }
  }
}

/** The attention's masks and past length for rows with these past lengths and `length` new tokens each. */
export function attentionFeeds(starts: number[], length: number, group: number): Record<string, ort.Tensor> {
  const B = starts.length;
  const P = Math.max(1, ...starts);
  const pastMask = new Float32Array(B * P);
  starts.forEach((start, b) => pastMask.fill(Number.NEGATIVE_INFINITY, b * P + start, (b + 1) * P));
  const causal = new Float32Array(group * length * length);
  for (let r = 0; r < group * length; r++) {
    const s = r % length;
    causal.fill(Number.NEGATIVE_INFINITY, r * length + s + 1, (r + 1) * length);
  }
  return {
    [io.pastLength]: new ort.Tensor('int64', BigInt64Array.of(BigInt(P)), [1]),
    [io.pastMask]: new ort.Tensor('float32', pastMask, [B, 1, 1, P]),
    [io.causalMask]: new ort.Tensor('float32', causal, [1, 1, group * length, length]),
  };
}
