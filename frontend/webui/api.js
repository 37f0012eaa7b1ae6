// The API calls the page makes (same origin, with the key the user gave), and their errors in words.

import { SSEParser } from "./sse.js";

/** An error answer of the API: its HTTP status and the body's {"error": {"message", "type", "code"}}. */
export class APIError extends Error {
  constructor(status, error = {}) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "";
    this.code = error.code || "";
  }
}

/** What to tell the user about a failed call: {title, detail, retry (worth trying again), key (asks for one)}. */
export function describeError(error, hadKey = false) {
  if (error?.name === "AbortError") return { title: "Stopped.", detail: "", retry: false, key: false };
  if (!(error instanceof APIError)) {
    return { title: "The server cannot be reached.", detail: String(error?.message || error), retry: true, key: false };
  }
  const detail = error.message;
  if (error.status === 401) {
    const title = hadKey ? "The API key was not accepted (401)." : "This server needs an API key (401).";
    return { title, detail, retry: true, key: true };  // Retry, once a key is entered
  }
  if (error.code === "server_overloaded") {
    return { title: "The server is busy: every slot and queue place is taken. Retry in a moment.", detail, retry: true, key: false };
  }
  if (error.code === "context_length_exceeded") {
    return { title: "This conversation does not fit the model's context. Start a new chat, or lower max tokens in Settings.",
      detail, retry: false, key: false };
  }
  if (error.code === "timeout") return { title: "The answer took too long and was stopped.", detail, retry: true, key: false };
  if (error.status === 503) return { title: "The model is not available.", detail, retry: true, key: false };
  if (error.status === 404 && error.code === "model_not_found") {
    return { title: "The server does not serve this model (any more).", detail, retry: false, key: false };
  }
  if (error.status === 400) return { title: "The server refused the request.", detail, retry: false, key: false };
  return { title: `The request failed (${error.status}).`, detail, retry: error.status >= 500, key: false };
}

// An error event inside a stream has no HTTP status of its own: the one it would have had.
function streamedStatus(error) {
  const byCode = { server_overloaded: 503, shutting_down: 503, timeout: 504, context_length_exceeded: 400 };
  return byCode[error.code] ?? (error.type === "invalid_request_error" ? 400 : 500);
}

function headers(key, json) {
  return { ...(json ? { "Content-Type": "application/json" } : {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function failure(response) {
  let error = {};
  try {
    error = (await response.json()).error ?? {};
  } catch { /* not the API's JSON (a proxy's page): the status says enough */ }
  return new APIError(response.status, error);
}

/** GET a JSON route of the API. */
export async function getJSON(path, key) {
  const response = await fetch(path, { headers: headers(key, false) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** POST a chat completion with stream:true and yield its chunks as they arrive. Aborting `signal`
 * closes the connection, which the server sees: it stops the generation and frees the slot. */
export async function* streamChat(body, key, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(key, true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const events = done ? [...parser.feed(decoder.decode()), ...parser.end()] : parser.feed(decoder.decode(value, { stream: true }));
      const chunks = [];
      for (const event of events) {
        if (event.data === "[DONE]") continue;
        const chunk = JSON.parse(event.data);
        if (chunk.error) throw new APIError(streamedStatus(chunk.error), chunk.error);  // failed mid-stream
        chunks.push(chunk);
      }
      if (chunks.length) yield chunks;  // a read's chunks together: the page renders once per read
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}
