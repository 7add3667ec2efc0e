// Messages between the page (web/offline.js) and its service worker (web/sw.js). The page sends
// a ToWorker with a MessagePort; the worker answers on that port with the FromWorker of the same
// `type`.

/** What one walk of the app did (sw.js `walk`). Paths are URL paths, e.g. `/web/main.js`. */
export interface RefreshResult {
  /** Files fetched and kept (all of the app the walk reached). */
  files: number;
  /** Their size as the server said (Content-Length), in bytes. */
  bytes: number;
  /** Files whose cached copy was missing or of another version, and was rewritten. */
  updated: string[];
  /** References that turned out not to exist (404): skipped. */
  missing: string[];
}

export type ToWorker =
  /** Was this page's load answered from the cache (network down)? */
  | { type: 'hello' }
  /** Bring the cache up to date with the server (after an online load). */
  | { type: 'refresh' };

export type FromWorker =
  | { type: 'hello'; scheme: number; fromCache: boolean }
  | { type: 'refresh'; result: RefreshResult; error?: undefined }
  | { type: 'refresh'; error: string; result?: undefined };

/** window.__bitloraOffline: offline.js's state, for the page's tests and the curious. */
export interface OfflineState {
  /**
   * unsupported: no service workers here; registering; ready: the app is kept in this browser
   * (a reload works without the server); error: registration or the first fill failed.
   */
  state: 'unsupported' | 'registering' | 'ready' | 'error';
  /** This load was answered from the kept copy because the network failed. */
  fromCache: boolean;
  /** The last refresh's result (after an online load of an already controlled page). */
  refreshed: RefreshResult | null;
  error: string | null;
}
