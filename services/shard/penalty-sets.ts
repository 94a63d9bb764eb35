// The last stage's penalised ids per KV slot (SamplingSide.penalised_ids are deltas since the previous sampled step,
// so a decode step carries one or two ids instead of the whole history). A set lives as long as its slot's KV: it is
// dropped when the slot is freed, on Reset, on an epoch change and on lease expiry; a prefix copy does not copy it.

export class PenaltySets {
  private readonly sets = new Map<number, Set<number>>();

  /**
   * The slot's set after `penalty_reset` (clear first) and adding `delta`, as the id list the sampling head takes.
   * Nothing is kept until `commit` (a batch that fails must not change the set).
   */
  preview(slot: number, reset: boolean, delta: readonly number[]): Set<number> {
    const held = reset ? undefined : this.sets.get(slot);
    const next = new Set(held);
    for (const id of delta) next.add(id);
    return next;
  }

  commit(slot: number, set: Set<number>): void {
    if (set.size === 0) this.sets.delete(slot);
    else this.sets.set(slot, set);
  }

  /** Ids held for `slot` (a copy). */
  held(slot: number): number[] {
    return [...(this.sets.get(slot) ?? [])];
  }

  drop(slot: number): void {
    this.sets.delete(slot);
  }

  clear(): void {
    this.sets.clear();
  }

  /** Slots that hold a set. */
  get size(): number {
    return this.sets.size;
  }
}
