// Prefix cache (docs/architecture.md, "KV lifecycle"): token-id prefixes whose KV is kept on the shards, so the same system prompt and the
// same image code grid are not prefilled twice. A radix tree over token ids (TGI's radix.rs idea): each entry is a
// cached token sequence plus an opaque handle to its KV (e.g. a slot); a lookup finds the longest common prefix
// with any entry, since the first n positions of a cached sequence's KV are valid for any prompt that shares them.
// Entries in use are pinned; unpinned ones are evicted least recently used first. The caller frees evicted KV.

export interface PrefixEntry<K> {
  readonly id: number;
  readonly tokens: Int32Array;
  /** The caller's handle to the KV holding these tokens (a slot, an allocator owner name, …). */
  readonly kv: K;
  pins: number;
  lastUsed: number;
}

export interface PrefixHit<K> {
  entry: PrefixEntry<K>;
  /** Leading tokens of the prompt whose KV can be taken from entry (positions 0 … length-1). */
  length: number;
}

export interface InsertResult<K> {
  /** The entry now covering the tokens: the new one, or an existing one that already held them. */
  entry: PrefixEntry<K> | null;
  /** Whether `kv` was adopted by the cache. If false, the caller still owns (and must free) it. */
  adopted: boolean;
  /** Entries removed to make room or because the new entry extends them: free their KV. */
  evicted: PrefixEntry<K>[];
}

export interface PrefixCacheOptions {
  /** Most entries kept at once (each holds KV on every shard). */
  maxEntries: number;
  /** Shorter matches are not worth a copy and are reported as misses. Default 1. */
  minMatch?: number;
}

class RadixNode<K> {
  readonly children = new Map<number, RadixNode<K>>();
  /** Entries whose token path runs through (or ends at) this node. */
  readonly through = new Set<PrefixEntry<K>>();
  constructor(
    public label: Int32Array,
    public parent: RadixNode<K> | null,
  ) {}
}

export class PrefixCache<K> {
  private readonly root = new RadixNode<K>(new Int32Array(0), null);
  private readonly entries = new Set<PrefixEntry<K>>();
  private readonly maxEntries: number;
  private readonly minMatch: number;
  private tick = 0;
  private nextId = 1;

  constructor(opts: PrefixCacheOptions) {
    this.maxEntries = opts.maxEntries;
    this.minMatch = Math.max(1, opts.minMatch ?? 1);
  }

  get size(): number {
    return this.entries.size;
  }

  all(): PrefixEntry<K>[] {
    return [...this.entries];
  }

  /**
   * The longest cached prefix of `tokens`, at most `maxLength` long. The default leaves the last prompt token out:
   * it must still run through the model to produce the next token's logits. Marks the entry recently used.
   */
  lookup(tokens: ArrayLike<number>, maxLength = tokens.length - 1): PrefixHit<K> | null {
    const hit = this.match(tokens, maxLength);
    if (hit) this.touch(hit.entry);
    return hit;
  }

  /**
   * The longest cached prefix of `tokens` (at most `maxLength`) among the entries `usable` accepts, without marking
   * anything used: what a planner asks while deciding.
   */
  match(
    tokens: ArrayLike<number>,
    maxLength = tokens.length - 1,
    usable: (e: PrefixEntry<K>) => boolean = () => true,
  ): PrefixHit<K> | null {
    const path = this.walkPath(tokens, Math.min(maxLength, tokens.length));
    for (let i = path.length - 1; i >= 0; i--) {
      const { node, matched } = path[i];
      if (matched < this.minMatch) return null;
      let best: PrefixEntry<K> | null = null;
      for (const e of node.through) if (usable(e) && (!best || e.lastUsed > best.lastUsed)) best = e;
      if (best) return { entry: best, length: matched };
    }
    return null;
  }

  /** Marks an entry most recently used. */
  touch(entry: PrefixEntry<K>): void {
    entry.lastUsed = ++this.tick;
  }

  /** The least recently used unpinned entry among those `usable` accepts, not removed (null: none). */
  lruCandidate(usable: (e: PrefixEntry<K>) => boolean = () => true): PrefixEntry<K> | null {
    let victim: PrefixEntry<K> | null = null;
    for (const e of this.entries)
      if (e.pins === 0 && usable(e) && (!victim || e.lastUsed < victim.lastUsed)) victim = e;
    return victim;
  }

  /** Unpinned entries whose tokens are a strict prefix of `tokens` (a new entry for `tokens` makes them redundant). */
  extendedBy(tokens: ArrayLike<number>): PrefixEntry<K>[] {
    const t = Int32Array.from(tokens);
    return [...this.entries].filter((e) => e.pins === 0 && e.tokens.length < t.length && isPrefix(e.tokens, t));
  }

