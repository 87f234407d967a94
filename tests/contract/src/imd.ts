// Starts a real imd for the test, the same way tests/browser does: build the
// binary, a fresh PostgreSQL schema and Redis key prefix, and the URL from
// "imd: listening on <url>".

import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
export const ROOT = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '../../../..');
export const OUT = join(ROOT, 'test-output', 'contract');

export interface Imd {
  url: string;
  stop(): Promise<void>;
}

export async function startImd(env: Record<string, string> = {}): Promise<Imd> {
  // $IMD_BIN: a binary built already; otherwise build one.
  const dir = await mkdtemp(join(tmpdir(), 'imd-contract-'));
  const bin = process.env.IMD_BIN ? resolve(process.env.IMD_BIN) : join(dir, 'imd');
  if (!process.env.IMD_BIN) await run('go', ['build', '-o', bin, './cmd/imd'], { cwd: ROOT, maxBuffer: 1 << 24 });

  const db = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable';
  const redis = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
  const id = randomBytes(6).toString('hex');
  const schema = `contract_${id}`;
  const prefix = `contract-${id}:`;
  await run('psql', [db, '-v', 'ON_ERROR_STOP=1', '-qc', `CREATE SCHEMA ${schema}`]);
  let dbURL: string;
  try {
    const u = new URL(db);
    u.searchParams.set('search_path', schema);
    dbURL = u.toString();
  } catch {
    dbURL = `${db} search_path=${schema}`;
  }

  await mkdir(OUT, { recursive: true });
  const log = createWriteStream(join(OUT, 'imd.log'));
  const child = spawn(bin, ['serve'], {
    cwd: ROOT,
    env: {
      ...process.env,
      IMD_ADDR: '127.0.0.1:0',
      DATABASE_URL: dbURL,
      REDIS_URL: redis,
      IMD_REDIS_PREFIX: prefix,
      IMD_COOKIE_SECURE: 'false',
      IMD_SEND_RATE: '0',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stderr.pipe(log, { end: false });
  let exited = false;
  const exit = new Promise<void>((res) => child.on('exit', () => { exited = true; res(); }));

  const url = await new Promise<string>((res, rej) => {
    let buf = '';
    const timer = setTimeout(() => rej(new Error('imd did not listen within 60 s; see test-output/contract/imd.log')), 60000);
    child.stdout.on('data', (chunk: Buffer) => {
      log.write(chunk);
      buf += chunk.toString();
      const m = /imd: listening on (\S+)/.exec(buf);
      if (m && m[1]) {
        clearTimeout(timer);
        res(m[1]);
      }
    });
    void exit.then(() => {
      clearTimeout(timer);
      rej(new Error('imd exited before listening; see test-output/contract/imd.log'));
    });
  });

  return {
    url,
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 15000);
        await exit;
        clearTimeout(t);
      }
      log.end();
      await rm(dir, { recursive: true, force: true });
      await run('psql', [db, '-qc', `DROP SCHEMA IF EXISTS ${schema} CASCADE`]).catch(() => {});
      const { stdout } = await run('redis-cli', ['-u', redis, '--scan', '--pattern', `${prefix}*`]).catch(() => ({ stdout: '' }));
      const keys = stdout.split('\n').filter(Boolean);
      if (keys.length) await run('redis-cli', ['-u', redis, 'DEL', ...keys]).catch(() => {});
    },
  };
}
