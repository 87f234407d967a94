// Starts a real imd for a test: builds the binary, gives it a fresh
// PostgreSQL schema and Redis key prefix (so runs are isolated from each other
// and from the Go tests), and reads its URL from "imd: listening on <url>".

import { spawn, execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const OUT = join(ROOT, 'test-output', 'browser');

const DEFAULT_DB = 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable';
const DEFAULT_REDIS = 'redis://127.0.0.1:6379/0';

let built = null;

// build compiles imd once per process ($IMD_BIN: use that binary instead).
async function build() {
  if (!built && process.env.IMD_BIN) built = Promise.resolve({ dir: null, bin: resolve(process.env.IMD_BIN) });
  if (!built) {
    built = (async () => {
      const dir = await mkdtemp(join(tmpdir(), 'imd-browser-'));
      const bin = join(dir, 'imd');
      await run('go', ['build', '-o', bin, './cmd/imd'], { cwd: ROOT, maxBuffer: 1 << 24 });
      return { dir, bin };
    })();
  }
  return built;
}

// startImd({env, name}) → {url, stop()}. With IMD_TEST_MODE=embedded the
// server runs as `imd serve` does without DATABASE_URL and REDIS_URL: SQLite
// in a fresh data directory, real-time state in memory.
export async function startImd({ env = {}, name = 'imd' } = {}) {
  const { bin } = await build();
  if (process.env.IMD_TEST_MODE === 'embedded') return startEmbedded(bin, env, name);
  const db = process.env.DATABASE_URL || DEFAULT_DB;
  const redis = process.env.REDIS_URL || DEFAULT_REDIS;
  const id = randomBytes(6).toString('hex');
  const schema = `browser_${id}`;
  const prefix = `browser-${id}:`;
  await run('psql', [db, '-v', 'ON_ERROR_STOP=1', '-qc', `CREATE SCHEMA ${schema}`]);
  let dbURL;
  try {
    const u = new URL(db);
    u.searchParams.set('search_path', schema);
    dbURL = u.toString();
  } catch {
    dbURL = `${db} search_path=${schema}`; // a key=value DSN
  }

  const server = await spawnImd(bin, {
    ...process.env,
    IMD_ADDR: '127.0.0.1:0',
    DATABASE_URL: dbURL,
    REDIS_URL: redis,
    IMD_REDIS_PREFIX: prefix,
    IMD_COOKIE_SECURE: 'false',
    IMD_SEND_RATE: '0',
    IMD_LOG_LEVEL: 'debug',
    ...env,
  }, name);

  async function stop() {
    await server.stop();
    await run('psql', [db, '-qc', `DROP SCHEMA IF EXISTS ${schema} CASCADE`]).catch(() => {});
    await dropRedisPrefix(redis, prefix).catch(() => {});
  }
  return { url: server.url, stop, prefix, schema };
}

// spawnImd runs `imd serve` with env, logging to test-output/browser/<name>.log.
async function spawnImd(bin, env, name) {
  await mkdir(OUT, { recursive: true });
  const log = createWriteStream(join(OUT, `${name}.log`));
  const child = spawn(bin, ['serve'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stderr.pipe(log, { end: false });
  let exited = null;
  const exit = new Promise((res) => child.on('exit', (code, signal) => res((exited = { code, signal }))));

  const url = await new Promise((res, rej) => {
    let buf = '';
    const timer = setTimeout(() => rej(new Error(`${name}: no "listening on" line within 60 s; see ${join(OUT, name + '.log')}`)), 60000);
    child.stdout.on('data', (chunk) => {
      log.write(chunk);
      buf += chunk;
      const m = /imd: listening on (\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        res(m[1]);
      }
    });
    exit.then(({ code, signal }) => {
      clearTimeout(timer);
      rej(new Error(`${name} exited (${code ?? signal}) before listening; see ${join(OUT, name + '.log')}`));
    });
  });

  async function stop() {
    if (!exited) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 15000);
      await exit;
      clearTimeout(t);
    }
    log.end();
  }
  return { url, stop };
}

async function startEmbedded(bin, env, name) {
  const dataDir = await mkdtemp(join(tmpdir(), 'imd-browser-data-'));
  const childEnv = { ...process.env, IMD_ADDR: '127.0.0.1:0', IMD_DATA_DIR: dataDir, IMD_COOKIE_SECURE: 'false',
    IMD_SEND_RATE: '0', IMD_LOG_LEVEL: 'debug', ...env };
  delete childEnv.DATABASE_URL;
  delete childEnv.REDIS_URL;
  const server = await spawnImd(bin, childEnv, name);
  return {
    url: server.url,
    async stop() {
      await server.stop();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

async function dropRedisPrefix(redis, prefix) {
  const { stdout } = await run('redis-cli', ['-u', redis, '--scan', '--pattern', `${prefix}*`], { maxBuffer: 1 << 26 });
  const keys = stdout.split('\n').filter(Boolean);
  for (let i = 0; i < keys.length; i += 500) {
    await run('redis-cli', ['-u', redis, 'DEL', ...keys.slice(i, i + 500)]);
  }
}

export async function cleanupBuild() {
  if (built) {
    const { dir } = await built;
    if (dir) await rm(dir, { recursive: true, force: true });
  }
}

// A tiny JSON client for setting up other users through the API (bearer).
export function client(base, token) {
  return async function call(method, path, body, headers = {}) {
    const res = await fetch(base + path, {
      method,
      headers: {
        Accept: 'application/json',
        ...(token ? { Authorization: 'Bearer ' + token } : {}),
        ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}),
        ...headers,
      },
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    const data = text ? JSON.parse(text) : null;
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return data;
  };
}

// tcpProxy forwards 127.0.0.1:<port> to target's host:port. down() cuts every
// open connection (a stream dies mid-flight, as when a network drops) and
// refuses new ones until up(): a drop the browser is not told about.
export async function tcpProxy(target) {
  const { createServer, connect } = await import('node:net');
  const t = new URL(target);
  const sockets = new Set();
  let isUp = true;
  const server = createServer((client) => {
    if (!isUp) {
      client.destroy();
      return;
    }
    const upstream = connect(Number(t.port), t.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    down() {
      isUp = false;
      for (const s of sockets) s.destroy();
    },
    up() {
      isUp = true;
    },
    close: () => new Promise((res) => {
      for (const s of sockets) s.destroy();
      server.close(res);
    }),
  };
}
