// Histogram buckets (seconds, bytes-free base units as Prometheus asks). Latencies start below a millisecond: one
// decode step of a small model on a GPU takes about that long.

/** 0.25 ms … 60 s. */
export const LATENCY_BUCKETS = [
  0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
];

/** Whole requests: 1 ms … 10 min. */
export const REQUEST_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

/** Sequences in a micro-batch. */
export const BATCH_SEQUENCE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/** Tokens in a micro-batch (decodes count 1, prefill chunks their length). */
export const BATCH_TOKEN_BUCKETS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
