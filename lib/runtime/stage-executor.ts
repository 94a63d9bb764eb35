// Runs one stage's ORT session over a KV arena (inside the worker thread). One call is ONE session run, whatever its
// mix of decode rows and prefill chunks: the graph takes the call's tokens flat in item order (stage-graph.ts) and
// this file only lays out the index, position and mask inputs of its two attention branches (decode rows, and
// chunks padded to the longest), places each branch's sequences on contiguous arena rows, and writes the new K/V
// of each item back into the arena.
import ort from 'onnxruntime-node';
import {
  deviceSamplingFeeds,
  NEUTRAL_ROW,
  runTopK,
  type SamplingRow,
  samplingFeeds,
  samplingIo,
} from '../onnx/sampling-head.js';
import { type Branch, INT8_PATH_MIN_TOKENS, io, type StageShape } from '../onnx/stage-graph.js';
import type { DeviceKv } from './device-kv.js';
import { KvArena } from './kv-arena.js';
import type { ForwardInput, ForwardItem, ForwardOutput, SampledOutput, TransferStats } from './protocol.js';

/** What the executor needs of an ORT session (a seam: tests wrap a real session to count its runs). */
export interface StageSession {
  run(feeds: Record<string, ort.Tensor>, fetches: string[]): Promise<Record<string, ort.OnnxValue>>;
}

/** One attention branch of a call: its items (indices into the call's items, in arena row order) and row length. */
interface BranchPlan {
  branch: Branch;
  members: number[];
  /** Query positions per row: 1 for decode, the longest chunk for chunk. */
  length: number;
  firstRow: number;
}

/** Bytes of a tensor in host memory (what ORT copies to a device when fed, or copied back when returned). */
export function hostBytes(t: ort.OnnxValue): number {
  return t.location === 'cpu' ? (t.data as ArrayBufferView).byteLength : 0;
}

export class StageExecutor {
  readonly arena: KvArena;
  private readonly dummyPast: Float32Array;
  /** Runs of at least this many tokens take the int8 path, where the graph has one (StageShape.int8Prefill). */
  readonly int8MinTokens: number;
  /** Host memory fed to and returned by the stage's runs (and device KV copies), since start. */
  readonly transfers: TransferStats = { runs: 0, hostToDevice: 0, deviceToHost: 0, last: null };

  /** With `deviceKv` the arena lives on the device and the session is the kvOnDevice graph (stage-graph.ts). */
  constructor(
    private readonly session: StageSession,
    readonly shape: StageShape,
    readonly maxSequences: number,
    readonly maxSequenceLength: number,
    private readonly deviceKv?: DeviceKv,
    opts: { int8MinTokens?: number } = {},
  ) {
    this.int8MinTokens = opts.int8MinTokens ?? INT8_PATH_MIN_TOKENS;
    this.arena = new KvArena(
      {
        layers: shape.layers.length,
        rows: maxSequences,
        kvHeads: shape.kvHeads,
        maxLen: maxSequenceLength,
        headDim: shape.headDim,
      },
      !deviceKv,
    );
    this.dummyPast = new Float32Array(shape.kvHeads * shape.headDim);
  }

