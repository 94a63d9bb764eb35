/** A problem with a model or VQ directory: the message always names the file (and the tensor, if any). */
export class CheckpointError extends Error {
  override name = 'CheckpointError';
}
