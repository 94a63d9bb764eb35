// GET /v1/models and /v1/models/{id} from GetModelInfo. Pure: no I/O.
import { modelNotFound } from './errors.js';
import type { ModelInfoMessage } from './generate-request.js';

export interface ModelObject {
  id: string;
  object: 'model';
  /** Unix seconds; the gateway's start (the checkpoint has no creation date). */
  created: number;
  owned_by: string;
  /** vLLM's field: the context in tokens (prompt + answer). */
  max_model_len: number;
}

export function modelObject(info: ModelInfoMessage, created: number): ModelObject {
  return {
    id: info.modelName,
    object: 'model',
    created,
    owned_by: 'emu3-serve',
    max_model_len: info.contextLength,
  };
}

export function modelList(info: ModelInfoMessage, created: number) {
  return { object: 'list' as const, data: [modelObject(info, created)] };
}

/** The one served model by id; any other id is 404 model_not_found. */
export function modelById(info: ModelInfoMessage, id: string, created: number): ModelObject {
  if (id !== info.modelName) throw modelNotFound(id, info.modelName);
  return modelObject(info, created);
}
