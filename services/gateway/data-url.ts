// Images arrive inline as data: URLs (RFC 2397, base64). The gateway downloads nothing: an http(s) URL is refused
// with a message saying what to send instead. Pure: no I/O.
import { GatewayError } from './errors.js';

export interface InlineImage {
  data: Buffer;
  /** The media type of the URL ("image/png"); empty when the URL gives none (the service sniffs the bytes). */
  mimeType: string;
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
const BASE64URL = /^[A-Za-z0-9_-]*={0,2}$/;

function refuse(param: string, message: string, code = 'invalid_image_url'): never {
  throw new GatewayError(400, `${param}: ${message}`, { param, code });
}

/** Decodes `data:[image/*][;param=value]*;base64,<data>`; every refusal is a 400 naming `param`. */
export function parseImageUrl(url: string, param: string): InlineImage {
  if (/^https?:/i.test(url))
    refuse(
      param,
      'http(s) image URLs are not fetched (the gateway downloads nothing); send the image inline as a data: URL, ' +
        'e.g. "data:image/png;base64,iVBORw0..."',
      'image_url_not_supported',
    );
  if (!/^data:/i.test(url)) refuse(param, `must be a data: URL ("data:image/png;base64,..."), got "${preview(url)}"`);
  const comma = url.indexOf(',');
  if (comma < 0) refuse(param, 'data: URL has no "," before its data');
  const header = url.slice('data:'.length, comma).split(';');
  const mediaType = header[0].trim().toLowerCase();
  const params = header.slice(1).map((p) => p.trim().toLowerCase());
  if (params[params.length - 1] !== 'base64')
    refuse(param, 'data: URL must be base64-encoded (";base64," before the data)');
  if (mediaType !== '' && !/^image\/[\w.+-]+$/.test(mediaType))
    refuse(param, `data: URL media type "${mediaType}" is not an image/* type`);
  const payload = url.slice(comma + 1).replace(/\s+/g, '');
  if (payload.length === 0) refuse(param, 'data: URL holds no data');
  const unpadded = payload.replace(/=+$/, '');
  if (
    (!BASE64.test(payload) && !BASE64URL.test(payload)) ||
    unpadded.length % 4 === 1 ||
    (payload !== unpadded && payload.length % 4 !== 0)
  )
    refuse(param, 'data: URL data is not valid base64');
  const data = Buffer.from(payload, BASE64.test(payload) ? 'base64' : 'base64url');
  if (data.length === 0) refuse(param, 'data: URL decodes to no bytes');
  return { data, mimeType: mediaType };
}

function preview(s: string): string {
  return s.length > 40 ? `${s.slice(0, 40)}…` : s;
}
