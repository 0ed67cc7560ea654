// @matrixai/rpc 0.5.1 over @matrixai/quic 2.0.9, peer for bench/rpc.py.
//
//   node rpc_peer.mjs server CERT.pem KEY.pem        -> "READY <port>", serves until stdin closes
//   node rpc_peer.mjs client PORT unary SECONDS IN_FLIGHT
//   node rpc_peer.mjs client PORT stream MESSAGES MAX_SECONDS
//
// Every QUIC stream the server accepts goes to RPCServer.handleStream (a
// QUICStream is an RPCStream: readable, writable, cancel, meta); the client's
// stream factory is connection.newStream(). No timeouts (timeoutTime
// Infinity on both sides), logger at ERROR, the client does not verify the
// server's certificate. js-quic throws at the peer's stream limit, so the
// client's stream factory polls quiche's stream credit (1 ms) before opening.
import * as fs from 'node:fs';
import { webcrypto } from 'node:crypto';
import { QUICServer, QUICClient, events } from '@matrixai/quic';
import rpcPkg from '@matrixai/rpc';
import Logger, { LogLevel } from '@matrixai/logger';

const {
  RPCServer, RPCClient, UnaryHandler, ServerHandler, UnaryCaller, ServerCaller,
} = rpcPkg;
const HOST = '127.0.0.1';
const logger = new Logger('bench', LogLevel.ERROR);

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

class Echo extends UnaryHandler {
  handle = async (input) => ({ i: input.i });
}

class Count extends ServerHandler {
  handle = async function* (input) {
    for (let i = 0; i < input.n; i++) yield { i };
  };
}

async function server(certPath, keyPath) {
  const keyP = webcrypto.subtle.importKey(
    'raw', webcrypto.getRandomValues(new Uint8Array(32)),
    { name: 'HMAC', hash: 'SHA-256' }, false, ['sign', 'verify']);
  const quicServer = new QUICServer({
    crypto: {
      key: webcrypto.getRandomValues(new Uint8Array(32)).buffer,
      ops: {
        sign: async (_key, data) => webcrypto.subtle.sign('HMAC', await keyP, data),
        verify: async (_key, data, sig) =>
          webcrypto.subtle.verify('HMAC', await keyP, sig, data),
      },
    },
    config: {
      key: fs.readFileSync(keyPath, 'utf8'),
      cert: fs.readFileSync(certPath, 'utf8'),
      verifyPeer: false,
    },
    logger,
  });
  const rpc = new RPCServer({ logger, timeoutTime: Infinity });
  await rpc.start({ manifest: { echo: new Echo({}), count: new Count({}) } });
  quicServer.addEventListener(events.EventQUICServerConnection.name, (evt) => {
    const conn = evt.detail;
    conn.addEventListener(events.EventQUICConnectionStream.name, (sevt) => {
      rpc.handleStream(sevt.detail);
    });
  });
  await quicServer.start({ host: HOST, port: 0 });
  process.stdout.write(`READY ${quicServer.port}\n`);
  process.stdin.resume();
  process.stdin.on('end', () => process.exit(0));
}

async function client(port, mode, a, b) {
  const quicClient = await QUICClient.createQUICClient({
    host: HOST,
    port,
    crypto: {
      ops: {
        randomBytes: async (data) => {
          webcrypto.getRandomValues(new Uint8Array(data));
        },
      },
    },
    config: { verifyPeer: false },
    logger,
  });
  // Stock js-quic throws at the peer's stream limit (100) instead of waiting
  // for credit, and a stream id that failed that way cannot be reused; so
  // wait until quiche reports credit (check and create run in one tick).
  let limitWaits = 0;
  async function newStream() {
    const connection = quicClient.connection;
    while (connection.conn.peerStreamsLeftBidi() === 0) {
      limitWaits += 1;
      await new Promise((r) => setTimeout(r, 1));
    }
    return connection.newStream();
  }
  const rpc = new RPCClient({
    manifest: { echo: new UnaryCaller(), count: new ServerCaller() },
    streamFactory: newStream,
    timeoutTime: Infinity,
    logger,
  });
  if (mode === 'unary') {
    const seconds = a;
    const inFlight = b;
    let count = 0;
    let errors = 0;
    let lastError;
    const start = performance.now();
    const end = start + seconds * 1000;
    async function worker(w) {
      let i = w;
      while (performance.now() < end) {
        let out;
        try {
          out = await rpc.methods.echo({ i });
        } catch (e) {
          // Counted and reported: under concurrency js-rpc 0.5.1 over js-quic
          // sometimes fails a call ("WritableStream is closed").
          errors += 1;
          lastError = String(e?.message ?? e);
          continue;
        }
        if (out.i !== i) throw new Error(`bad echo ${JSON.stringify(out)}`);
        count += 1;
        i += inFlight;
      }
    }
    await Promise.all(Array.from({ length: inFlight }, (_, w) => worker(w)));
    const elapsed = (performance.now() - start) / 1000;
    emit({
      count, seconds: elapsed, per_s: count / elapsed, errors, last_error: lastError,
      stream_limit_waits: limitWaits,
    });
  } else {
    const messages = a;
    const maxSeconds = b;
    let count = 0;
    const start = performance.now();
    const stop = start + maxSeconds * 1000;
    const readable = await rpc.methods.count({ n: messages });
    for await (const r of readable) {
      if (r.i !== count) throw new Error(`message ${count} is ${JSON.stringify(r)}`);
      count += 1;
      if ((count & 1023) === 0 && performance.now() > stop) break;
    }
    const elapsed = (performance.now() - start) / 1000;
    emit({ count, seconds: elapsed, per_s: count / elapsed, capped: count < messages });
  }
  await quicClient.destroy({ force: true });
}

const [role, ...rest] = process.argv.slice(2);
try {
  if (role === 'server') {
    await server(rest[0], rest[1]);
  } else {
    await client(Number(rest[0]), rest[1], Number(rest[2]), Number(rest[3]));
    process.exit(0);
  }
} catch (e) {
  emit({ error: String(e?.stack ?? e) });
  process.exit(1);
}
