// @matrixai/quic 2.0.9 peer for bench/quic.py (run by it; see bench/README.md).
//
//   node quic_peer.mjs server CERT.pem KEY.pem      -> "READY <port>", serves until stdin closes
//   node quic_peer.mjs client PORT MODE ARG [ARG2]
//       MODE bulk (ARG = bytes, then a time cap in seconds), rr / hs (ARG =
//       seconds), idle (ARG = count, then concurrency and a time limit)
//
// js-quic's defaults (its server always answers new clients with a Retry),
// except that the client does not verify the server and the logger is at
// WARN. Every stream: read to FIN, echo <= 1024 bytes, else reply with the
// length in decimal, then FIN.
import * as fs from 'node:fs';
import { webcrypto } from 'node:crypto';
import * as readline from 'node:readline';
import { QUICServer, QUICClient, QUICSocket, events } from '@matrixai/quic';
import Logger, { LogLevel } from '@matrixai/logger';

const HOST = '127.0.0.1';
const ECHO_LIMIT = 1024;
const logger = new Logger('bench', LogLevel.ERROR);

const keys = new Map();
async function hmacKey(raw) {
  let key = keys.get(raw);
  if (key === undefined) {
    key = await webcrypto.subtle.importKey(
      'raw', raw, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign', 'verify']);
    keys.set(raw, key);
  }
  return key;
}

const serverCrypto = {
  key: webcrypto.getRandomValues(new Uint8Array(32)).buffer,
  ops: {
    sign: async (key, data) => webcrypto.subtle.sign('HMAC', await hmacKey(key), data),
    verify: async (key, data, sig) =>
      webcrypto.subtle.verify('HMAC', await hmacKey(key), sig, data),
  },
};
const clientCrypto = {
  ops: {
    randomBytes: async (data) => {
      webcrypto.getRandomValues(new Uint8Array(data));
    },
  },
};
const clientConfig = { verifyPeer: false };

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const stdinLines = readline.createInterface({ input: process.stdin });
const lineWaiters = [];
let stdinClosed = false;
stdinLines.on('line', () => { const w = lineWaiters.shift(); if (w) w(); });
stdinLines.on('close', () => { stdinClosed = true; for (const w of lineWaiters.splice(0)) w(); });
const nextLine = () => new Promise((resolve) => {
  if (stdinClosed) resolve(); else lineWaiters.push(resolve);
});
const stdinEnd = () => new Promise((resolve) => {
  if (stdinClosed) resolve(); else stdinLines.on('close', resolve);
});

async function handleStream(stream) {
  let total = 0;
  const head = [];
  let headLen = 0;
  try {
    const reader = stream.readable.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (headLen <= ECHO_LIMIT) { head.push(value); headLen += value.byteLength; }
    }
    const reply = total <= ECHO_LIMIT ? Buffer.concat(head) : Buffer.from(String(total));
    const writer = stream.writable.getWriter();
    await writer.write(reply);
    await writer.close();
  } catch (e) {
    // A peer that went away; nothing to do.
  }
}

async function server(certPath, keyPath) {
  const quicServer = new QUICServer({
    crypto: serverCrypto,
    config: {
      key: fs.readFileSync(keyPath, 'utf8'),
      cert: fs.readFileSync(certPath, 'utf8'),
      verifyPeer: false,
    },
    logger,
  });
  quicServer.addEventListener(events.EventQUICServerConnection.name, (evt) => {
    const conn = evt.detail;
    conn.addEventListener(events.EventQUICConnectionStream.name, (sevt) => {
      void handleStream(sevt.detail);
    });
  });
  await quicServer.start({ host: HOST, port: 0 });
  process.stdout.write(`READY ${quicServer.port}\n`);
  await stdinEnd();
  await quicServer.stop({ force: true });
  process.exit(0);
}

async function connect(port, socket) {
  return QUICClient.createQUICClient({
    host: HOST, port, socket, crypto: clientCrypto, config: clientConfig, logger,
  });
}

