// The coordinator's KV state (the one place it lives): every stage holds KV for its own layers of every live
// sequence and cached prefix, in a fixed number of slots of up to `slotTokens` positions each, and at most `tokens`
// positions in all. So the pipeline's budget is the smallest stage's slots and tokens. An owner (a sequence or a
// cached prefix) holds one slot and reserves the positions it may fill (prompt + max_new_tokens for a sequence, its
// length for a prefix); the sum of reservations never exceeds the budget, so no shard is ever over-committed and
// nothing is preempted. Slots and positions are what the shards honour: there is no block bookkeeping. Pure.

/** What a shard's Info reports about its KV arena. */
export interface ShardKvCapacity {
  /** Sequences (or cached prefixes) the arena can hold at once. */
  slots: number;
  /** Positions of KV the arena can hold, summed over all slots. */
  tokens: number;
}

/** The capacity every stage can honour: the minimum over the shards. */
export function commonCapacity(shards: readonly ShardKvCapacity[]): ShardKvCapacity {
  if (shards.length === 0) throw new Error('commonCapacity: no shards (need at least one Info)');
  return {
    slots: Math.min(...shards.map((s) => s.slots)),
    tokens: Math.min(...shards.map((s) => s.tokens)),
  };
}

export interface KvHolding {
  slot: number;
  tokens: number;
}

export interface KvStats {
  slotsTotal: number;
  slotsInUse: number;
  tokensTotal: number;
  tokensReserved: number;
}

export class KvManager {
  readonly slotsTotal: number;
  readonly tokensTotal: number;
  private readonly free: Set<number>;
  private readonly owners = new Map<string, KvHolding>();
  private reserved = 0;

  constructor(capacity: ShardKvCapacity) {
    if (!Number.isInteger(capacity.slots) || capacity.slots < 0)
      throw new Error(`KvManager: slots ${capacity.slots} must be a non-negative integer`);
    if (!Number.isInteger(capacity.tokens) || capacity.tokens < 0)
      throw new Error(`KvManager: tokens ${capacity.tokens} must be a non-negative integer`);
    this.slotsTotal = capacity.slots;
    this.tokensTotal = capacity.tokens;
    this.free = new Set(Array.from({ length: capacity.slots }, (_, i) => i));
  }

  /** Free slots, lowest first (the order the planner hands them out). */
  freeSlots(): number[] {
    return [...this.free].sort((a, b) => a - b);
  }

  get freeTokens(): number {
    return this.tokensTotal - this.reserved;
  }

  /** Whether `tokens` could ever be held (with nothing else reserved). */
  fitsAtAll(tokens: number): boolean {
    return this.slotsTotal > 0 && tokens <= this.tokensTotal;
  }

  /** Gives `owner` the free `slot` and reserves `tokens` positions. Throws on anything the planner must not do. */
  take(owner: string, slot: number, tokens: number): void {
    if (this.owners.has(owner))
      throw new Error(`KvManager: "${owner}" already holds slot ${this.owners.get(owner)!.slot}`);
    if (!this.free.has(slot)) throw new Error(`KvManager: slot ${slot} is not free (asked for by "${owner}")`);
    if (!Number.isInteger(tokens) || tokens < 0 || tokens > this.freeTokens)
      throw new Error(`KvManager: "${owner}" asks for ${tokens} positions, ${this.freeTokens} are free`);
    this.free.delete(slot);
    this.owners.set(owner, { slot, tokens });
    this.reserved += tokens;
  }

  /** Frees what the owner holds; returns it (undefined if it held nothing, so double frees are harmless). */
  release(owner: string): KvHolding | undefined {
    const h = this.owners.get(owner);
    if (!h) return undefined;
    this.owners.delete(owner);
    this.free.add(h.slot);
    this.reserved -= h.tokens;
    return h;
  }

  holding(owner: string): KvHolding | undefined {
    return this.owners.get(owner);
  }

  stats(): KvStats {
    return {
      slotsTotal: this.slotsTotal,
      slotsInUse: this.slotsTotal - this.free.size,
      tokensTotal: this.tokensTotal,
      tokensReserved: this.reserved,
    };
  }
}
