#!/usr/bin/env node
// A js-quic (@matrixai/quic 2.0.9) peer for polykey's QUIC interop tests.
//
//   node js_quic_peer.mjs server --cert C --key K [--peer-cert P]
//        [--push N --push-size S]
//   node js_quic_peer.mjs client --port PORT --cert C --key K [--peer-cert P]
//        [--streams N --size S | --sizes S1,S2,...]
//
// Both modes present the node certificate chain C (PEM) and key K (PEM),
// require the peer's certificate (verifyPeer with a verifyCallback that
// wants a non-empty chain whose leaf, with --peer-cert, is exactly P), and
// echo every stream the peer opens (data back, FIN after the peer's FIN).
//
// A server also opens --push streams to each connection after the peer's
// first stream arrived; a client opens --streams streams of --size bytes
// after connecting. For each stream it opened, the peer writes the payload,
// ends it, reads the echo to its end and reports both SHA-256 digests.
//
// stdout carries one JSON object per line (the test reads them): "listening"
// (server port), "connected" (the peer's leaf certificate), "echoed",
// "stream" (a stream we opened), "done" (all of this connection's streams
// finished), "closed" (the connection's close code as js-quic reports it).
// stdin takes commands, one per line: "close CODE REASON" closes every
// connection with application error CODE; "state" prints each
// connection's quiche state (timer, counters, streams) for debugging a
// stall. The process exits when stdin closes.

import process from 'node:process';
import readline from 'node:readline';
import { createHash, randomBytes, webcrypto } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Logger, { LogLevel, StreamHandler } from '@matrixai/logger';
import { QUICClient, QUICServer, events } from '@matrixai/quic';

function parseArgs(argv) {
  const [mode, ...rest] = argv;
  const opts = { mode, streams: 0, size: 0, push: 0, pushSize: 0 };
  for (let i = 0; i < rest.length; i += 2) {
    const name = rest[i].replace(/^--/, '').replace(/-(.)/g, (_, c) => c.toUpperCase());
    const value = rest[i + 1];
    opts[name] = ['cert', 'key', 'host', 'peerCert'].includes(name)
      ? value
      : name === 'sizes'
        ? value.split(',').map(Number)
        : Number(value);
  }
  if (!['server', 'client'].includes(mode) || opts.cert == null || opts.key == null) {
    throw new Error(`usage: server|client --cert C --key K ... (got ${argv.join(' ')})`);
  }
  return opts;
}

function emit(event, fields = {}) {
  const json = JSON.stringify({ event, ...fields }, (_, v) =>
    typeof v === 'bigint' ? Number(v) : v,
  );
  process.stdout.write(json + '\n');
}

function sha256(chunks) {
  const hash = createHash('sha256');
  for (const chunk of chunks) hash.update(chunk);
  return hash.digest('hex');
}

// CryptoError codes (0x100 + TLS alert) a verifyCallback may return.
const BAD_CERTIFICATE = 298;
const CERTIFICATE_REQUIRED = 372;

// Polykey accepts any chain in TLS and checks it afterwards; here the check
// is that a chain arrived and, with --peer-cert, that its leaf is exactly
// the certificate the test's polykey node presents.
function makeVerifyCallback(expectedLeafPEM) {
  const expected = expectedLeafPEM != null ? pemToDER(expectedLeafPEM) : null;
  return async (certs) => {
    if (certs.length === 0) return CERTIFICATE_REQUIRED;
    if (expected != null && !expected.equals(Buffer.from(certs[0]))) {
      return BAD_CERTIFICATE;
    }
    return undefined;
  };
}

function pemToDER(pem) {
  const body = pem.match(/-----BEGIN CERTIFICATE-----([^-]+)-----END CERTIFICATE-----/);
  if (body == null) throw new Error('no certificate in PEM');
  return Buffer.from(body[1].replace(/\s+/g, ''), 'base64');
}

function leafHex(connection) {
  const chain = connection.getRemoteCertsChain();
  return chain.length > 0 ? Buffer.from(chain[0]).toString('hex') : null;
}