  /** With `sampling` (last stage, one row per item) the in-graph head answers instead of the logits. */
  async forward(items: ForwardItem[], input: ForwardInput, sampling?: SamplingRow[]): Promise<ForwardOutput> {
    const offsets = this.validate(items, input);
    const V = this.shape.vocabSize;
    let k = 0;
    if (sampling) {
      if (!this.shape.isLast) throw new Error('forward: sampling rows are for the last stage only');
      if (sampling.length !== items.length)
        throw new Error(`forward: ${sampling.length} sampling rows for ${items.length} items (one per item)`);
      k = runTopK(sampling, V);
    }
    // The head's inputs are always fed (checked before anything moves); only the fetched outputs are computed.
    const rows = sampling ?? items.map(() => NEUTRAL_ROW);
    const hostHead = this.shape.isLast ? samplingFeeds(rows, V, sampling ? k : undefined) : {};
    const head = this.shape.isLast && this.shape.deviceSampling ? deviceSamplingFeeds(hostHead) : hostHead;
    const feeds = this.layout(items, input, offsets);
    for (const [name, t] of Object.entries(head)) feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
    const kv = this.deviceKv;
    const fetches = this.shape.layers.flatMap((layer) =>
      kv ? [io.keyCacheOut(layer), io.valueCacheOut(layer)] : [io.newKey(layer), io.newValue(layer)],
    );
    // A device-KV session runs through the binding's IO binding, which keeps every output it ever bound: each run must
    // fetch the same outputs (device-kv.ts), so a last stage fetches all of them, the logits and full rows staying on
    // the device unless this run wants them.
    const allOutputs = kv !== undefined && this.shape.isLast;
    if (allOutputs) fetches.push(io.logits, samplingIo.topIds, samplingIo.topLogprobs, samplingIo.logprobs);
    else if (this.shape.isLast) {
      if (!sampling) fetches.push(io.logits);
      else {
        fetches.push(samplingIo.topIds, samplingIo.topLogprobs);
        if (rows.some((r) => r.fullRow)) fetches.push(samplingIo.logprobs);
      }
    } else fetches.push(io.hiddenOut);
    const result = await this.run(feeds, fetches);
    if (allOutputs && kv) {
      const wanted = !sampling ? io.logits : rows.some((r) => r.fullRow) ? samplingIo.logprobs : null;
      for (const name of [io.logits, samplingIo.logprobs]) {
        const t = result[name] as ort.Tensor;
        if (name === wanted) {
          const host = await kv.download(t);
          this.transfers.deviceToHost += host.byteLength;
          if (this.transfers.last) this.transfers.last.deviceToHost += host.byteLength;
          result[name] = new ort.Tensor('float32', host, t.dims);
        }
        t.dispose();
      }
    }
    const data = (name: string) => (result[name] as ort.Tensor).data;
    const { kvHeads, headDim } = this.shape;
    this.shape.layers.forEach((layer, l) => {
      if (kv) {
        kv.replace(l, result[io.keyCacheOut(layer)] as ort.Tensor, result[io.valueCacheOut(layer)] as ort.Tensor);
        return;
      }
      const newKey = data(io.newKey(layer)) as Float32Array;
      const newValue = data(io.newValue(layer)) as Float32Array;
      items.forEach((item, i) => {
        this.arena.write(l, item.slot, item.start, item.length, newKey, newValue, offsets[i] * kvHeads * headDim);
      });
    });
    for (const item of items) this.arena.filled[item.slot] = item.start + item.length;
    if (!this.shape.isLast) return { hidden: data(io.hiddenOut) as Float32Array };
    if (!sampling) return { logits: data(io.logits) as Float32Array };
    const full = sampling.some((r) => r.fullRow) ? (data(samplingIo.logprobs) as Float32Array) : null;
    const sampled: SampledOutput = {
      k,
      topIds: Int32Array.from(data(samplingIo.topIds) as BigInt64Array, Number),
      topLogprobs: data(samplingIo.topLogprobs) as Float32Array,
      fullRows: sampling.map((r, i) => (full && r.fullRow ? full.slice(i * V, (i + 1) * V) : null)),
    };
    return sampled;
  }

  /** One session run, counting the host memory it feeds and gets back. */
  private async run(feeds: Record<string, ort.Tensor>, fetches: string[]): Promise<Record<string, ort.OnnxValue>> {
    const hostToDevice = Object.values(feeds).reduce((n, t) => n + hostBytes(t), 0);
    const result = await this.session.run(feeds, fetches);
    const deviceToHost = Object.values(result).reduce((n, t) => n + hostBytes(t), 0);
    this.count(hostToDevice, deviceToHost);
    return result;
  }

  private count(hostToDevice: number, deviceToHost: number): void {
    this.transfers.runs++;
    this.transfers.hostToDevice += hostToDevice;
    this.transfers.deviceToHost += deviceToHost;
    this.transfers.last = { hostToDevice, deviceToHost };
  }

