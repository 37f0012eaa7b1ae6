// What the page keeps in the browser (localStorage, or any object with getItem/setItem):
// the conversations, the settings and the API key. Nothing is kept on the server.

const CHATS_KEY = "infersnap.chats";
const SETTINGS_KEY = "infersnap.settings";
const API_KEY = "infersnap.api-key";
const EXPORT_FORMAT = "infersnap-chats";
const ROLES = new Set(["user", "assistant"]);
export const NEW_TITLE = "New chat";
export const DEFAULT_SETTINGS = Object.freeze({ system: "", temperature: 0.7, max_tokens: 1024, model: "" });

function newId() {
  // crypto.randomUUID exists only in secure contexts; a LAN address over http is none
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function readJSON(storage, key) {
  try {
    return JSON.parse(storage.getItem(key) ?? "null");
  } catch {
    return null;  // damaged by hand: start afresh rather than not at all
  }
}

/** A conversation from outside (storage, an imported file) with only the fields the page uses, or null. */
function cleanConversation(value) {
  if (!value || typeof value !== "object" || !Array.isArray(value.messages)) return null;
  const messages = value.messages
    .filter((m) => m && ROLES.has(m.role) && typeof m.content === "string")
    .map((m) => ({
      role: m.role,
      content: m.content,
      ...(typeof m.reasoning === "string" && m.reasoning ? { reasoning: m.reasoning } : {}),
      ...(m.stats && typeof m.stats === "object" ? { stats: m.stats } : {}),
      ...(m.stopped === true ? { stopped: true } : {}),
    }));
  const now = Date.now();
  return {
    id: typeof value.id === "string" && value.id ? value.id : newId(),
    title: typeof value.title === "string" && value.title.trim() ? value.title.trim() : NEW_TITLE,
    created: Number.isFinite(value.created) ? value.created : now,
    updated: Number.isFinite(value.updated) ? value.updated : now,
    messages,
  };
}

export class ConversationStore {
  constructor(storage) {
    this.storage = storage;
    const saved = readJSON(storage, CHATS_KEY);
    const conversations = Array.isArray(saved?.conversations) ? saved.conversations.map(cleanConversation).filter(Boolean) : [];
    this.conversations = conversations;
    this.currentId = conversations.some((c) => c.id === saved?.current) ? saved.current : (this.list()[0]?.id ?? null);
  }

  save() {
    this.storage.setItem(CHATS_KEY, JSON.stringify({ current: this.currentId, conversations: this.conversations }));
  }

  /** The conversations, the most recently changed first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) ?? null;
  }

  current() {
    return this.get(this.currentId);
  }

  select(id) {
    if (this.get(id)) {
      this.currentId = id;
      this.save();
    }
  }

  create() {
    const now = Date.now();
    const conversation = { id: newId(), title: NEW_TITLE, created: now, updated: now, messages: [] };
    this.conversations.push(conversation);
    this.currentId = conversation.id;
    this.save();
    return conversation;
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (conversation && title.trim()) {
      conversation.title = title.trim();
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.list()[0]?.id ?? null;
    this.save();
  }

  /** Add a message to a conversation; a first user message also names a conversation still untitled. */
  append(id, message) {
    const conversation = this.get(id);
    conversation.messages.push(message);
    if (conversation.title === NEW_TITLE && message.role === "user") {
      const line = message.content.trim().split("\n")[0];
      conversation.title = line.length > 40 ? `${line.slice(0, 39)}…` : line || NEW_TITLE;
    }
    this.touch(id);
    return message;
  }

  /** A conversation's messages were changed in place (a streamed answer grew): save it. */
  touch(id) {
    const conversation = this.get(id);
    if (conversation) conversation.updated = Date.now();
    this.save();
  }

  exportJSON() {
    return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversations: this.list() }, null, 2);
  }

  /** Add the conversations of an exported file (or a list of them, or one); returns how many.
   * One whose id is already here comes in as a copy with a new id, so an import never overwrites. */
  importJSON(text) {
    const parsed = JSON.parse(text);
    const items = Array.isArray(parsed) ? parsed : Array.isArray(parsed?.conversations) ? parsed.conversations : [parsed];
    const imported = items.map(cleanConversation).filter(Boolean);
    if (!imported.length) throw new Error("the file holds no conversations");
    for (const conversation of imported) {
      if (this.get(conversation.id)) conversation.id = newId();
      this.conversations.push(conversation);
    }
    this.currentId = imported[0].id;
    this.save();
    return imported.length;
  }
}

export function loadSettings(storage) {
  const saved = readJSON(storage, SETTINGS_KEY) ?? {};
  const settings = { ...DEFAULT_SETTINGS };
  for (const [name, fallback] of Object.entries(DEFAULT_SETTINGS)) {
    if (typeof saved[name] === typeof fallback) settings[name] = saved[name];
  }
  return settings;
}

export function saveSettings(storage, settings) {
  storage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

export function loadKey(storage) {
  return storage.getItem(API_KEY) ?? "";
}

export function saveKey(storage, key) {
  if (key) storage.setItem(API_KEY, key);
  else storage.removeItem(API_KEY);
}