// Echo with the last chunk held back until the next one (or the end)
// arrives, so the FIN always follows unacknowledged data. quiche (0.18 in
// js-quic, and every release up to 0.29 at least: cloudflare/quiche#2525)
// drops a zero-length FIN written at an offset the peer already
// acknowledged: it collects the stream as complete before any frame carries
// the FIN, and the peer waits for the end forever. js-quic always closes a
// writable with such a zero-length write, so a plain pipeTo echo trips over
// it whenever the ACK for the last chunk lands before the peer's FIN.
async function echo(stream) {
  let bytes = 0;
  let held = null;
  const writer = stream.writable.getWriter();
  for await (const chunk of stream.readable) {
    bytes += chunk.byteLength;
    if (held != null) await writer.write(held);
    held = chunk;
  }
  // The last write and the FIN go out in the same turn of the event loop.
  if (held != null) void writer.write(held);
  await writer.close();
  emit('echoed', { stream: stream.streamId, bytes });
}

async function exchange(connection, size) {
  const stream = connection.newStream();
  const payload = randomBytes(size);
  const writer = stream.writable.getWriter();
  const send = (async () => {
    // Several writes, so flow control and chunking both get exercised.
    for (let at = 0; at < size; at += 64 * 1024) {
      await writer.write(payload.subarray(at, at + 64 * 1024));
    }
    await writer.close();
  })();
  const received = [];
  for await (const chunk of stream.readable) received.push(chunk);
  await send;
  const got = Buffer.concat(received);
  emit('stream', {
    stream: stream.streamId,
    sent: size,
    received: got.byteLength,
    sent_sha256: sha256([payload]),
    received_sha256: sha256([got]),
  });
}

function watchClose(target) {
  target.addEventListener(events.EventQUICConnectionError.name, (evt) => {
    const error = evt.detail;
    const data = error.data ?? {};
    emit('closed', {
      kind: error.constructor.name,
      is_app: data.isApp ?? null,
      code: data.errorCode ?? null,
      reason: data.reason != null ? Buffer.from(data.reason).toString() : null,
    });
  });
}

// Stream i carries size + i bytes, or sizes[i] with --sizes.
function streamSizes(count, size, sizes) {
  return sizes ?? Array.from({ length: count }, (_, i) => size + i);
}

async function runExchanges(connection, sizes) {
  await Promise.all(sizes.map((size) => exchange(connection, size)));
}

function cryptoOps(key) {
  return {
    key,
    ops: {
      sign: async (k, data) =>
        webcrypto.subtle.sign('HMAC', await hmacKey(k), data),
      verify: async (k, data, sig) =>
        webcrypto.subtle.verify('HMAC', await hmacKey(k), sig, data),
      randomBytes: async (data) => {
        webcrypto.getRandomValues(new Uint8Array(data));
      },
    },
  };
}

