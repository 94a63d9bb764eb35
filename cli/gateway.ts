// `emu3 gateway`: the OpenAI-compatible HTTP API (chat completions with images, models, image generation once the
// Generate API has it) in front of the coordinator. docs/openai.md has the mapping.

import { clientToken } from '../lib/rpc/auth.js';
import { createLogger } from '../lib/rpc/log.js';
import { DEFAULT_MAX_BODY_BYTES, startGateway } from '../services/gateway/server.js';
import { type CommandSpec, UsageError } from './args.js';
import type { Command } from './main.js';
import { authTokenFlag } from './security-flags.js';

const spec: CommandSpec = {
  name: 'gateway',
  summary: 'OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /v1/images/generations) over the coordinator',
  usage: 'emu3 gateway [--listen HOST:PORT] [--coordinator ADDR] [--model DIR] [flags]',
  flags: {
    listen: {
      help: 'HTTP address, host:port (port 0 picks a free one); clients use http://HOST:PORT/v1',
      default: '127.0.0.1:8080',
    },
    coordinator: { help: "the coordinator's public gRPC address", default: '127.0.0.1:50051' },
    model: {
      help: 'model directory (its tokenizer files): needed only for the token texts of logprobs; without it a request with logprobs is refused (default: none)',
    },
    'max-body-bytes': {
      help: 'largest request body (base64 images included); larger ones are answered 413',
      default: String(DEFAULT_MAX_BODY_BYTES),
    },
    'drain-timeout-ms': {
      help: 'on SIGTERM/SIGINT: new connections are refused, running answers may finish this long, then are cut',
      default: '10000',
    },
    'auth-token-file': {
      help: 'file of API keys (one a line, re-read on change): every route but /health needs "Authorization: Bearer <key>"; the first key (or $EMU3_AUTH_TOKEN) is also sent to the coordinator (default: none, no auth)',
    },
    'tls-cert': { help: 'PEM certificate: serve HTTPS (default: none, HTTP)' },
    'tls-key': { help: 'PEM private key of --tls-cert (default: none)' },
    'tls-ca': { help: "PEM CA to check the coordinator's TLS certificate against (default: plaintext gRPC)" },
  },
};

export const command: Command = {
  spec,
  async run(flags) {
    const log = createLogger('gateway');
    const cert = flags.string('tls-cert');
    const key = flags.string('tls-key');
    if ((cert === undefined) !== (key === undefined))
      throw new UsageError('gateway: --tls-cert and --tls-key go together');
    const authTokens = authTokenFlag(flags, 'gateway', log);
    const token = clientToken(flags.string('auth-token-file'));
    const ca = flags.string('tls-ca');
    const gateway = await startGateway({
      authTokens,
      coordinatorCredentials: { token, tls: ca === undefined ? undefined : { ca } },
      tls: cert && key ? { cert, key } : undefined,
      listen: flags.required('listen'),
      coordinator: flags.required('coordinator'),
      modelDir: flags.string('model'),
      maxBodyBytes: flags.int('max-body-bytes', 1024, 2 ** 31 - 1)!,
      drainTimeoutMs: flags.int('drain-timeout-ms', 0)!,
      log,
    });
    console.log(`emu3 gateway: OpenAI base URL ${gateway.baseUrl} (coordinator ${flags.required('coordinator')})`);
    const stop = () => void gateway.close();
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    await gateway.closed;
    return 0;
  },
};