  /** Caches `tokens` with KV handle `kv`, evicting LRU unpinned entries beyond maxEntries. */
  insert(tokens: ArrayLike<number>, kv: K): InsertResult<K> {
    const copy = Int32Array.from(tokens);
    const evicted: PrefixEntry<K>[] = [];
    const { node, matched } = this.walk(copy, copy.length);
    if (matched === copy.length && node !== this.root) {
      const entry = this.mostRecent(node.through);
      entry.lastUsed = ++this.tick;
      return { entry, adopted: false, evicted };
    }
    for (const e of this.entries) {
      if (e.pins === 0 && e.tokens.length < copy.length && isPrefix(e.tokens, copy)) {
        this.remove(e);
        evicted.push(e);
      }
    }
    while (this.entries.size >= this.maxEntries) {
      const victim = this.evictLru();
      if (!victim) return { entry: null, adopted: false, evicted };
      evicted.push(victim);
    }
    const entry: PrefixEntry<K> = { id: this.nextId++, tokens: copy, kv, pins: 0, lastUsed: ++this.tick };
    this.add(entry);
    return { entry, adopted: true, evicted };
  }

  pin(entry: PrefixEntry<K>): void {
    if (!this.entries.has(entry)) throw new Error(`PrefixCache: entry ${entry.id} is not cached (evicted?)`);
    entry.pins++;
  }

  unpin(entry: PrefixEntry<K>): void {
    if (entry.pins <= 0) throw new Error(`PrefixCache: entry ${entry.id} is not pinned`);
    entry.pins--;
  }

  /** Removes and returns the least recently used unpinned entry (null when all are pinned). Free its KV. */
  evictLru(): PrefixEntry<K> | null {
    let victim: PrefixEntry<K> | null = null;
    for (const e of this.entries) if (e.pins === 0 && (!victim || e.lastUsed < victim.lastUsed)) victim = e;
    if (victim) this.remove(victim);
    return victim;
  }

  /** Removes an entry (e.g. its KV was lost with a shard). Throws if pinned. */
  remove(entry: PrefixEntry<K>): void {
    if (!this.entries.has(entry)) return;
    if (entry.pins > 0) throw new Error(`PrefixCache: entry ${entry.id} is pinned ${entry.pins} time(s)`);
    this.entries.delete(entry);
    let node = this.root;
    node.through.delete(entry);
    let depth = 0;
    while (depth < entry.tokens.length) {
      const child = node.children.get(entry.tokens[depth])!;
      child.through.delete(entry);
      if (child.through.size === 0) {
        node.children.delete(entry.tokens[depth]);
        return;
      }
      depth += child.label.length;
      node = child;
    }
  }

  /** The nodes `tokens` passes through, shallowest first, each with the tokens matched down to it. */
  private walkPath(tokens: ArrayLike<number>, limit: number): { node: RadixNode<K>; matched: number }[] {
    const path: { node: RadixNode<K>; matched: number }[] = [];
    let node = this.root;
    let matched = 0;
    while (matched < limit) {
      const child = node.children.get(tokens[matched]);
      if (!child) break;
      let j = 0;
      while (j < child.label.length && matched + j < limit && child.label[j] === tokens[matched + j]) j++;
      matched += j;
      node = child;
      path.push({ node, matched });
      if (j < child.label.length) break;
    }
    return path;
  }

  /** Follows `tokens` down the tree; node is the deepest node reached (possibly through part of its label). */
  private walk(tokens: ArrayLike<number>, limit: number): { node: RadixNode<K>; matched: number } {
    return this.walkPath(tokens, limit).at(-1) ?? { node: this.root, matched: 0 };
  }

  private add(entry: PrefixEntry<K>): void {
    const t = entry.tokens;
    this.entries.add(entry);
    let node = this.root;
    node.through.add(entry);
    let depth = 0;
    while (depth < t.length) {
      let child = node.children.get(t[depth]);
      if (!child) {
        const leaf = new RadixNode<K>(t.slice(depth), node);
        leaf.through.add(entry);
        node.children.set(t[depth], leaf);
        return;
      }
      let j = 0;
      while (j < child.label.length && depth + j < t.length && child.label[j] === t[depth + j]) j++;
      if (j < child.label.length) child = this.split(node, child, j);
      child.through.add(entry);
      depth += j;
      node = child;
    }
  }

  /** Splits child's edge after j tokens; returns the new middle node. */
  private split(parent: RadixNode<K>, child: RadixNode<K>, j: number): RadixNode<K> {
    const mid = new RadixNode<K>(child.label.slice(0, j), parent);
    for (const e of child.through) mid.through.add(e);
    parent.children.set(mid.label[0], mid);
    child.label = child.label.slice(j);
    child.parent = mid;
    mid.children.set(child.label[0], child);
    return mid;
  }

  private mostRecent(set: Set<PrefixEntry<K>>): PrefixEntry<K> {
    let best: PrefixEntry<K> | null = null;
    for (const e of set) if (!best || e.lastUsed > best.lastUsed) best = e;
    return best!;
  }
}

function isPrefix(a: Int32Array, b: Int32Array): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
