// The KV cache of one stage: for each layer a K and a V buffer [rows, kvHeads, maxLen, headDim] in JS-owned memory.
// A run feeds the rows of each attention branch of its micro-batch (decode rows, prefill chunks: stage-graph.ts) to the
// graph as a zero-copy view, which needs each branch's rows to be contiguous: sequences live in logical slots, and
// the arena maps each slot to a physical row, moving a sequence (only its filled prefix) when a micro-batch needs its
// rows side by side. Steady decode of a fixed batch never moves.

export interface ArenaShape {
  layers: number;
  rows: number;
  kvHeads: number;
  maxLen: number;
  headDim: number;
}

export class KvArena {
  readonly keys: Float32Array[] = [];
  readonly values: Float32Array[] = [];
  /** Tokens of K/V present per logical slot. */
  readonly filled: Int32Array;
  private readonly rowOf: Int32Array;
  private readonly slotAt: Int32Array;
  private readonly rowSize: number;
  private readonly headSize: number;
  /** Filled-prefix tokens moved by relocations so far (for tests and metrics). */
  movedTokens = 0;

  /**
   * `hostBuffers` false keeps only the slot bookkeeping (filled, rows): a device-resident arena (device-kv.ts) holds
   * the data, and its rows never move.
   */
  constructor(
    readonly shape: ArenaShape,
    hostBuffers = true,
  ) {
    const { layers, rows, kvHeads, maxLen, headDim } = shape;
    this.headSize = maxLen * headDim;
    this.rowSize = kvHeads * this.headSize;
    for (let l = 0; l < layers && hostBuffers; l++) {
      this.keys.push(new Float32Array(rows * this.rowSize));
      this.values.push(new Float32Array(rows * this.rowSize));
    }
    this.filled = new Int32Array(rows);
    this.rowOf = Int32Array.from({ length: rows }, (_, i) => i);
    this.slotAt = Int32Array.from({ length: rows }, (_, i) => i);
  }

  get bytes(): number {
    return 2 * this.shape.layers * this.shape.rows * this.rowSize * 4;
  }

  row(slot: number): number {
    return this.rowOf[slot];
  }

  /**
   * Moves sequences so that the given slots occupy a contiguous range of rows; returns the first row. The range is
   * the window that already holds most of them, so few sequences move.
   */
  gather(slots: number[]): number {
    const want = new Set(slots);
    const n = slots.length;
    let bestStart = 0;
    let bestHits = -1;
    for (let start = 0; start + n <= this.shape.rows; start++) {
      let hits = 0;
      for (let r = start; r < start + n; r++) if (want.has(this.slotAt[r])) hits++;
      if (hits > bestHits) {
        bestHits = hits;
        bestStart = start;
      }
      if (hits === n) break;
    }
    const outside = slots.filter((s) => this.rowOf[s] < bestStart || this.rowOf[s] >= bestStart + n);
    for (let r = bestStart; r < bestStart + n && outside.length > 0; r++) {
      if (!want.has(this.slotAt[r])) this.swapRows(r, this.rowOf[outside.pop() as number]);
    }
    return bestStart;
  }

  /**
   * Like gather, for several groups of slots: each group occupies a contiguous range of rows and the groups lie side
   * by side in one window; returns each group's first row. Two groups may be placed in either order, whichever
   * moves fewer cached tokens, so a layout that already fits never moves.
   */
  arrange(groups: number[][]): number[] {
    const first = this.gather(groups.flat());
    const orders = groups.length === 2 ? [groups, [groups[1], groups[0]]] : [groups];
    const cost = (order: number[][]) => {
      let tokens = 0;
      let begin = first;
      for (const group of order) {
        for (const slot of group) {
          const r = this.rowOf[slot];
          if (r < begin || r >= begin + group.length) tokens += this.filled[slot];
        }
        begin += group.length;
      }
      return tokens;
    };
    const order = orders.reduce((best, o) => (cost(o) < cost(best) ? o : best));
    const starts = new Map<number[], number>();
    let begin = first;
    for (const group of order) {
      starts.set(group, begin);
      const members = new Set(group);
      // Earlier groups are already in place, so a member outside this range sits in a later group's range.
      const outside = group.filter((s) => this.rowOf[s] < begin || this.rowOf[s] >= begin + group.length);
      for (let r = begin; r < begin + group.length; r++) {
        if (!members.has(this.slotAt[r])) this.swapRows(r, this.rowOf[outside.pop() as number]);
      }
      begin += group.length;
    }
    return groups.map((g) => starts.get(g) as number);
  }

  /** Views of layer `layer`'s K and V for rows [firstRow, firstRow + count). */
  view(layer: number, firstRow: number, count: number): { key: Float32Array; value: Float32Array } {
    const begin = firstRow * this.rowSize;
    const end = begin + count * this.rowSize;
    return { key: this.keys[layer].subarray(begin, end), value: this.values[layer].subarray(begin, end) };
  }

  /**
   * Writes new positions [start, start + length) of `slot` from a graph output laid out [.., length, kvHeads, headDim]
   * beginning at `offset` (in floats).
   */
  write(
    layer: number,
    slot: number,
    start: number,
    length: number,
    newKey: Float32Array,
    newValue: Float32Array,
    offset: number,
  ): void {
    const { kvHeads, headDim } = this.shape;
    const base = this.rowOf[slot] * this.rowSize;
    const k = this.keys[layer];
    const v = this.values[layer];
    for (let t = 0; t < length; t++) {
      for (let h = 0; h < kvHeads; h++) {
        const src = offset + (t * kvHeads + h) * headDim;
        const dst = base + h * this.headSize + (start + t) * headDim;
        k.set(newKey.subarray(src, src + headDim), dst);
        v.set(newValue.subarray(src, src + headDim), dst);
      }
    }
  }

  /** Copies the first `length` positions of `from` into `to` (prefix reuse); `to` then holds `length` tokens. */
  copy(from: number, to: number, length: number): void {
    this.copyPrefix(this.rowOf[from], this.rowOf[to], length);
    this.filled[to] = length;
  }

  private copyPrefix(fromRow: number, toRow: number, length: number): void {
    if (fromRow === toRow || length === 0) return;
    const n = length * this.shape.headDim;
    for (const buffers of [this.keys, this.values]) {
      for (const buf of buffers) {
        for (let h = 0; h < this.shape.kvHeads; h++) {
          const src = fromRow * this.rowSize + h * this.headSize;
          buf.copyWithin(toRow * this.rowSize + h * this.headSize, src, src + n);
        }
      }
    }
  }

  private swapRows(a: number, b: number): void {
    const slotA = this.slotAt[a];
    const slotB = this.slotAt[b];
    const lenA = this.filled[slotA];
    const lenB = this.filled[slotB];
    const { kvHeads, headDim } = this.shape;
    const tmp = new Float32Array(lenA * headDim);
    for (const buffers of [this.keys, this.values]) {
      for (const buf of buffers) {
        for (let h = 0; h < kvHeads; h++) {
          const offA = a * this.rowSize + h * this.headSize;
          const offB = b * this.rowSize + h * this.headSize;
          tmp.set(buf.subarray(offA, offA + lenA * headDim));
          buf.copyWithin(offA, offB, offB + lenB * headDim);
          buf.set(tmp, offB);
        }
      }
    }
    this.movedTokens += lenA + lenB;
    this.slotAt[a] = slotB;
    this.slotAt[b] = slotA;
    this.rowOf[slotA] = b;
    this.rowOf[slotB] = a;
  }
}
