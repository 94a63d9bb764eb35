// The emu3.v1.GenerateRequest the gateway sends, as a plain object for @grpc/proto-loader with keepCase false (field
// names camelCase; an undefined optional field is unset, so the coordinator applies its own default).

export type GeneratePart = { text: string } | { image: { data: Buffer; mimeType: string } };

export interface GenerateSampling {
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  seed?: number;
  maxNewTokens?: number;
  stop?: string[];
  ignoreEos?: boolean;
}

export interface GenerateRequestMessage {
  parts: GeneratePart[];
  task: 'TASK_UNDERSTAND' | 'TASK_GENERATE_IMAGE';
  sampling: GenerateSampling;
  requestId: string;
  returnTokenIds: boolean;
  topLogprobs: number;
  /** TASK_GENERATE_IMAGE: the size in pixels (unset: the coordinator's default, 1:1 at the model's image_area). */
  image?: { width?: number; height?: number };
}

/** The Generate stream's messages as the client decodes them (defaults filled in, enums as names). */
export interface GenerateDelta {
  text: string;
  tokenIds: number[];
  logprobs: { tokenId: number; logprob: number; top: { tokenId: number; logprob: number }[] }[];
}

export interface GenerateFinal {
  finishReason: string;
  usage: { promptTokens: number; cachedTokens: number; completionTokens: number } | null;
  timings?: { queueMs: number; vqMs: number; ttftMs: number; decodeMs: number } | null;
  requestId: string;
  seed: number;
  stopString: string;
  /** TASK_GENERATE_IMAGE: the PNG. */
  image?: { png: Buffer; width: number; height: number } | null;
}

export interface GenerateResponseMessage {
  delta?: GenerateDelta | null;
  final?: GenerateFinal | null;
  /** An image's rows done (the gateway answers images whole, so it only waits through these). */
  progress?: { rowsDone: number; rows: number } | null;
}

/** GetModelInfo's answer, the fields the gateway reads. */
export interface ModelInfoMessage {
  modelName: string;
  modelFingerprint: string;
  vocabSize: number;
  contextLength: number;
  kvCapacityTokens: number;
  kvTokensInUse: number;
  limits?: { maxTopLogprobs: number; maxStopStrings: number; maxImages: number } | null;
}
