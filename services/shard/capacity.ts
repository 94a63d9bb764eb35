// How much KV a stage holds (docs/architecture.md, "KV lifecycle"): `slots` slots of up to `slotTokens` positions each, sized at start from a
// byte budget. The arena keeps K and V for every layer of the stage in fp32 (in half for fp16 on the webgpu device).

export interface KvCapacityInput {
  /** Decoder layers of this stage. */
  layers: number;
  kvHeads: number;
  headDim: number;
  /** config max_position_embeddings: a slot can never hold more (rotary tables end there). */
  maxPositions: number;
  /** --kv-budget: bytes for the arena. */
  budgetBytes: number;
  /** --max-slots: upper bound on slots whatever the budget. */
  maxSlots: number;
  /** --slot-tokens: positions per slot (default: maxPositions). */
  slotTokens?: number;
  /** Bytes per K or V element: 4 (fp32, default), 2 for a half device arena (fp16 on webgpu). */
  elementBytes?: number;
}

export interface KvCapacity {
  slots: number;
  slotTokens: number;
  capacityTokens: number;
  bytesPerToken: number;
  /** Bytes the arena takes. */
  bytes: number;
}

export const DEFAULT_KV_BUDGET_BYTES = 2 * 2 ** 30;
export const DEFAULT_MAX_SLOTS = 64;

/** Throws naming the flag and the limit when the budget cannot hold one slot. */
export function kvCapacity(input: KvCapacityInput): KvCapacity {
  const bytesPerToken = 2 * input.layers * input.kvHeads * input.headDim * (input.elementBytes ?? 4);
  const slotTokens = input.slotTokens ?? input.maxPositions;
  if (!Number.isInteger(slotTokens) || slotTokens < 1 || slotTokens > input.maxPositions)
    throw new Error(
      `--slot-tokens ${slotTokens} must be an integer in [1, ${input.maxPositions}] (max_position_embeddings)`,
    );
  if (!Number.isInteger(input.maxSlots) || input.maxSlots < 1)
    throw new Error(`--max-slots ${input.maxSlots} must be an integer ≥ 1`);
  const slotBytes = slotTokens * bytesPerToken;
  const slots = Math.min(input.maxSlots, Math.floor(input.budgetBytes / slotBytes));
  if (slots < 1)
    throw new Error(
      `--kv-budget ${input.budgetBytes} bytes cannot hold one slot of ${slotTokens} tokens × ${bytesPerToken} bytes/token ` +
        `= ${slotBytes} bytes; raise --kv-budget or lower --slot-tokens`,
    );
  return { slots, slotTokens, capacityTokens: slots * slotTokens, bytesPerToken, bytes: slots * slotBytes };
}
