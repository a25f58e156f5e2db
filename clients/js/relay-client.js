// Relay's JavaScript client: one ES module, no build step, no dependencies.
//
// It keeps one WebSocket to a relay node alive for as long as the app wants it:
// reconnects forever with full-jitter backoff, resumes from the last id it handed to
// the app (`since=`), drops repeats by id, and stops only when a close code from the
// server says so (4000-4499). The rules are the ones of docs/client.md, the same as the
// Python and .NET clients follow.
//
//   import { RelayClient } from "http://relay-node:8080/client/relay-client.js";
//   const client = new RelayClient({ url: "ws://relay-node:8080", clientId: "cml",
//                                    token: async () => fetchToken(), store: localStorage });
//   client.on("message", (msg) => render(msg.event, msg.data));   // id, biz_id, event, data, ts
//   client.on("connected", (welcome) => { if (welcome.recovered === false) reload(); });
//   client.on("disconnected", ({ code, reason, willReconnect }) => {});
//   client.start();
//
// In Node, pass the `ws` package's class: new RelayClient({ ..., WebSocket: (await import("ws")).WebSocket }).

export const VERSION = "0.1.0";

const SUBPROTOCOL = { json: "relay.v1.json", msgpack: "relay.v1.msgpack" };
const AT_ONCE_JITTER = 0.25; // most seconds an "at once" reconnect waits (a drained node's clients do not herd)
const ACK_INTERVAL = 0.25; // least seconds between two ack frames (the node rate-limits inbound frames)
const ABNORMAL = 1006; // a connection that ended without a close frame, or never opened
const STOPPED = 1000;

// -- ids: Redis stream ids `<ms>-<seq>`, compared as integer pairs, never as strings ----

/** Parse `<ms>-<seq>` (or `<ms>`) into a pair of BigInts; throws on anything else. */
export function parseId(id) {
  const match = /^(\d{1,20})(?:-(\d{1,20}))?$/.exec(String(id));
  if (!match) throw new TypeError(`not a stream id: ${id}`);
  return [BigInt(match[1]), BigInt(match[2] ?? "0")];
}

/** -1, 0 or 1 as stream id `a` is before, equal to or after `b` (`9-0` < `10-0`). */
export function compareIds(a, b) {
  const [x, y] = [parseId(a), parseId(b)];
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  if (x[1] !== y[1]) return x[1] < y[1] ? -1 : 1;
  return 0;
}

// -- pure decisions (exported for tests) --------------------------------------------------

/**
 * What to do after a connection ended with `code`: "stop", "at_once", "backoff" or
 * "long_backoff". `canRenew`: a token function exists and a fresh token is worth trying.
 */
export function planReconnect(code, { canRenew = false } = {}) {
  if (code === 4500) return canRenew ? "at_once" : "stop"; // token expired
  if (code === 4001 && canRenew) return "backoff"; // invalid token: one more, fresh one
  if (code >= 4000 && code <= 4499) return "stop"; // replaced, bad token, wrong client_id
  if (code === 1012 || (code >= 4500 && code <= 4999)) return "at_once"; // draining; resume
  if (code === 1008) return "long_backoff"; // abuse or rate limit
  return "backoff";
}

/**
 * Seconds to wait before the next connect. `attempt` counts failed connects since the
 * last welcome: "at once" is at once only for the first one, so a node that keeps
 * answering 1012 gets ordinary backoff, not a tight loop.
 */
export function reconnectDelay(action, attempt, base, cap, random = Math.random) {
  if (action === "at_once" && attempt === 0) return random() * Math.min(AT_ONCE_JITTER, cap);
  if (action === "long_backoff") return cap / 2 + (random() * cap) / 2;
  return random() * Math.min(cap, base * 2 ** Math.min(attempt, 62));
}

/** `{url}/ws/{clientId}?token=…&since=…&attempt=…`; `url` may already end in `/ws/{clientId}`. */
export function connectUrl(url, clientId, { token, since, attempt } = {}) {
  const target = new URL(url);
  const path = target.pathname.replace(/\/+$/, "");
  const tail = `/ws/${encodeURIComponent(clientId)}`;
  if (!path.endsWith(tail)) target.pathname = path + tail;
  for (const [name, value] of [["token", token], ["since", since], ["attempt", attempt]]) {
    if (value != null && value !== "") target.searchParams.set(name, value);
  }
  return target.toString();
}

