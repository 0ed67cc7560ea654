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
// echo every stream the peer opens.
//
// A server also opens --push streams to each connection after the peer's
// first stream arrived; a client opens --streams streams of --size bytes
// after connecting. For each stream it opened, the peer sends the payload,
// reads the echo to its end and reports both SHA-256 digests (the stream
// protocol is described at echo() below).
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
import { QUICClient, QUICServer, QUICSocket, events } from '@matrixai/quic';

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

// The stream protocol (the same in aioquic_peer.py and conftest.py): the
// opener sends an 8-byte big-endian length N and N bytes; the other side
// echoes the N bytes and ends its side (FIN) as soon as they are out, while
// its read side is still open; the opener reads the echo up to that FIN and
// only then ends its own side; the echoing side reads that FIN last.
//
// Why FINs go in that order: with a plain echo (FIN after the peer's FIN),
// about one run in ten under CPU load left a stream whose FIN js-quic
// never sent: its quiche (0.18) had collected the stream, js-quic believed
// the writable closed, nothing was unsent or unacknowledged, and the peer
// waited forever; two js-quic processes stalled the same way. quiche counts
// a stream's sending side complete once its bytes are acknowledged, FIN or
// no FIN (cloudflare/quiche#2525, open), and js-quic ends every writable
// with a separate zero-length FIN write. Here the echoing side writes its
// FIN with its read side still open, and the opener writes its FIN after
// the echo's FIN, by when its data is acknowledged: no stall since.
const HEADER = 8;

async function echo(stream) {
  const writer = stream.writable.getWriter();
  let header = Buffer.alloc(0);
  let length = null;
  let echoed = 0;
  let extra = 0;
  for await (const chunk of stream.readable) {
    let data = Buffer.from(chunk);
    if (length == null) {
      header = Buffer.concat([header, data]);
      if (header.byteLength < HEADER) continue;
      length = Number(header.readBigUInt64BE(0));
      data = header.subarray(HEADER);
      if (length === 0) await writer.close();
    }
    const take = Math.min(data.byteLength, length - echoed);
    extra += data.byteLength - take;
    if (take > 0) {
      await writer.write(data.subarray(0, take));
      echoed += take;
      if (echoed === length) await writer.close();
    }
  }
  emit('echoed', { stream: stream.streamId, bytes: echoed, extra });
}

async function exchange(connection, size) {
  const stream = connection.newStream();
  const payload = randomBytes(size);
  const writer = stream.writable.getWriter();
  const header = Buffer.alloc(HEADER);
  header.writeBigUInt64BE(BigInt(size));
  const send = (async () => {
    await writer.write(header);
    // Several writes, so flow control and chunking both get exercised.
    for (let at = 0; at < size; at += 64 * 1024) {
      await writer.write(payload.subarray(at, at + 64 * 1024));
    }
  })();
  const received = [];
  for await (const chunk of stream.readable) received.push(chunk);
  await send;
  // The echo ended with the peer's FIN: now ours.
  await writer.close();
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
  // One injected socket (as Polykey uses js-quic), with 4 MiB kernel
  // buffers: with the default ~208 KiB a starved node process drops
  // datagrams by the hundred and connections crawl through loss recovery.
  const socket = new QUICSocket({ logger: logger.getChild('socket') });
  await socket.start({ host: opts.host ?? '127.0.0.1', port: 0 });
  // `socket` (the dgram socket) is protected in the typings only.
  socket.socket.setRecvBufferSize(4 * 1024 * 1024);
  socket.socket.setSendBufferSize(4 * 1024 * 1024);

  if (opts.mode === 'server') {
    const server = new QUICServer({
      crypto: cryptoOps(webcrypto.getRandomValues(new Uint8Array(32)).buffer),
      config,
      socket,
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
    await server.start();
    emit('listening', { port: socket.port });
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
    await socket.stop({ force: true });
  } else {
    const client = await QUICClient.createQUICClient(
      {
        host: opts.host ?? '127.0.0.1',
        port: opts.port,
        socket,
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
    emit('connected', { peer_leaf: leafHex(connection), local_port: socket.port });
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
    await socket.stop({ force: true });
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
