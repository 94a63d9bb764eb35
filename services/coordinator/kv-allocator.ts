// KV capacity accounting (DESIGN.md §5). Every stage holds KV for its own layers of every live sequence, so the
// coordinator's budget is the smallest stage's: a fixed number of slots (one per sequence or cached prefix) and a
// token budget counted in blocks (like TGI's max_batch_total_tokens). Owners reserve whole blocks up front; the sum
// of reservations never exceeds the budget. Pure bookkeeping: the shards hold the memory.

/** What a shard's Info reports about its KV arena. */
export interface ShardKvCapacity {
  /** Sequences (or cached prefixes) the arena can hold at once. */
  slots: number;
  /** Tokens of KV the arena can hold, summed over all slots. */
  tokens: number;
}

export interface KvAllocation {
  owner: string;
  slot: number;
  /** Block ids reserved (block b covers tokens [b·blockSize, (b+1)·blockSize) of the arena's token space). */
  blocks: number[];
  /** Tokens the owner asked for (≤ blocks.length · blockSize). */
  tokens: number;
}

export interface KvStats {
  slotsTotal: number;
  slotsInUse: number;
  blocksTotal: number;
  blocksInUse: number;
  blockSize: number;
  tokensReserved: number;
}

/** The capacity every stage can honour: the minimum over the shards. */
export function commonCapacity(shards: readonly ShardKvCapacity[]): ShardKvCapacity {
  if (shards.length === 0) throw new Error('commonCapacity: no shards (need at least one Info)');
  return {
    slots: Math.min(...shards.map((s) => s.slots)),
    tokens: Math.min(...shards.map((s) => s.tokens)),
  };
}

export class KvAllocator {
  readonly blockSize: number;
  readonly slotsTotal: number;
  readonly blocksTotal: number;
  private readonly freeSlots: number[];
  private readonly freeBlocks: number[];
  private readonly owners = new Map<string, KvAllocation>();

  constructor(capacity: ShardKvCapacity, blockSize = 16) {
    if (!Number.isInteger(blockSize) || blockSize < 1)
      throw new Error(`KvAllocator: blockSize ${blockSize} must be ≥ 1`);
    if (!Number.isInteger(capacity.slots) || capacity.slots < 0)
      throw new Error(`KvAllocator: slots ${capacity.slots} must be a non-negative integer`);
    this.blockSize = blockSize;
    this.slotsTotal = capacity.slots;
    this.blocksTotal = Math.floor(capacity.tokens / blockSize);
    // Popped from the end: lowest ids are handed out first.
    this.freeSlots = Array.from({ length: this.slotsTotal }, (_, i) => this.slotsTotal - 1 - i);
    this.freeBlocks = Array.from({ length: this.blocksTotal }, (_, i) => this.blocksTotal - 1 - i);
  }

  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  /** Whether a new owner of `tokens` tokens fits now. */
  canReserve(tokens: number): boolean {
    return this.freeSlots.length > 0 && this.blocksFor(tokens) <= this.freeBlocks.length;
  }

  /** Whether `tokens` could ever fit (with nothing else reserved). */
  fitsAtAll(tokens: number): boolean {
    return this.slotsTotal > 0 && this.blocksFor(tokens) <= this.blocksTotal;
  }

  /** Reserves a slot and enough blocks for `tokens`; null when it does not fit now. Throws if the owner exists. */
  reserve(owner: string, tokens: number): KvAllocation | null {
    if (this.owners.has(owner))
      throw new Error(`KvAllocator: owner "${owner}" already holds slot ${this.owners.get(owner)!.slot}`);
    if (!Number.isInteger(tokens) || tokens < 0)
      throw new Error(`KvAllocator: tokens ${tokens} must be a non-negative integer`);
    if (!this.canReserve(tokens)) return null;
    const blocks: number[] = [];
    for (let i = this.blocksFor(tokens); i > 0; i--) blocks.push(this.freeBlocks.pop()!);
    const allocation = { owner, slot: this.freeSlots.pop()!, blocks, tokens };
    this.owners.set(owner, allocation);
    return allocation;
  }

  /** Grows an owner's reservation to `tokens` in total; false (nothing changed) when the blocks are not free. */
  extend(owner: string, tokens: number): boolean {
    const a = this.get(owner);
    const extra = this.blocksFor(tokens) - a.blocks.length;
    if (extra > this.freeBlocks.length) return false;
    for (let i = 0; i < extra; i++) a.blocks.push(this.freeBlocks.pop()!);
    a.tokens = Math.max(a.tokens, tokens);
    return true;
  }

  /** Frees everything the owner holds. Returns false if it held nothing (so double frees are harmless). */
  release(owner: string): boolean {
    const a = this.owners.get(owner);
    if (!a) return false;
    this.owners.delete(owner);
    this.freeSlots.push(a.slot);
    for (let i = a.blocks.length - 1; i >= 0; i--) this.freeBlocks.push(a.blocks[i]);
    return true;
  }

  get(owner: string): KvAllocation {
    const a = this.owners.get(owner);
    if (!a) throw new Error(`KvAllocator: owner "${owner}" holds no KV`);
    return a;
  }

  has(owner: string): boolean {
    return this.owners.has(owner);
  }

  stats(): KvStats {
    let tokensReserved = 0;
    for (const a of this.owners.values()) tokensReserved += a.tokens;
    return {
      slotsTotal: this.slotsTotal,
      slotsInUse: this.slotsTotal - this.freeSlots.length,
      blocksTotal: this.blocksTotal,
      blocksInUse: this.blocksTotal - this.freeBlocks.length,
      blockSize: this.blockSize,
      tokensReserved,
    };
  }
}