// -- MessagePack: the subset Relay's frames use, both ways --------------------------------

const utf8Decoder = new TextDecoder();
const utf8Encoder = new TextEncoder();

/** Decode one MessagePack value. Integers beyond 2^53 come back as BigInt. */
export function unpack(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let pos = 0;
  const need = (n) => {
    if (pos + n > buf.length) throw new RangeError("truncated MessagePack");
  };
  const str = (n) => {
    need(n);
    const s = utf8Decoder.decode(buf.subarray(pos, pos + n));
    pos += n;
    return s;
  };
  const bin = (n) => {
    need(n);
    const b = new Uint8Array(buf.subarray(pos, pos + n)); // a copy, a plain Uint8Array
    pos += n;
    return b;
  };
  const big = (v) => (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);
  const array = (n) => {
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = value();
    return out;
  };
  const map = (n) => {
    const out = {};
    for (let i = 0; i < n; i++) {
      const key = String(value());
      // Defined, not assigned: a "__proto__" key is data (as JSON.parse keeps it), not a
      // new prototype for the object.
      Object.defineProperty(out, key, { value: value(), enumerable: true, writable: true, configurable: true });
    }
    return out;
  };
  const ext = (n) => {
    need(1 + n);
    const type = view.getInt8(pos);
    pos += 1;
    return { type, data: bin(n) };
  };
  function value() {
    need(1);
    const b = buf[pos++];
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if ((b & 0xf0) === 0x80) return map(b & 0x0f);
    if ((b & 0xf0) === 0x90) return array(b & 0x0f);
    if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
    const fixed = (n, read) => {
      need(n);
      const v = read(pos);
      pos += n;
      return v;
    };
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(fixed(1, (p) => view.getUint8(p)));
      case 0xc5: return bin(fixed(2, (p) => view.getUint16(p)));
      case 0xc6: return bin(fixed(4, (p) => view.getUint32(p)));
      case 0xc7: return ext(fixed(1, (p) => view.getUint8(p)));
      case 0xc8: return ext(fixed(2, (p) => view.getUint16(p)));
      case 0xc9: return ext(fixed(4, (p) => view.getUint32(p)));
      case 0xca: return fixed(4, (p) => view.getFloat32(p));
      case 0xcb: return fixed(8, (p) => view.getFloat64(p));
      case 0xcc: return fixed(1, (p) => view.getUint8(p));
      case 0xcd: return fixed(2, (p) => view.getUint16(p));
      case 0xce: return fixed(4, (p) => view.getUint32(p));
      case 0xcf: return big(fixed(8, (p) => view.getBigUint64(p)));
      case 0xd0: return fixed(1, (p) => view.getInt8(p));
      case 0xd1: return fixed(2, (p) => view.getInt16(p));
      case 0xd2: return fixed(4, (p) => view.getInt32(p));
      case 0xd3: return big(fixed(8, (p) => view.getBigInt64(p)));
      case 0xd4: return ext(1);
      case 0xd5: return ext(2);
      case 0xd6: return ext(4);
      case 0xd7: return ext(8);
      case 0xd8: return ext(16);
      case 0xd9: return str(fixed(1, (p) => view.getUint8(p)));
      case 0xda: return str(fixed(2, (p) => view.getUint16(p)));
      case 0xdb: return str(fixed(4, (p) => view.getUint32(p)));
      case 0xdc: return array(fixed(2, (p) => view.getUint16(p)));
      case 0xdd: return array(fixed(4, (p) => view.getUint32(p)));
      case 0xde: return map(fixed(2, (p) => view.getUint16(p)));
      case 0xdf: return map(fixed(4, (p) => view.getUint32(p)));
      default: throw new TypeError(`MessagePack type 0x${b.toString(16)} is not valid`);
    }
  }
  const result = value();
  if (pos !== buf.length) throw new RangeError("trailing bytes after MessagePack value");
  return result;
}

