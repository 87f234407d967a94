// Checks every response the generated client receives against openapi.yaml:
// the status must be declared for the operation, the content type declared
// for that status, required headers present, and the body must match the
// schema — strictly: an object field the schema does not declare is a
// mismatch too, so the spec cannot fall behind the server unnoticed.
//
// openapi-typescript's types are erased at run time, so this is what makes a
// wrong field type or a missing required field fail the test.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { parse } from 'yaml';
import type { Middleware } from 'openapi-fetch';
import { ROOT } from './imd.js';

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Obj = { [k: string]: Json };

const spec = parse(readFileSync(join(ROOT, 'openapi.yaml'), 'utf8')) as Obj;
const components = spec['components'] as Obj;

// toJSONSchema turns an OpenAPI 3.0 schema into JSON Schema for Ajv:
// nullable becomes a union with null, component refs point into one
// registered document, and objects are closed (strict responses).
function toJSONSchema(node: Json): Json {
  if (Array.isArray(node)) return node.map(toJSONSchema);
  if (node === null || typeof node !== 'object') return node;
  const out: Obj = {};
  for (const [k, v] of Object.entries(node)) {
    if (k === 'nullable' || k === 'example' || k === 'discriminator' || k.startsWith('x-')) continue;
    if (k === '$ref' && typeof v === 'string') {
      out['$ref'] = v.replace('#/components/schemas/', 'imd#/definitions/');
    } else if (k === 'properties' && v && typeof v === 'object' && !Array.isArray(v)) {
      out[k] = Object.fromEntries(Object.entries(v).map(([name, s]) => [name, toJSONSchema(s)]));
    } else {
      out[k] = toJSONSchema(v);
    }
  }
  if (out['properties'] !== undefined && out['additionalProperties'] === undefined) {
    out['additionalProperties'] = false;
  }
  if (node['nullable'] === true) return { anyOf: [out, { type: 'null' }] };
  return out;
}

const ajv = new Ajv({ strict: false, allErrors: true });
// ajv-formats is CommonJS; under NodeNext its default export is the module.
const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ?? addFormatsModule) as (a: Ajv) => void;
addFormats(ajv);
ajv.addFormat('int64', true);
ajv.addFormat('password', true);
ajv.addSchema({ $id: 'imd', definitions: toJSONSchema(components['schemas'] as Json) } as object);

const compiled = new Map<string, ValidateFunction>();
function validator(key: string, schema: Json): ValidateFunction {
  let v = compiled.get(key);
  if (!v) {
    v = ajv.compile(toJSONSchema(schema) as object);
    compiled.set(key, v);
  }
  return v;
}

function deref(node: Json | undefined): Obj | undefined {
  if (!node || typeof node !== 'object' || Array.isArray(node)) return undefined;
  const ref = node['$ref'];
  if (typeof ref === 'string') {
    const [, , kind, name] = ref.split('/');
    return deref(((components[kind!] as Obj)[name!]) as Json);
  }
  return node;
}

export const mismatches: string[] = [];

// check validates one response; it returns what it found wrong.
export async function check(method: string, schemaPath: string, response: Response): Promise<string[]> {
  const problems: string[] = [];
  const where = `${method} ${schemaPath} → ${response.status}`;
  const op = deref(((spec['paths'] as Obj)[schemaPath] as Obj | undefined)?.[method.toLowerCase()]);
  if (!op) return [`${where}: no such operation in openapi.yaml`];
  const responses = op['responses'] as Obj;
  const status = String(response.status);
  const declared = deref(responses[status] ?? responses[status[0] + 'XX'] ?? responses['default']);
  if (!declared) return [`${where}: status not declared (declared: ${Object.keys(responses).join(', ')})`];

  for (const [name, h] of Object.entries((declared['headers'] as Obj | undefined) ?? {})) {
    const header = deref(h);
    if (header?.['required'] === true && !response.headers.has(name)) problems.push(`${where}: required header ${name} missing`);
  }
  const content = declared['content'] as Obj | undefined;
  const type = (response.headers.get('Content-Type') ?? '').split(';')[0]!.trim();
  const text = await response.clone().text();
  if (!content) {
    if (text !== '') problems.push(`${where}: a body where the spec declares none: ${text.slice(0, 200)}`);
    return problems;
  }
  const media = deref(content[type]);
  if (!media) return [...problems, `${where}: Content-Type ${type || '(none)'} not declared (declared: ${Object.keys(content).join(', ')})`];
  if (!type.includes('json')) return problems;
  let body: Json;
  try {
    body = JSON.parse(text) as Json;
  } catch {
    return [...problems, `${where}: not JSON: ${text.slice(0, 200)}`];
  }
  const v = validator(`${method} ${schemaPath} ${status} ${type}`, media['schema'] as Json);
  if (!v(body)) {
    for (const e of v.errors ?? []) {
      problems.push(`${where}: body${e.instancePath} ${e.message}${e.params && 'additionalProperty' in e.params ? ` (${String(e.params['additionalProperty'])})` : ''}`);
    }
  }
  return problems;
}

// contract is openapi-fetch middleware that records every mismatch.
export const contract: Middleware = {
  async onResponse({ request, response, schemaPath }) {
    const found = await check(request.method, schemaPath, response);
    mismatches.push(...found);
    return undefined;
  },
};