async function readAll(stream) {
  const reader = stream.readable.getReader();
  const parts = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parts.push(value);
  }
  return Buffer.concat(parts);
}

async function bulk(port, size, maxSeconds) {
  const client = await connect(port);
  const stream = client.connection.newStream();
  const writer = stream.writable.getWriter();
  const chunk = new Uint8Array(1024 * 1024);
  const replyP = readAll(stream);
  const start = performance.now();
  const stop = start + maxSeconds * 1000;
  let sent = 0;
  while (sent < size && performance.now() < stop) {
    const n = Math.min(chunk.byteLength, size - sent);
    await writer.write(n === chunk.byteLength ? chunk : chunk.subarray(0, n));
    sent += n;
  }
  await writer.close();
  const reply = await replyP;
  const seconds = (performance.now() - start) / 1000;
  if (Number(reply.toString()) !== sent) throw new Error(`server got ${reply} of ${sent}`);
  emit({ bytes: sent, seconds, mib_s: sent / seconds / 2 ** 20, capped: sent < size });
  await client.destroy({ force: true });
}

async function roundTrips(port, seconds) {
  const client = await connect(port);
  const payload = Buffer.alloc(100, 0x42);
  let count = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  while (performance.now() < end) {
    const stream = client.connection.newStream();
    const writer = stream.writable.getWriter();
    await writer.write(payload);
    await writer.close();
    const reply = await readAll(stream);
    if (reply.length !== 100) throw new Error(`bad echo ${reply.length}`);
    count += 1;
  }
  const elapsed = (performance.now() - start) / 1000;
  emit({ count, seconds: elapsed, per_s: count / elapsed });
  await client.destroy({ force: true });
}

async function sharedSocket() {
  const socket = new QUICSocket({ logger });
  await socket.start({ host: HOST, port: 0 });
  return socket;
}

async function handshakes(port, seconds) {
  // One shared client socket, as polykey's client uses; destroy() waits out
  // the closing period, so it is not awaited before the next connect.
  const socket = await sharedSocket();
  const closing = [];
  let count = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  while (performance.now() < end) {
    const client = await connect(port, socket);
    closing.push(client.destroy({ force: true }).catch(() => {}));
    count += 1;
  }
  const elapsed = (performance.now() - start) / 1000;
  emit({ count, seconds: elapsed, per_s: count / elapsed });
  await Promise.race([Promise.all(closing), new Promise((r) => setTimeout(r, 5000))]);
}

async function idle(port, target, concurrency, limitSeconds) {
  const socket = await sharedSocket();
  const clients = [await connect(port, socket)];
  process.stdout.write('WARM\n');
  await nextLine();
  let connected = 0;
  let failed = 0;
  let next = 0;
  const start = performance.now();
  const stop = start + limitSeconds * 1000;
  async function worker() {
    while (next < target && performance.now() < stop) {
      next += 1;
      try {
        clients.push(await connect(port, socket));
        connected += 1;
      } catch (e) {
        failed += 1;
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  emit({ connected, failed, seconds: (performance.now() - start) / 1000 });
  await stdinEnd();
  process.exit(0);
}

const [role, ...rest] = process.argv.slice(2);
try {
  if (role === 'server') {
    await server(rest[0], rest[1]);
  } else {
    const port = Number(rest[0]);
    const mode = rest[1];
    const arg = Number(rest[2]);
    if (mode === 'bulk') await bulk(port, arg, Number(rest[3] ?? 60));
    else if (mode === 'rr') await roundTrips(port, arg);
    else if (mode === 'hs') await handshakes(port, arg);
    else if (mode === 'idle') await idle(port, arg, Number(rest[3] ?? 64), Number(rest[4] ?? 240));
    else throw new Error(`unknown mode ${mode}`);
    process.exit(0);
  }
} catch (e) {
  emit({ error: String(e?.stack ?? e) });
  process.exit(1);
}