/** Encode a map of short strings (the client's own frames: ping, ack) as MessagePack. */
export function packStringMap(obj) {
  const out = [];
  const entries = Object.entries(obj);
  if (entries.length > 15) throw new RangeError("too many keys");
  out.push(0x80 | entries.length);
  for (const [key, val] of entries) {
    for (const s of [key, String(val)]) {
      const bytes = utf8Encoder.encode(s);
      if (bytes.length > 255) throw new RangeError("string too long");
      if (bytes.length <= 31) out.push(0xa0 | bytes.length);
      else out.push(0xd9, bytes.length);
      out.push(...bytes);
    }
  }
  return new Uint8Array(out);
}

// -- the client ----------------------------------------------------------------------------

function randomName() {
  const bytes = new Uint8Array(9);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  let text = "";
  for (const b of bytes) text += "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"[b & 63];
  return text;
}

/**
 * A reconnecting, resuming client of one `clientId`.
 *
 * Options: `url` (the node or load balancer, `ws://…`/`wss://…`), `clientId`, `token`
 * (a string, or a function returning one or a promise of one: asked before every
 * connect), `store` (localStorage-like `getItem`/`setItem`, or null: where the cursor
 * survives a reload), `storeKey`, `since` (start after this id when the store has none),
 * `WebSocket` (the class; default the global one), `format` ("json" or "msgpack"),
 * `backoffBase`/`backoffMax` (seconds, 0.5 / 30), `connectTimeout` (10 s),
 * `pingInterval` (25 s; 0 turns pings off), `pongTimeout` (10 s), `ack` (true),
 * `maxQueue` (10000: received messages the app has not handled yet; past it the client
 * lets go of the connection and resumes once the app has caught up to half).
 */
export class RelayClient {
  constructor(options = {}) {
    const {
      url,
      clientId,
      token = null,
      store = null,
      storeKey = null,
      since = null,
      WebSocket: Socket = globalThis.WebSocket,
      format = "json",
      backoffBase = 0.5,
      backoffMax = 30,
      connectTimeout = 10,
      pingInterval = 25,
      pongTimeout = 10,
      ack = true,
      maxQueue = 10000,
    } = options;
    if (!url) throw new TypeError("url is required (ws://host:port or wss://…)");
    if (typeof clientId !== "string" || !/^[A-Za-z0-9_.:@-]{1,128}$/.test(clientId)) {
      throw new TypeError("clientId must be 1-128 of A-Z a-z 0-9 _ . : @ -");
    }
    if (typeof Socket !== "function") {
      throw new TypeError("no WebSocket class: in Node pass the 'ws' package's as option WebSocket");
    }
    if (!(format in SUBPROTOCOL)) throw new TypeError('format must be "json" or "msgpack"');
    if (!(backoffBase > 0 && backoffMax > 0 && connectTimeout > 0 && maxQueue >= 1)) {
      throw new RangeError("backoff, timeouts and maxQueue must be positive");
    }
    this.url = url;
    this.clientId = clientId;
    this.format = format;
    this._token = token;
    this._Socket = Socket;
    this._store = store;
    this._storeKey = storeKey ?? `relay:${clientId}:last_id`;
    this._backoff = [backoffBase, backoffMax];
    this._connectTimeout = connectTimeout;
    this._pingInterval = pingInterval;
    this._pongTimeout = pongTimeout;
    this._autoAck = ack;
    this._maxQueue = maxQueue;
    this._behind = false; // let go of the connection until the app catches up
    this._listeners = { message: [], connected: [], disconnected: [], error: [] };
    this._instance = randomName(); // names this client object in `attempt=`
    this._attempts = 0; // handshakes made (attempt=<instance>.<n>)
    this._failures = 0; // connects since the last welcome (backoff exponent)
    this._renewedFor4001 = false;
    this._ackWanted = null; // the newest id to ack (sent coalesced, again after a reconnect)
    this._conn = null; // the current connection's state
    this._timer = null; // the pending reconnect
    this._started = false;
    this._stopped = false;
    this._queue = []; // what the app has still to be told, in order
    this._delivering = false;

    /** The last welcome frame (`recovered`, `replayed`, `last_id`, `node`, …), or null. */
    this.welcome = null;
    /** Messages dropped because their id was at or below one already received. */
    this.duplicates = 0;
    /** Connections that got their welcome. */
    this.connects = 0;
    /** The close that stopped the client for good (`{ code, reason }`), or null. */
    this.error = null;

    let stored = null;
    try {
      stored = store ? store.getItem(this._storeKey) : null;
    } catch {
      stored = null; // storage refused (private mode, quota): start as if empty
    }
    const first = stored ?? since;
    this._cursor = first && this._valid(first) ? String(first) : null; // last id handled by the app
    this._seen = this._cursor; // newest id received (handled or still queued)
  }

