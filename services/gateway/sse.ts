// Server-sent events as OpenAI streams them: one `data: <json>` event per chunk, then `data: [DONE]`. An error after
// the stream has started is one `data: {"error": {...}}` event (the openai clients raise it) and no [DONE].
// JSON.stringify escapes every newline, so each event is a single data line.

export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  connection: 'keep-alive',
  // Proxies (nginx) would otherwise buffer the stream.
  'x-accel-buffering': 'no',
} as const;

export function sseEvent(payload: object): string {
  return `data: ${JSON.stringify(payload)}\n\n`;
}

export const SSE_DONE = 'data: [DONE]\n\n';
