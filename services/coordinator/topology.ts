// The start-up check of a pipeline (docs/architecture.md, "Services", "KV lifecycle"): the shards, in the order given,
// must cover the decoder layers [0, L) exactly once, back to back, and serve one checkpoint. Errors name the shard (its
// address) and the gap or overlap, so a wrong --shards list or a mixed deployment is obvious from the message.
import type { ShardInfo } from '../../lib/rpc/shard-wire.js';

export interface StageDescription {
  address: string;
  info: ShardInfo;
}

export interface PipelineShape {
  numLayers: number;
  fingerprint: string;
  hiddenSize: number;
  vocabSize: number;
  /** KV: the smallest stage's slots, tokens per slot and total tokens. */
  kvSlots: number;
  kvSlotTokens: number;
  kvCapacityTokens: number;
  visualTokenBegin: number;
  visualTokenEnd: number;
  maxTopK: number;
}

export class TopologyError extends Error {
  override name = 'TopologyError';
}

export function checkTopology(stages: readonly StageDescription[], expectedLayers?: number): PipelineShape {
  if (stages.length === 0) throw new TopologyError('--shards: no shard addresses given');
  const first = stages[0];
  const numLayers = first.info.num_layers;
  if (expectedLayers !== undefined && numLayers !== expectedLayers)
    throw new TopologyError(
      `shard ${first.address} serves a model of ${numLayers} layers, but the coordinator's --model has ${expectedLayers} (num_hidden_layers)`,
    );
  let next = 0;
  for (const { address, info } of stages) {
    if (info.num_layers !== numLayers)
      throw new TopologyError(
        `shard ${address} reports num_layers ${info.num_layers}, shard ${first.address} reports ${numLayers}: not one model`,
      );
    if (info.model_fingerprint !== first.info.model_fingerprint)
      throw new TopologyError(
        `shard ${address} serves checkpoint ${info.model_fingerprint.slice(0, 16)}…, shard ${first.address} serves ` +
          `${first.info.model_fingerprint.slice(0, 16)}…: all stages must load the same model`,
      );
    if (info.layer_begin > next)
      throw new TopologyError(
        `gap: no shard serves layers [${next}, ${info.layer_begin}) (shard ${address} starts at layer ${info.layer_begin})`,
      );
    if (info.layer_begin < next)
      throw new TopologyError(
        `overlap: shard ${address} serves layers [${info.layer_begin}, ${info.layer_end}), but layers up to ${next} are already served by the shards before it`,
      );
    if (info.layer_end <= info.layer_begin)
      throw new TopologyError(`shard ${address} serves an empty layer range [${info.layer_begin}, ${info.layer_end})`);
    next = info.layer_end;
  }
  if (next !== numLayers)
    throw new TopologyError(
      `gap: no shard serves layers [${next}, ${numLayers}) (the last shard, ${stages[stages.length - 1].address}, ends at layer ${next})`,
    );
  const infos = stages.map((s) => s.info);
  const last = infos[infos.length - 1];
  return {
    numLayers,
    fingerprint: first.info.model_fingerprint,
    hiddenSize: first.info.hidden_size,
    vocabSize: last.vocab_size,
    kvSlots: Math.min(...infos.map((i) => i.kv_slots)),
    kvSlotTokens: Math.min(...infos.map((i) => i.kv_slot_tokens)),
    kvCapacityTokens: Math.min(...infos.map((i) => i.kv_capacity_tokens)),
    visualTokenBegin: last.visual_token_begin,
    visualTokenEnd: last.visual_token_end,
    maxTopK: last.max_top_k,
  };
}
