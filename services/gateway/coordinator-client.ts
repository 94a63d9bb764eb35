// The gateway's gRPC client of the coordinator: emu3.v1.Emu3 (Generate, GetModelInfo) and grpc.health.v1.
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { type ClientCredentials, clientSecurity, INTERNAL_RECONNECT } from '../../lib/rpc/client.js';
import { HEALTH_PROTO } from '../../lib/rpc/health.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import type { GenerateRequestMessage, GenerateResponseMessage, ModelInfoMessage } from './generate-request.js';

interface Emu3Stub extends grpc.Client {
  Generate(req: GenerateRequestMessage, opts: grpc.CallOptions): grpc.ClientReadableStream<GenerateResponseMessage>;
  GetModelInfo(
    req: object,
    meta: grpc.Metadata,
    opts: grpc.CallOptions,
    cb: (err: grpc.ServiceError | null, res: ModelInfoMessage) => void,
  ): grpc.ClientUnaryCall;
}

interface HealthStub extends grpc.Client {
  Check(
    req: { service: string },
    meta: grpc.Metadata,
    opts: grpc.CallOptions,
    cb: (err: grpc.ServiceError | null, res: { status: string }) => void,
  ): grpc.ClientUnaryCall;
}

export interface CoordinatorClientOptions {
  /** Largest request and answer message. */
  maxMessageBytes: number;
  /** The public API token (and TLS CA) to present to the coordinator. */
  credentials?: ClientCredentials;
}

export class CoordinatorClient {
  private readonly emu3: Emu3Stub;
  private readonly health: HealthStub;

  constructor(
    readonly address: string,
    opts: CoordinatorClientOptions,
  ) {
    const root = protoRoot();
    // camelCase names and proto3 defaults filled in (unset optionals stay unset on the request side).
    const pkg = protoLoader.loadSync([join(root, 'emu3/v1/emu3.proto'), join(root, HEALTH_PROTO)], {
      keepCase: false,
      defaults: true,
      oneofs: true,
      longs: Number,
      enums: String,
      bytes: Buffer,
      includeDirs: [root],
    });
    const loaded = grpc.loadPackageDefinition(pkg);
    const Emu3 = ((loaded.emu3 as grpc.GrpcObject).v1 as grpc.GrpcObject).Emu3 as grpc.ServiceClientConstructor;
    const Health = (((loaded.grpc as grpc.GrpcObject).health as grpc.GrpcObject).v1 as grpc.GrpcObject)
      .Health as grpc.ServiceClientConstructor;
    const security = clientSecurity(opts.credentials);
    const channel: grpc.ClientOptions = {
      'grpc.max_send_message_length': opts.maxMessageBytes,
      'grpc.max_receive_message_length': opts.maxMessageBytes,
      ...INTERNAL_RECONNECT,
      ...security.options,
    };
    const credentials = security.channel;
    this.emu3 = new Emu3(address, credentials, channel) as unknown as Emu3Stub;
    this.health = new Health(address, credentials, channel) as unknown as HealthStub;
  }

  generate(req: GenerateRequestMessage): grpc.ClientReadableStream<GenerateResponseMessage> {
    return this.emu3.Generate(req, {});
  }

  modelInfo(deadlineMs: number): Promise<ModelInfoMessage> {
    return new Promise((resolve, reject) => {
      this.emu3.GetModelInfo({}, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, res) =>
        err ? reject(err) : resolve(res),
      );
    });
  }

  /** The coordinator's grpc.health.v1 status for the whole server (''). */
  healthStatus(deadlineMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      this.health.Check({ service: '' }, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, res) =>
        err ? reject(err) : resolve(res.status),
      );
    });
  }

  close(): void {
    this.emu3.close();
    this.health.close();
  }
}