  /** The id the app has handled last (what a reload resumes after), or null. */
  get lastId() {
    return this._cursor;
  }

  /** True while a welcomed connection is open. */
  get connected() {
    return Boolean(this._conn?.welcomed);
  }

  /** True once stopped: by stop(), or by the server for good. */
  get stopped() {
    return this._stopped;
  }

  /**
   * Add a handler: "message" (the message frame), "connected" (the welcome frame),
   * "disconnected" (`{ code, reason, willReconnect }`), "error" (a handler's exception, or
   * a server `error` frame). Handlers run one at a time, in order; a handler that returns
   * a promise is awaited before the next message, and the cursor moves past a message
   * only once its handlers returned (at least once to the app).
   */
  on(event, fn) {
    if (!(event in this._listeners)) throw new TypeError(`unknown event: ${event}`);
    if (typeof fn !== "function") throw new TypeError("handler must be a function");
    this._listeners[event].push(fn);
    return this;
  }

  off(event, fn) {
    const list = this._listeners[event];
    const at = list ? list.indexOf(fn) : -1;
    if (at >= 0) list.splice(at, 1);
    return this;
  }

  /** Start connecting; returns at once. */
  start() {
    if (this._stopped) throw new Error("the client is stopped; make a new one");
    if (this._started) return this;
    this._started = true;
    this._connect();
    return this;
  }

