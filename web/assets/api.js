// The public imd API over fetch, as the browser client uses it: same-origin
// requests authenticated by the HttpOnly session cookie that login sets (no
// bearer header, no token in JavaScript). Errors are problem+json documents
// (RFC 9457); they become ApiError with the server's `detail`, the fields at
// fault and, for 429, Retry-After.

export class ApiError extends Error {
  constructor(status, problem = {}, retryAfter = null) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status; // 0: the request did not reach the server
    this.code = problem.code || (status === 0 ? 'network' : 'http_' + status);
    this.title = problem.title || '';
    this.detail = problem.detail || '';
    this.fields = Array.isArray(problem.errors) ? problem.errors : [];
    this.retryAfter = retryAfter;
  }

  // A sentence for a person: the detail, the fields at fault, when to retry.
  describe() {
    let text = this.detail || this.title || this.message;
    // Name the fields at fault that the detail does not already mention.
    const extra = this.fields.map((f) => `${f.field}: ${f.message}`).filter((f) => !text.includes(f));
    if (extra.length) text += ' — ' + extra.join('; ');
    if (this.status === 429 && this.retryAfter != null) {
      text += ` Try again in ${this.retryAfter} s.`;
    }
    return text;
  }
}

// api(method, path, {body, query, headers, signal}) → the parsed JSON body
// (null for 204). Throws ApiError.
export async function api(method, path, { body, query, headers = {}, signal } = {}) {
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
    }
    const s = q.toString();
    if (s) url += '?' + s;
  }
  const init = {
    method,
    credentials: 'same-origin',
    headers: { Accept: 'application/json', ...headers },
    signal,
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(0, {
      title: 'Network error',
      detail: 'Could not reach the server. Check your connection and try again.',
    });
  }
  if (res.status === 204) return null;
  const type = res.headers.get('Content-Type') || '';
  let data = null;
  if (type.includes('json')) {
    try {
      data = await res.json();
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const ra = res.headers.get('Retry-After');
    const problem = data && typeof data === 'object' ? data : { title: res.statusText || `HTTP ${res.status}` };
    throw new ApiError(res.status, problem, ra !== null && /^\d+$/.test(ra) ? Number(ra) : null);
  }
  return data;
}

// uuid returns a random UUID v4 for Idempotency-Key. crypto.randomUUID only
// exists in secure contexts (https, localhost); getRandomValues everywhere.
export function uuid() {
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export const enc = encodeURIComponent;
