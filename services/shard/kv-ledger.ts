// The shard's account of its KV arena: positions held per slot, mirrored on the main thread so that requests are
// checked (and Info answered) without asking the worker. Every change the worker makes is applied here in the same
// order: prefix copies, the positions a micro-batch writes, frees.

/** gRPC status codes a refusal carries (StageError.status_code). */
export const INVALID_ARGUMENT = 3;
export const RESOURCE_EXHAUSTED = 8;
export const FAILED_PRECONDITION = 9;

/** A request (or one item of it) this stage cannot run; `code` is the gRPC status the request should end with. */
export class ShardRequestError extends Error {
  override name = 'ShardRequestError';
  constructor(
    message: string,
    readonly code: number = INVALID_ARGUMENT,
  ) {
    super(message);
  }
}

export class KvLedger {
  private readonly filled: number[];

  constructor(
    readonly slots: number,
    readonly slotTokens: number,
    filled?: readonly number[],
  ) {
    this.filled = filled ? [...filled] : new Array<number>(slots).fill(0);
  }

  clone(): KvLedger {
    return new KvLedger(this.slots, this.slotTokens, this.filled);
  }

  /** Positions held by `slot`. */
  held(slot: number): number {
    return this.filled[slot];
  }

  get tokensInUse(): number {
    return this.filled.reduce((a, b) => a + b, 0);
  }

  get slotsInUse(): number {
    return this.filled.filter((n) => n > 0).length;
  }

  checkSlot(slot: number, what: string): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.slots)
      throw new ShardRequestError(`${what} ${slot} is out of range [0, ${this.slots}) (kv_slots)`);
  }

  /** Throws unless `to` can take the first `length` positions of `from`. */
  checkCopy(from: number, to: number, length: number, what: string): void {
    this.checkSlot(from, `${what}.from_slot`);
    this.checkSlot(to, `${what}.to_slot`);
    if (from === to) throw new ShardRequestError(`${what}: from_slot and to_slot are both ${from}`);
    if (!Number.isInteger(length) || length < 0)
      throw new ShardRequestError(`${what}.length ${length} must be an integer ≥ 0`);
    if (length > this.filled[from])
      throw new ShardRequestError(
        `${what}.length ${length} exceeds the ${this.filled[from]} positions slot ${from} holds`,
        FAILED_PRECONDITION,
      );
  }

  /** `to` then holds the first `length` positions of `from`. */
  copy(from: number, to: number, length: number, what: string): void {
    this.checkCopy(from, to, length, what);
    this.filled[to] = length;
  }

  /** A run wrote positions [start, start + count) of `slot`; later positions no longer count. */
  write(slot: number, start: number, count: number): void {
    this.filled[slot] = start + count;
  }

  free(slot: number, what: string): void {
    this.checkSlot(slot, what);
    this.filled[slot] = 0;
  }

  reset(): void {
    this.filled.fill(0);
  }
}
