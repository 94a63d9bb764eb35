// emu3.internal.v1.ResultSink, served by the coordinator: the last stage keeps one Deliver stream open and sends one
// StepResult per micro-batch. Each result goes straight to the engine.
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from '../../lib/rpc/log.js';
import { serviceDefinition } from '../../lib/rpc/proto.js';
import type { ServiceBinding } from '../../lib/rpc/serve.js';
import { RESULT_SINK_SERVICE, SHARD_PROTO, type StepResult } from '../../lib/rpc/shard-wire.js';

export function resultSinkBinding(onResult: (r: StepResult) => void, log: Logger): ServiceBinding {
  const implementation: grpc.UntypedServiceImplementation = {
    Deliver: (call: grpc.ServerReadableStream<StepResult, unknown>, callback: grpc.sendUnaryData<unknown>) => {
      let received = 0;
      const peer = call.getPeer();
      log.info('result stream open', { peer });
      call.on('data', (r: StepResult) => {
        received++;
        try {
          onResult(r);
        } catch (err) {
          log.error('handling a StepResult failed', { microBatch: r.micro_batch_id, error: err });
        }
      });
      call.on('end', () => {
        log.info('result stream closed', { peer, received });
        callback(null, { received });
      });
      call.on('error', (err) => log.warn('result stream error', { peer, error: err }));
    },
  };
  return {
    name: RESULT_SINK_SERVICE,
    definition: serviceDefinition(SHARD_PROTO, RESULT_SINK_SERVICE),
    implementation,
  };
}
