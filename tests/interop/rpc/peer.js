// A @matrixai/rpc 0.5.1 peer over TCP for polykey's interoperability tests.
//
//   node peer.js server [timeoutMs]  -> prints "PORT <n>", serves until stdin closes
//   node peer.js client <port>       -> runs every check against a server at
//                                       127.0.0.1:<port>, one JSON line per check
//
// js-rpc speaks web streams; bridge() adapts a net.Socket (half-open allowed,
// so FIN in one direction does not end the other).
'use strict';
const net = require('net');
const { ReadableStream, WritableStream, TransformStream } = require('stream/web');
const Logger = require('@matrixai/logger').default;
const { LogLevel } = require('@matrixai/logger');
const {
  RPCServer, RPCClient,
  UnaryHandler, ServerHandler, ClientHandler, DuplexHandler, RawHandler,
  UnaryCaller, ServerCaller, ClientCaller, DuplexCaller, RawCaller,
} = require('@matrixai/rpc');

const logger = new Logger('peer', LogLevel.WARN);

function bridge(socket) {
  const readable = new ReadableStream({
    start(controller) {
      socket.on('data', (d) => controller.enqueue(new Uint8Array(d)));
      socket.on('end', () => { try { controller.close(); } catch {} });
      socket.on('error', (e) => { try { controller.error(e); } catch {} });
      socket.on('close', () => { try { controller.close(); } catch {} });
    },
    cancel() { socket.destroy(); },
  });
  const writable = new WritableStream({
    write(chunk) {
      return new Promise((resolve, reject) =>
        socket.write(chunk, (err) => (err ? reject(err) : resolve())));
    },
    close() { return new Promise((resolve) => socket.end(resolve)); },
    abort() { socket.destroy(); },
  });
  return { readable, writable, cancel: () => socket.destroy(), meta: {} };
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(t); reject(signal.reason); });
  });
}

// ---- server ---------------------------------------------------------------
class Echo extends UnaryHandler {
  handle = async (input) => ({ echo: input });
}
class Count extends ServerHandler {
  // The pause matters: over this bridge js-rpc 0.5.1's server loses all but
  // the first of messages a handler yields back to back (JS client too).
  handle = async function* (input) {
    for (let i = 0; i < input.n; i++) {
      yield { i };
      await sleep(5);
    }
  };
}
class Sum extends ClientHandler {
  handle = async (input) => {
    let sum = 0;
    for await (const p of input) sum += p.x;
    return { sum };
  };
}
class Chat extends DuplexHandler {
  async *handle(input) { for await (const p of input) yield { re: p.x }; }
}
class RawEcho extends RawHandler {
  handle = async ([header, input]) => {
    const upper = new TransformStream({
      transform(chunk, controller) {
        controller.enqueue(new Uint8Array(Buffer.from(chunk).toString().toUpperCase().split('').map((c) => c.charCodeAt(0))));
      },
    });
    return [{ hello: header.params }, input.pipeThrough(upper)];
  };
}
class Fail extends UnaryHandler {
  handle = async () => { throw new TypeError('js says no'); };
}
class Sleep extends UnaryHandler {
  handle = async (input, _cancel, _meta, ctx) => {
    await sleep(input.ms, ctx.signal);
    return { slept: input.ms };
  };
}
class SleepDeclared extends Sleep {
  timeout = 300;
}

async function server(timeoutMs) {
  const rpc = new RPCServer({ logger, timeoutTime: timeoutMs ?? Infinity });
  await rpc.start({
    manifest: {
      echo: new Echo({}), count: new Count({}), sum: new Sum({}), chat: new Chat({}),
      rawEcho: new RawEcho({}), fail: new Fail({}), sleep: new Sleep({}),
      sleepDeclared: new SleepDeclared({}),
    },
  });
  const srv = net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.setNoDelay(true);
    rpc.handleStream(bridge(socket));
  });
  srv.listen(0, '127.0.0.1', () => console.log(`PORT ${srv.address().port}`));
  process.stdin.resume();
  process.stdin.on('end', () => process.exit(0));
}

// ---- client -----------------------------------------------------------------
function describeError(e) {
  if (e instanceof Error) {
    return {
      class: e.constructor.name,
      message: e.message,
      cause: e.cause instanceof Error ? { class: e.cause.constructor.name, message: e.cause.message } : e.cause ?? null,
    };
  }
  return { class: 'plain', value: e };
}

async function readAll(readable) {
  const out = [];
  for await (const v of readable) out.push(v);
  return out;
}

async function client(port) {
  const streamFactory = async () => {
    const socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    await new Promise((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
    socket.setNoDelay(true);
    return bridge(socket);
  };
  const rpc = new RPCClient({
    manifest: {
      echo: new UnaryCaller(), count: new ServerCaller(), sum: new ClientCaller(),
      chat: new DuplexCaller(), rawEcho: new RawCaller(), fail: new UnaryCaller(),
      sleep: new UnaryCaller(), slowDeclared: new UnaryCaller(), nope: new UnaryCaller(),
    },
    streamFactory,
    logger,
  });
  const m = rpc.methods;
  const checks = {
    unary: async () => m.echo({ a: 1 }),
    unaryTimer: async () => m.echo({ a: 2 }, { timer: 4000 }),
    server: async () => readAll(await m.count({ n: 4 })),
    client: async () => {
      const { output, writable } = await m.sum();
      const w = writable.getWriter();
      for (const x of [1, 2, 3, 4]) await w.write({ x });
      await w.close();
      return output;
    },
    duplex: async () => {
      const { readable, writable } = await m.chat();
      const w = writable.getWriter();
      const r = readable.getReader();
      const got = [];
      for (const x of [1, 2, 3]) {
        await w.write({ x });
        got.push((await r.read()).value);
      }
      await w.close();
      const end = await r.read();
      got.push(end.done ? 'done' : end.value);
      return got;
    },
    raw: async () => {
      const { readable, writable, meta } = await m.rawEcho({ x: 1 });
      const w = writable.getWriter();
      await w.write(Buffer.from('raw bytes'));
      await w.close();
      const chunks = [];
      for await (const c of readable) chunks.push(Buffer.from(c));
      return { header: meta.result, body: Buffer.concat(chunks).toString() };
    },
    error: async () => m.fail({}),
    unknown: async () => m.nope({}),
    clientTimeout: async () => m.sleep({ s: 5 }, { timer: 300 }),
    handlerTimeout: async () => m.slowDeclared({ s: 5 }),
  };
  const only = process.argv.slice(4);
  for (const [name, fn] of Object.entries(checks)) {
    if (only.length && !only.includes(name)) continue;
    const start = Date.now();
    try {
      const value = await fn();
      console.log(JSON.stringify({ name, ok: true, value, ms: Date.now() - start }));
    } catch (e) {
      console.log(JSON.stringify({ name, ok: false, error: describeError(e), ms: Date.now() - start }));
    }
  }
  process.exit(0);
}

const [mode, arg] = process.argv.slice(2);
if (mode === 'server') server(arg ? Number(arg) : undefined);
else if (mode === 'client') client(Number(arg));
else { console.error('usage: peer.js server [timeoutMs] | client <port>'); process.exit(2); }