  async copyKv(from: number, to: number, length: number): Promise<void> {
    this.checkSlot(from, 'from');
    this.checkSlot(to, 'to');
    if (!Number.isInteger(length) || length < 0 || length > this.arena.filled[from]) {
      throw new Error(
        `copyKv: length ${length} must be an integer in [0, ${this.arena.filled[from]}] (tokens cached in slot ${from})`,
      );
    }
    if (this.deviceKv) {
      // Only the copy's index lists cross (two [length·kvHeads, 3] int64 tensors per tensor copied).
      await this.deviceKv.copyPrefix(this.arena.row(from), this.arena.row(to), length);
      if (from !== to && length > 0) this.count(2 * this.shape.layers.length * 2 * length * this.shape.kvHeads * 24, 0);
      this.arena.filled[to] = length;
    } else this.arena.copy(from, to, length);
  }

  free(slot: number): void {
    this.checkSlot(slot, 'slot');
    this.arena.filled[slot] = 0;
  }

  /**
   * The feeds of one run except the sampling head's: flat tokens, positions, each branch's token index, masks and
   * arena rows (moving sequences so that each branch's rows are contiguous), and the map back to flat tokens.
   */
  private layout(items: ForwardItem[], input: ForwardInput, offsets: number[]): Record<string, ort.Tensor> {
    const T = offsets[items.length];
    const { hiddenSize: D, kvHeads, headDim } = this.shape;
    const feeds: Record<string, ort.Tensor> = {};
    if ('tokens' in input) feeds[io.inputIds] = new ort.Tensor('int32', input.tokens, [T]);
    else feeds[io.hiddenIn] = new ort.Tensor('float32', input.hidden, [T, D]);
    const positions = new BigInt64Array(T);
    items.forEach((item, i) => {
      for (let t = 0; t < item.length; t++) positions[offsets[i] + t] = BigInt(item.start + t);
    });
    feeds[io.positionIds] = new ort.Tensor('int64', positions, [T]);
    if (this.shape.isLast)
      feeds[io.lastTokens] = new ort.Tensor(
        'int64',
        BigInt64Array.from(items, (_, i) => BigInt(offsets[i + 1] - 1)),
        [items.length],
      );
    const plans = this.plan(items);
    const tokenRows = new BigInt64Array(T);
    let rowBase = 0;
    for (const plan of plans) {
      const { branch, members, length } = plan;
      const R = Math.max(1, members.length);
      const index = new BigInt64Array(R * length);
      members.forEach((i, r) => {
        for (let s = 0; s < length; s++) {
          // Padding repeats the item's last token; its outputs are never picked by token_rows.
          const t = offsets[i] + Math.min(s, items[i].length - 1);
          index[r * length + s] = BigInt(t);
          if (s < items[i].length) tokenRows[t] = BigInt(rowBase + r * length + s);
        }
      });
      rowBase += R * length;
      feeds[io.branchTokens(branch)] = new ort.Tensor('int64', index, [R, length]);
      const starts = members.length > 0 ? members.map((i) => items[i].start) : [1];
      if (branch === 'chunk') feeds[io.causalMask] = causalMask(length, this.shape.heads / kvHeads);
      if (this.deviceKv) {
        // The rows are the slots (a device arena never moves); an empty branch reads slot 0's first position.
        const slots = members.length > 0 ? members.map((i) => items[i].slot) : [0];
        feeds[io.branchRows(branch)] = new ort.Tensor('int64', BigInt64Array.from(slots, BigInt), [R]);
        feeds[io.rowStarts(branch)] = new ort.Tensor('float32', Float32Array.from(starts), [R, 1, 1, 1]);
        feeds[io.pastLength(branch)] = new ort.Tensor('int64', BigInt64Array.of(BigInt(Math.max(1, ...starts))), [1]);
        continue;
      }
      for (const [name, t] of Object.entries(branchMasks(branch, starts))) feeds[name] = t;
      this.shape.layers.forEach((layer, l) => {
        // An empty branch runs on one zero past position (the dummy row): cheap, and nothing reads its output.
        const view =
          members.length > 0 ? this.arena.view(l, plan.firstRow, R) : { key: this.dummyPast, value: this.dummyPast };
        const dims = [R, kvHeads, members.length > 0 ? this.maxSequenceLength : 1, headDim];
        feeds[io.pastKey(layer, branch)] = new ort.Tensor('float32', view.key, dims);
        feeds[io.pastValue(layer, branch)] = new ort.Tensor('float32', view.value, dims);
      });
    }
    feeds[io.tokenRows] = new ort.Tensor('int64', tokenRows, [T]);
    if (this.shape.int8Prefill) feeds[io.int8Path] = new ort.Tensor('bool', [T >= this.int8MinTokens], []);
    if (this.deviceKv) {
      const kv = this.deviceKv;
      this.shape.layers.forEach((layer, l) => {
        feeds[io.keyCache(layer)] = kv.keys[l];
        feeds[io.valueCache(layer)] = kv.values[l];
      });
      const write = new BigInt64Array(T * kvHeads * 3);
      items.forEach((item, i) => {
        for (let t = 0; t < item.length; t++) {
          for (let h = 0; h < kvHeads; h++)
            write.set([BigInt(item.slot), BigInt(h), BigInt(item.start + t)], ((offsets[i] + t) * kvHeads + h) * 3);
        }
      });
      feeds[io.kvWriteIndex] = new ort.Tensor('int64', write, [T, kvHeads, 3]);
    }
    return feeds;
  }

