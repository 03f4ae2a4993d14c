// Browser globals the page's modules use, for Node versions that lack them as globals
// (Node 18 has WebCrypto and CustomEvent only as modules or behind flags). Imported first by the
// Node-side tests; a no-op on Node 20 and later.
import { webcrypto } from 'node:crypto';

if (!globalThis.crypto) globalThis.crypto = webcrypto;
if (!globalThis.CustomEvent) {
  globalThis.CustomEvent = class CustomEvent extends Event {
    constructor(type, init = {}) {
      super(type, init);
      this.detail = init.detail ?? null;
    }
  };
}
