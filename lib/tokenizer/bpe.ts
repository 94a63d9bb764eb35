// Byte-level BPE over tiktoken ranks: repeatedly merge the adjacent pair whose concatenation has the lowest rank
// (leftmost on ties), exactly as tiktoken's _byte_pair_merge. Byte strings are held as latin1 JS strings
// (one char per byte), which makes them cheap Map keys.

const NO_RANK = Number.MAX_SAFE_INTEGER;
/** Above this many bytes a piece is merged with a heap (O(n log n)) instead of tiktoken's O(n²) scan. */
const HEAP_THRESHOLD = 96;
const CACHE_LIMIT = 65536;

export class BytePairEncoder {
  private readonly cache = new Map<string, number[]>();

  /** ranks: latin1 byte string → rank; every single byte must have a rank. */
  constructor(private readonly ranks: Map<string, number>) {
    for (let b = 0; b < 256; b++) {
      if (!ranks.has(String.fromCharCode(b))) throw new Error(`BPE ranks: byte 0x${b.toString(16)} has no rank`);
    }
  }

  /** Appends the ids of one pre-split piece (latin1 bytes) to `out`. */
  encodePiece(piece: string, out: number[]): void {
    const whole = this.ranks.get(piece);
    if (whole !== undefined) {
      out.push(whole);
      return;
    }
    const cached = this.cache.get(piece);
    if (cached) {
      for (const id of cached) out.push(id);
      return;
    }
    const ids = piece.length > HEAP_THRESHOLD ? this.mergeWithHeap(piece) : this.mergeWithScan(piece);
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
    this.cache.set(piece, ids);
    for (const id of ids) out.push(id);
  }

  private rankOf(piece: string, start: number, end: number): number {
    return this.ranks.get(piece.slice(start, end)) ?? NO_RANK;
  }

  /** tiktoken's algorithm: starts[i] begins part i; pairRank[i] = rank of parts i and i+1 joined. */
  mergeWithScan(piece: string): number[] {
    const n = piece.length;
    const starts: number[] = new Array(n + 1);
    for (let i = 0; i <= n; i++) starts[i] = i;
    const pairRank: number[] = new Array(n);
    for (let i = 0; i < n - 1; i++) pairRank[i] = this.rankOf(piece, i, i + 2);
    pairRank[n - 1] = NO_RANK;
    let parts = n;
    while (parts > 1) {
      let best = NO_RANK;
      let at = -1;
      for (let i = 0; i < parts - 1; i++) {
        if (pairRank[i] < best) {
          best = pairRank[i];
          at = i;
        }
      }
      if (at < 0) break;
      starts.splice(at + 1, 1);
      pairRank.splice(at + 1, 1);
      parts--;
      pairRank[at] = at + 2 <= parts ? this.rankOf(piece, starts[at], starts[at + 2]) : NO_RANK;
      if (at > 0) pairRank[at - 1] = this.rankOf(piece, starts[at - 1], starts[at + 1]);
    }
    const ids: number[] = [];
    for (let i = 0; i < parts; i++) ids.push(this.ranks.get(piece.slice(starts[i], starts[i + 1]))!);
    return ids;
  }

  /** Same merge order as mergeWithScan (lowest rank, then leftmost), with a binary heap and lazy invalidation. */
  mergeWithHeap(piece: string): number[] {
    const n = piece.length;
    // Parts as a doubly linked list over byte offsets: a part starting at s ends at next[s].
    const next = new Int32Array(n + 1);
    const prev = new Int32Array(n + 1);
    const alive = new Uint8Array(n + 1);
    for (let i = 0; i <= n; i++) {
      next[i] = i + 1;
      prev[i] = i - 1;
      alive[i] = 1;
    }
    const heap = new PairHeap();
    for (let i = 0; i < n - 1; i++) {
      const r = this.rankOf(piece, i, i + 2);
      if (r !== NO_RANK) heap.push(r, i, i + 2);
    }
    while (heap.size > 0) {
      const { start, end } = heap.pop();
      // Valid only if `start` is still a part whose pair with the following part still spans [start, end).
      if (!alive[start]) continue;
      const mid = next[start];
      if (mid >= n || next[mid] !== end) continue;
      alive[mid] = 0;
      next[start] = end;
      prev[end] = start;
      if (end < n) {
        const r = this.rankOf(piece, start, next[end]);
        if (r !== NO_RANK) heap.push(r, start, next[end]);
      }
      if (start > 0) {
        const p = prev[start];
        const r = this.rankOf(piece, p, end);
        if (r !== NO_RANK) heap.push(r, p, end);
      }
    }
    const ids: number[] = [];
    for (let s = 0; s < n; s = next[s]) ids.push(this.ranks.get(piece.slice(s, next[s]))!);
    return ids;
  }
}

/** Min-heap of (rank, start) with the pair's end carried along. */
class PairHeap {
  private readonly rank: number[] = [];
  private readonly start: number[] = [];
  private readonly end: number[] = [];
  size = 0;

  private less(a: number, b: number): boolean {
    return this.rank[a] < this.rank[b] || (this.rank[a] === this.rank[b] && this.start[a] < this.start[b]);
  }

  private swap(a: number, b: number): void {
    [this.rank[a], this.rank[b]] = [this.rank[b], this.rank[a]];
    [this.start[a], this.start[b]] = [this.start[b], this.start[a]];
    [this.end[a], this.end[b]] = [this.end[b], this.end[a]];
  }

  push(rank: number, start: number, end: number): void {
    let i = this.size++;
    this.rank[i] = rank;
    this.start[i] = start;
    this.end[i] = end;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  pop(): { rank: number; start: number; end: number } {
    const top = { rank: this.rank[0], start: this.start[0], end: this.end[0] };
    const last = --this.size;
    if (last > 0) {
      this.swap(0, last);
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < last && this.less(l, m)) m = l;
        if (r < last && this.less(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m);
        i = m;
      }
    }
    return top;
  }
}