  /** Splits the items into the decode and chunk branches and places each branch on contiguous arena rows. */
  private plan(items: ForwardItem[]): BranchPlan[] {
    const decode: number[] = [];
    const chunk: number[] = [];
    items.forEach((item, i) => {
      (item.length === 1 ? decode : chunk).push(i);
    });
    if (this.deviceKv) {
      const length = Math.max(1, ...chunk.map((i) => items[i].length));
      return [
        { branch: 'decode', members: decode, length: 1, firstRow: 0 },
        { branch: 'chunk', members: chunk, length, firstRow: 0 },
      ];
    }
    const slots = (members: number[]) => members.map((i) => items[i].slot);
    const [decodeRow, chunkRow] = this.arena.arrange([slots(decode), slots(chunk)]);
    const byRow = (members: number[]) =>
      members.sort((a, b) => this.arena.row(items[a].slot) - this.arena.row(items[b].slot));
    return [
      { branch: 'decode', members: byRow(decode), length: 1, firstRow: decodeRow },
      {
        branch: 'chunk',
        members: byRow(chunk),
        length: Math.max(1, ...chunk.map((i) => items[i].length)),
        firstRow: chunkRow,
      },
    ];
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

/** A branch's past length and past mask for rows with these past lengths (P = the longest, at least 1). */
export function branchMasks(branch: Branch, starts: number[]): Record<string, ort.Tensor> {
  const R = starts.length;
  const P = Math.max(1, ...starts);
  const pastMask = new Float32Array(R * P);
  starts.forEach((start, r) => pastMask.fill(Number.NEGATIVE_INFINITY, r * P + start, (r + 1) * P));
  return {
    [io.pastLength(branch)]: new ort.Tensor('int64', BigInt64Array.of(BigInt(P)), [1]),
    [io.pastMask(branch)]: new ort.Tensor('float32', pastMask, [R, 1, 1, P]),
  };
}

/** The chunk branch's causal mask over `length` new positions, for `group` query heads per kv head. */
export function causalMask(length: number, group: number): ort.Tensor {
  const causal = new Float32Array(group * length * length);
  for (let r = 0; r < group * length; r++) {
    const s = r % length;
    causal.fill(Number.NEGATIVE_INFINITY, r * length + s + 1, (r + 1) * length);
  }
  return new ort.Tensor('float32', causal, [1, 1, group * length, length]);
}