  /** Send the pending ack, close (1000) and stop for good. Resolves once the socket closed. */
  stop() {
    if (this._stopped) return Promise.resolve();
    this._stopped = true;
    clearTimeout(this._timer);
    this._timer = null;
    this._queue.length = 0;
    const conn = this._conn;
    if (!conn) return Promise.resolve();
    this._sendAck(conn, true);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(give);
        resolve();
      };
      const give = setTimeout(() => {
        this._end(conn, STOPPED, "stopped by the app");
        resolve();
      }, 2000);
      conn.onEnd = done;
      try {
        conn.ws.close(STOPPED, "client stopped");
      } catch {
        this._end(conn, STOPPED, "stopped by the app");
      }
    });
  }

  /** Tell the server `id` was processed. Done for you after each message unless `ack: false`. */
  ack(id) {
    if (!this._valid(id)) throw new TypeError(`not a stream id: ${id}`);
    if (this._ackWanted == null || compareIds(id, this._ackWanted) > 0) this._ackWanted = String(id);
    if (this._conn?.welcomed) this._scheduleAck(this._conn);
  }

  // -- connecting ------------------------------------------------------------------------

  _valid(id) {
    try {
      parseId(id);
      return true;
    } catch {
      return false;
    }
  }

  async _connect() {
    this._timer = null;
    if (this._stopped) return;
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (err) {
      this._report(err);
      this._after(null, ABNORMAL, "token function failed", "backoff");
      return;
    }
    if (this._stopped) return;
    this._attempts += 1;
    const url = connectUrl(this.url, this.clientId, {
      token,
      since: this._seen,
      attempt: `${this._instance}.${this._attempts}`,
    });
    let ws;
    try {
      ws = new this._Socket(url, [SUBPROTOCOL[this.format]]);
    } catch (err) {
      this._report(err);
      this._after(null, ABNORMAL, "connect failed", "backoff");
      return;
    }
    ws.binaryType = "arraybuffer";
    const conn = {
      ws,
      welcomed: false,
      ended: false,
      heard: Date.now(),
      welcomeTimer: null,
      pingTimer: null,
      pingAt: 0, // when the last ping went out
      ackSent: null,
      ackTimer: null,
      ackAt: 0,
      onEnd: null,
    };
    this._conn = conn;
    conn.welcomeTimer = setTimeout(
      () => this._abandon(conn, "no welcome from the server"),
      this._connectTimeout * 1000,
    );
    ws.onmessage = (ev) => this._onData(conn, ev.data);
    ws.onclose = (ev) => this._end(conn, ev.code || ABNORMAL, ev.reason || "");
    ws.onerror = () => {}; // a close event follows; browsers say no more than that
  }

  /** Give up on a connection that is silent (no welcome, or no pong): close it and move on. */
  _abandon(conn, reason, code = ABNORMAL) {
    if (conn.ended) return;
    try {
      conn.ws.close();
    } catch {
      // already closing
    }
    this._end(conn, code, reason);
  }

  /** A connection ended (once): tell the app, decide, and schedule the next connect. */
  _end(conn, code, reason) {
    if (conn.ended) return;
    conn.ended = true;
    clearTimeout(conn.welcomeTimer);
    clearTimeout(conn.pingTimer);
    clearTimeout(conn.ackTimer);
    // Late events of this socket are ignored. `ws` (Node) throws on an "error" event
    // nobody listens to, so a no-op stays in place of the error handler.
    conn.ws.onmessage = conn.ws.onclose = null;
    conn.ws.onerror = () => {};
    if (this._conn === conn) this._conn = null;
    if (conn.onEnd) conn.onEnd();
    if (this._stopped) {
      this._emitNow("disconnected", { code, reason, willReconnect: false });
      return;
    }
    if (conn.welcomed) this._failures = 0;
    let canRenew = typeof this._token === "function";
    if (code === 4001) {
      // A fresh token is asked before every connect; a second 4001 without a welcome
      // in between is final.
      canRenew = canRenew && !this._renewedFor4001;
      this._renewedFor4001 = true;
    }
    this._after(conn, code, reason, planReconnect(code, { canRenew }));
  }

  _after(conn, code, reason, action) {
    if (action === "stop") {
      this._stopped = true;
      this.error = { code, reason };
      this._enqueue({ kind: "disconnected", value: { code, reason, willReconnect: false } });
      return;
    }
    this._enqueue({ kind: "disconnected", value: { code, reason, willReconnect: true } });
    if (this._behind) return; // _deliver reconnects once the app caught up
    const delay = reconnectDelay(action, this._failures, ...this._backoff);
    this._failures += 1;
    this._timer = setTimeout(() => this._connect(), delay * 1000);
  }

  // -- frames ----------------------------------------------------------------------------

  _onData(conn, data) {
    if (conn.ended) return;
    conn.heard = Date.now();
    let frame;
    try {
      frame = typeof data === "string" ? JSON.parse(data) : unpack(new Uint8Array(data));
    } catch (err) {
      this._report(new Error(`undecodable frame: ${err.message}`));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (!conn.welcomed) {
      if (frame.type !== "welcome") {
        this._abandon(conn, "first frame was not a welcome", 1002);
        return;
      }
      this._onWelcome(conn, frame);
      return;
    }
    if (frame.type === "message") this._onMessage(frame);
    else if (frame.type === "welcome") this._onWelcome(conn, frame);
    else if (frame.type === "error") this._report(frame);
    // "pong" and types of later protocol versions need nothing beyond the sign of life.
  }

  _onWelcome(conn, frame) {
    conn.welcomed = true;
    this._renewedFor4001 = false;
    clearTimeout(conn.welcomeTimer);
    this.welcome = frame;
    this.connects += 1;
    // With nothing replayed, `last_id` is the head of history: a safe place to resume from.
    if (!frame.replayed && this._valid(frame.last_id)) {
      if (this._seen == null || compareIds(frame.last_id, this._seen) > 0) {
        this._seen = frame.last_id;
        this._enqueue({ kind: "cursor", value: frame.last_id });
      }
    }
    conn.ackSent = null; // the new session has no ack on record yet
    if (this._ackWanted != null) this._scheduleAck(conn);
    this._startPings(conn);
    this._enqueue({ kind: "connected", value: frame });
  }

  _onMessage(frame) {
    if (!this._valid(frame.id)) {
      this._report(new Error("message without a valid id"));
      return;
    }
    if (this._seen != null && compareIds(frame.id, this._seen) <= 0) {
      this.duplicates += 1;
      return;
    }
    this._seen = frame.id;
    this._enqueue({ kind: "message", value: frame });
    if (this._queue.length >= this._maxQueue && this._conn && !this._behind) {
      // Back-pressure: what is queued stays; the rest is replayed from `since` later.
      this._behind = true;
      this._abandon(this._conn, "the app is behind: paused until it catches up", STOPPED);
    }
  }

  /**
   * Ping a quiet server; drop the connection when a ping stays unanswered for
   * `pongTimeout`. Judged from the ping actually sent, not from the clock alone: a
   * background tab's timers may run once a minute, and a late tick must not read as a
   * dead server.
   */
  _startPings(conn) {
    const every = this._pingInterval * 1000;
    const patience = this._pongTimeout * 1000;
    if (!(every > 0)) return;
    const tick = () => {
      if (conn.ended) return;
      const now = Date.now();
      if (conn.pingAt && conn.heard < conn.pingAt) {
        if (now - conn.pingAt >= patience) {
          this._abandon(conn, "no answer from the server");
          return;
        }
      } else if (now - conn.heard >= every) {
        conn.pingAt = now;
        this._send(conn, { type: "ping" });
      }
      conn.pingTimer = setTimeout(tick, Math.min(every, patience) / 2);
    };
    conn.pingTimer = setTimeout(tick, every / 2);
  }

  _send(conn, frame) {
    try {
      conn.ws.send(this.format === "msgpack" ? packStringMap(frame) : JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _scheduleAck(conn) {
    if (conn.ackTimer != null || conn.ended) return;
    const wait = Math.max(0, conn.ackAt + ACK_INTERVAL * 1000 - Date.now());
    conn.ackTimer = setTimeout(() => {
      conn.ackTimer = null;
      this._sendAck(conn, false);
    }, wait);
  }

  _sendAck(conn, now) {
    const id = this._ackWanted;
    if (id == null || !conn.welcomed || conn.ended) return;
    if (conn.ackSent != null && compareIds(id, conn.ackSent) <= 0) return;
    if (!now && Date.now() - conn.ackAt < ACK_INTERVAL * 1000) {
      this._scheduleAck(conn);
      return;
    }
    if (this._send(conn, { type: "ack", id })) {
      conn.ackSent = id;
      conn.ackAt = Date.now();
    }
  }

  // -- telling the app, in order ---------------------------------------------------------

  _enqueue(item) {
    this._queue.push(item);
    if (!this._delivering) this._deliver();
  }

  async _deliver() {
    this._delivering = true;
    try {
      while (this._queue.length) {
        const item = this._queue.shift();
        if (item.kind === "cursor") {
          this._advance(item.value);
          continue;
        }
        await this._emit(item.kind, item.value);
        if (item.kind === "message") {
          this._advance(item.value.id);
          if (this._autoAck) this.ack(item.value.id);
        }
        if (this._behind && this._queue.length <= this._maxQueue / 2) {
          this._behind = false;
          if (!this._stopped && !this._conn && this._timer == null) this._connect();
        }
      }
    } finally {
      this._delivering = false;
    }
  }

  _advance(id) {
    if (this._cursor != null && compareIds(id, this._cursor) <= 0) return;
    this._cursor = id;
    if (!this._store) return;
    try {
      this._store.setItem(this._storeKey, id);
    } catch (err) {
      this._report(err);
    }
  }

  async _emit(event, value) {
    for (const fn of [...this._listeners[event]]) {
      try {
        await fn(value);
      } catch (err) {
        this._report(err);
      }
    }
  }

  _emitNow(event, value) {
    this._emit(event, value);
  }

  _report(err) {
    const handlers = this._listeners.error;
    if (!handlers.length) {
      console.warn("relay-client:", err);
      return;
    }
    for (const fn of [...handlers]) {
      try {
        fn(err);
      } catch {
        // an error handler's own error has nowhere left to go
      }
    }
  }
}