async function hmacKey(raw) {
  return webcrypto.subtle.importKey('raw', raw, { name: 'HMAC', hash: 'SHA-256' }, false, [
    'sign',
    'verify',
  ]);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const logger = new Logger('js-quic-peer', LogLevel.WARN, [new StreamHandler()]);
  const config = {
    key: readFileSync(opts.key, 'utf8'),
    cert: readFileSync(opts.cert, 'utf8'),
    verifyPeer: true,
    verifyCallback: makeVerifyCallback(
      opts.peerCert != null ? readFileSync(opts.peerCert, 'utf8') : null,
    ),
    applicationProtos: ['quic'],
    maxIdleTimeout: 30_000,
    keepAliveIntervalTime: 10_000,
  };
  const connections = new Set();
  let closing = null;

  if (opts.mode === 'server') {
    const server = new QUICServer({
      crypto: cryptoOps(webcrypto.getRandomValues(new Uint8Array(32)).buffer),
      config,
      logger: logger.getChild('server'),
    });
    // Streams are re-dispatched on the server from the moment a connection
    // is created, so none is missed before EventQUICServerConnection fires
    // (a client's first streams can arrive with its handshake Finished).
    // Our own streams go out once the connection is started and the peer's
    // first stream showed that it is ready for them.
    const started = new WeakSet();
    const sawStream = new WeakSet();
    const pushed = new WeakSet();
    const maybePush = (connection) => {
      if (opts.push === 0 || pushed.has(connection)) return;
      if (!started.has(connection) || !sawStream.has(connection)) return;
      pushed.add(connection);
      runExchanges(connection, streamSizes(opts.push, opts.pushSize)).then(
        () => emit('done'),
        (e) => emit('error', { where: 'push', message: String(e) }),
      );
    };
    // Connection errors too are re-dispatched on the server from the start,
    // which catches a connection that fails before it is started.
    watchClose(server);
    server.addEventListener(events.EventQUICConnectionStream.name, (evt) => {
      const stream = evt.detail;
      // `connection` is protected in the typings, public at run time.
      sawStream.add(stream.connection);
      maybePush(stream.connection);
      void echo(stream).catch((e) => emit('error', { where: 'echo', message: String(e) }));
    });
    server.addEventListener(events.EventQUICServerConnection.name, (evt) => {
      const connection = evt.detail;
      connections.add(connection);
      allConnections.add(connection);
      started.add(connection);
      emit('connected', { peer_leaf: leafHex(connection), remote_port: connection.remotePort });
      maybePush(connection);
    });
    await server.start({ host: opts.host ?? '127.0.0.1', port: 0 });
    emit('listening', { port: server.port });
    closing = async (code, reason) => {
      await Promise.all(
        [...connections].map((c) =>
          c.stop({ isApp: true, errorCode: code, reason: Buffer.from(reason), force: false }),
        ),
      );
      emit('stopped');
    };
    await waitForStdin((code, reason) => closing(code, reason));
    await server.stop({ force: true });
  } else {
    const client = await QUICClient.createQUICClient(
      {
        host: opts.host ?? '127.0.0.1',
        port: opts.port,
        localHost: '127.0.0.1',
        crypto: cryptoOps(undefined),
        config,
        logger: logger.getChild('client'),
      },
      { timer: 10_000 },
    );
    const connection = client.connection;
    connections.add(connection);
    allConnections.add(connection);
    watchClose(connection);
    connection.addEventListener(events.EventQUICConnectionStream.name, (evt) => {
      void echo(evt.detail).catch((e) => emit('error', { where: 'echo', message: String(e) }));
    });
    emit('connected', { peer_leaf: leafHex(connection), local_port: client.localPort });
    runExchanges(connection, streamSizes(opts.streams, opts.size, opts.sizes)).then(
      () => emit('done'),
      (e) => emit('error', { where: 'streams', message: String(e) }),
    );
    closing = async (code, reason) => {
      await client.destroy({ isApp: true, errorCode: code, reason: Buffer.from(reason), force: false });
      emit('stopped');
    };
    await waitForStdin((code, reason) => closing(code, reason));
    await client.destroy({ force: true });
  }
}

const allConnections = new Set();

function waitForStdin(onClose) {
  return new Promise((resolve) => {
    const lines = readline.createInterface({ input: process.stdin });
    const pending = [];
    lines.on('line', (line) => {
      const [command, code, ...reason] = line.trim().split(' ');
      if (command === 'state') {
        for (const c of allConnections) {
          const q = c.conn;
          const streams = {};
          for (const id of [...Array(24).keys(), ...(c.streamMap?.keys?.() ?? [])]) {
            let cap = null;
            try { cap = q.streamCapacity(id); } catch (e) { cap = String(e.message); }
            streams[id] = {
              finished: q.streamFinished(id),
              readable: q.streamReadable(id),
              capacity: cap,
              js: c.streamMap.has(id)
                ? {
                    readClosed: c.streamMap.get(id).readClosed,
                    writeClosed: c.streamMap.get(id).writeClosed,
                  }
                : null,
            };
          }
          emit('state', {
            timeout: q.timeout(),
            timer: c.connTimeoutTimer?.status ?? 'none',
            stats: q.stats(),
            paths: q.pathStats(),
            writable: [...q.writable()],
            readable: [...q.readable()],
            streams,
            closed: q.isClosed(),
            draining: q.isDraining(),
          });
        }
      } else if (command === 'close') {
        pending.push(
          onClose(Number(code), reason.join(' ')).catch((e) =>
            emit('error', { where: 'close', message: String(e) }),
          ),
        );
      }
    });
    lines.on('close', () => {
      Promise.all(pending).then(resolve);
    });
  });
}

main().then(
  () => process.exit(0),
  (e) => {
    emit('error', { where: 'main', message: String(e?.stack ?? e) });
    process.exit(1);
  },
);
