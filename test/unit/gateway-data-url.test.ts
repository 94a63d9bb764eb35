import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseImageUrl } from '../../services/gateway/data-url.js';
import { GatewayError } from '../../services/gateway/errors.js';

const bytes = Buffer.from([0, 1, 2, 250, 251, 252, 253, 254, 255, 62, 63]);

function refused(url: string, code: string, message: RegExp) {
  assert.throws(
    () => parseImageUrl(url, 'p'),
    (e: unknown) => {
      assert.ok(e instanceof GatewayError, `got ${e}`);
      assert.equal(e.status, 400);
      assert.equal(e.param, 'p');
      assert.equal(e.code, code);
      assert.match(e.message, message);
      return true;
    },
  );
}

test('base64 data: URLs decode to their bytes, with or without a media type or padding', () => {
  assert.deepEqual(parseImageUrl(`data:image/png;base64,${bytes.toString('base64')}`, 'p'), {
    data: bytes,
    mimeType: 'image/png',
  });
  assert.deepEqual(parseImageUrl(`data:;base64,${bytes.toString('base64')}`, 'p'), { data: bytes, mimeType: '' });
  assert.deepEqual(parseImageUrl(`DATA:Image/JPEG;name=a.jpg;base64,${bytes.toString('base64url')}`, 'p'), {
    data: bytes,
    mimeType: 'image/jpeg',
  });
  // line breaks inside the data (MIME-style base64) are ignored
  const wrapped = bytes.toString('base64').replace(/(.{4})/g, '$1\n');
  assert.deepEqual(parseImageUrl(`data:image/png;base64,${wrapped}`, 'p').data, bytes);
});

test('http(s) URLs are refused: the gateway downloads nothing', () => {
  refused('http://example.com/a.png', 'image_url_not_supported', /downloads nothing/);
  refused('HTTPS://example.com/a.png', 'image_url_not_supported', /data: URL/);
});

test('other malformed URLs are refused with the reason', () => {
  refused('file:///etc/passwd', 'invalid_image_url', /must be a data: URL/);
  refused('data:image/png;base64', 'invalid_image_url', /no ","/);
  refused('data:image/png,rawbytes', 'invalid_image_url', /base64/);
  refused('data:text/plain;base64,aGVsbG8=', 'invalid_image_url', /not an image/);
  refused('data:image/png;base64,', 'invalid_image_url', /no data/);
  refused('data:image/png;base64,ab$d', 'invalid_image_url', /not valid base64/);
  refused('data:image/png;base64,abcde', 'invalid_image_url', /not valid base64/);
  refused('data:image/png;base64,ab=', 'invalid_image_url', /not valid base64/);
});
