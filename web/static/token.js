// Development tokens (docs/PROTOCOL.md section 11):
//   v1.<uid>.<exp>.<hex(HMAC-SHA256(secret, "v1.<uid>.<exp>"))>
// For development only: whoever knows the secret can log in as anybody. Uses WebCrypto, which
// browsers offer in secure contexts (https, http://localhost, http://127.0.0.1) and Node has as
// globalThis.crypto.

/** The server's default development secret (`DEV_TOKEN_SECRET`). */
export const DEV_SECRET = 'dev-secret-change-me';

/**
 * Mints a token for `uid` valid until `exp` (Unix seconds; default: in 24 hours).
 * @returns {Promise<string>}
 */
export async function mintDevToken(secret, uid, exp) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) {
    throw new Error('WebCrypto is not available here (the page needs https or localhost)');
  }
  const e = exp ?? Math.floor(Date.now() / 1000) + 24 * 3600;
  const payload = `v1.${BigInt(uid)}.${e}`;
  const enc = new TextEncoder();
  const key = await subtle.importKey(
    'raw',
    enc.encode(secret),
    { name: 'HMAC', hash: 'SHA-256' },
    false,
    ['sign'],
  );
  const sig = new Uint8Array(await subtle.sign('HMAC', key, enc.encode(payload)));
  return `${payload}.${Array.from(sig, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}
