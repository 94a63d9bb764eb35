// Which decoder layers a shard serves: given directly (--layers A-B), or as stage I of N (--stage-index, --stages),
// split exactly as `emu3 up` splits them, so a shard that knows only its place in the pipeline (a LeaderWorkerSet
// worker: deploy/lws-entry.sh) serves the same range `up` would give it.
import type { Emu3Config } from '../lib/model/config.js';
import { UsageError } from './args.js';
import { splitLayers, stageCosts } from './system.js';

export interface LayerChoice {
  /** --layers, already parsed. */
  layers?: [number, number];
  stageIndex?: number;
  stages?: number;
}

export function chooseLayers(choice: LayerChoice, config: () => Emu3Config): [number, number] {
  const { layers, stageIndex, stages } = choice;
  const staged = stageIndex !== undefined || stages !== undefined;
  if (layers && staged) throw new UsageError('shard: give either --layers or --stage-index with --stages, not both');
  if (layers) return layers;
  if (!staged) throw new UsageError('shard: --layers (or --stage-index with --stages) is required');
  if (stageIndex === undefined || stages === undefined)
    throw new UsageError('shard: --stage-index and --stages go together');
  if (stageIndex >= stages)
    throw new UsageError(`shard: --stage-index ${stageIndex} must be below --stages ${stages} (stages count from 0)`);
  const c = config();
  if (stages > c.numHiddenLayers)
    throw new UsageError(`shard: --stages ${stages} must be at most the model's ${c.numHiddenLayers} layers`);
  return splitLayers(c.numHiddenLayers, stages, stageCosts(c))[stageIndex];
}
