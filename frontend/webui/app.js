// The chat page: wires the pure parts (markdown.js, sse.js via api.js, store.js) to the DOM.
// Model output reaches the page only through renderMarkdown and textContent.

import { describeError, getJSON, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { ConversationStore, DEFAULT_SETTINGS, loadKey, loadSettings, saveKey, saveSettings } from "./store.js";

const $ = (id) => document.getElementById(id);
const store = new ConversationStore(localStorage);
let settings = loadSettings(localStorage);
let apiKey = loadKey(localStorage);
let generation = null;  // the answer streaming now: {controller, conversationId, message, article}
let lastStats = null;
let statusTimer = null;

function element(name, className, text) {
  const node = document.createElement(name);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(text, onClick, label) {
  const node = element("button", "", text);
  node.type = "button";
  if (label) node.setAttribute("aria-label", label);
  node.addEventListener("click", onClick);
  return node;
}

// --- page-level notices and the API key ------------------------------------------------------

function showNotice(problem, retry) {
  const notice = $("notice");
  notice.replaceChildren(element("strong", "", problem.title), ...(problem.detail ? [" ", element("span", "detail", problem.detail)] : []));
  if (retry && problem.retry) notice.append(" ", button("Retry", retry));
  if (problem.key) notice.append(" ", button("Enter key", () => askForKey(problem.title)));
  notice.hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-message").textContent = message;
  $("key").value = "";
  dialog.returnValue = "";  // Escape leaves the last one: only a click on "Use this key" may set it
  if (!dialog.open) dialog.showModal();
}

function useKey(key) {
  apiKey = key.trim();
  saveKey(localStorage, apiKey);
  loadModels();
}

// --- models ----------------------------------------------------------------------------------

// quiet: a refresh (the picker about to open) that keeps the list it has and says nothing if it fails
async function loadModels({ quiet = false } = {}) {
  const select = $("model");
  try {
    const models = (await getJSON("/v1/models", apiKey)).data;
    select.replaceChildren(...models.map(modelOption));
    // the one chosen before if it can still chat, else the first listed (the server's default)
    const usable = models.filter((model) => !modelOption(model).disabled).map((model) => model.id);
    select.value = usable.includes(settings.model) ? settings.model : (usable[0] ?? "");
    if (!quiet) hideNotice();
  } catch (error) {
    if (quiet) return;
    const problem = describeError(error, Boolean(apiKey));
    showNotice(problem, loadModels);
    if (problem.key) askForKey(problem.title);
  }
}

// Each model with its state (one not loaded loads on its first message); one without a chat template
// cannot be chatted with, so it is listed but not chosen.
function modelOption(model) {
  const chats = !model.capabilities || model.capabilities.includes("chat");
  const note = !chats ? "no chat template" : model.state && model.state !== "loaded" ? model.state : "";
  const option = new Option(note ? `${model.id} (${note})` : model.id, model.id);
  option.disabled = !chats;
  if (model.error) option.title = model.error;
  return option;
}

// --- conversations ---------------------------------------------------------------------------

function renderConversations() {
  $("conversations").replaceChildren(...store.list().map(conversationItem));
}

function conversationItem(conversation) {
  const item = element("li");
  const open = button(conversation.title, () => {
    store.select(conversation.id);
    showSidebar(false);
    renderAll();
  });
  open.className = "title";
  if (conversation.id === store.currentId) open.setAttribute("aria-current", "true");
  const rename = button("✎", () => startRename(item, conversation), `Rename ${conversation.title}`);
  rename.className = "rename icon";
  const remove = button("×", () => {
    if (remove.dataset.confirm) {
      store.remove(conversation.id);
      renderAll();
    } else {  // a second click deletes: nothing is lost by one slip
      remove.dataset.confirm = "yes";
      remove.textContent = "Delete?";
    }
  }, `Delete ${conversation.title}`);
  remove.className = "delete icon";
  remove.addEventListener("blur", () => {
    delete remove.dataset.confirm;
    remove.textContent = "×";
  });
  item.append(open, rename, remove);
  return item;
}

function startRename(item, conversation) {
  const input = element("input", "rename-input");
  input.value = conversation.title;
  input.setAttribute("aria-label", "New title");
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep) store.rename(conversation.id, input.value);
    renderConversations();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") {
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

/** On a phone the conversations slide over the chat: shown by ☰, hidden again once one is chosen. */
function showSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

function newChat() {
  store.create();
  showSidebar(false);
  renderAll();
  $("prompt").focus();
}

function exportChats() {
  const blob = new Blob([store.exportJSON()], { type: "application/json" });
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = `infersnap-chats-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function importChats(file) {
  try {
    const count = store.importJSON(await file.text());
    renderAll();
    showNotice({ title: `Imported ${count} conversation${count === 1 ? "" : "s"}.`, detail: "" });
  } catch (error) {
    showNotice({ title: "That file could not be imported.", detail: String(error.message || error) });
  }
}

// --- messages --------------------------------------------------------------------------------

function renderMessages() {
  const conversation = store.current();
  const messages = conversation?.messages ?? [];
  const nodes = messages.map((message) => (generation?.message === message ? generation.article : messageElement(message)));
  if (!nodes.length) nodes.push(element("p", "empty", "Ask anything: the answer streams in as the model writes it."));
  $("messages").replaceChildren(...nodes);
  $("messages").scrollTop = $("messages").scrollHeight;
}

function messageElement(message) {
  const article = element("article", `message ${message.role}`);
  if (message.role === "user") {
    article.append(element("div", "content", message.content));
    return article;
  }
  const thinking = element("details", "thinking");
  thinking.append(element("summary", "", "Thinking"), element("div", "thinking-text"));
  article.append(thinking, element("div", "content markdown"), element("div", "meta"), element("div", "error"));
  fillAssistant(article, message, false);
  return article;
}

/** Show an assistant message as it stands; `problem` (describeError's) shows below it, with Retry. */
function fillAssistant(article, message, streaming, problem = null, retry = null) {
  const [thinking, content, meta, error] = article.children;
  article.classList.toggle("streaming", streaming);
  thinking.hidden = !message.reasoning;
  thinking.firstChild.textContent = streaming && !message.content ? "Thinking…" : "Thoughts";
  thinking.lastChild.textContent = message.reasoning ?? "";
  content.replaceChildren(renderMarkdown(message.content));
  meta.textContent = message.stopped ? "Stopped." : message.stats ? statsText(message.stats) : "";
  error.replaceChildren();
  error.hidden = problem === null;
  error.setAttribute("role", problem === null ? "none" : "alert");
  if (problem !== null) {
    error.append(element("strong", "", problem.title));
    if (problem.detail) error.append(element("div", "detail", problem.detail));
    const actions = element("div", "actions");
    if (problem.key) actions.append(button("Enter key", () => askForKey(problem.title)));
    if (problem.retry && retry) actions.append(button("Retry", retry));
    if (actions.firstChild) error.append(actions);
  }
}

function statsText(stats) {
  const parts = [];
  if (stats.tokens != null) parts.push(`${stats.tokens} tokens`);
  if (stats.tokens_per_second) parts.push(`${stats.tokens_per_second.toFixed(1)} tok/s`);
  if (stats.first_token_s != null) parts.push(`first token ${stats.first_token_s.toFixed(2)} s`);
  return parts.join(" · ");
}

/** The answer's figures: the server's own timings (its last chunk carries them), else what the usage
 * chunk and the page's clock tell. Time to first token is the page's: it includes the network and queue. */
function answerStats(started, firstAt, ended, timings, usage) {
  const tokens = timings?.predicted_n ?? usage?.completion_tokens ?? null;
  const measured = tokens && firstAt !== null && ended > firstAt ? tokens / ((ended - firstAt) / 1000) : null;
  return {
    tokens,
    tokens_per_second: timings?.predicted_per_second || measured,
    first_token_s: firstAt === null ? null : (firstAt - started) / 1000,
  };
}

function followScroll() {
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("generating", on);
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || generation) return;
  const conversation = store.current() ?? store.create();
  store.append(conversation.id, { role: "user", content: text });
  $("prompt").value = "";
  renderConversations();
  renderMessages();
  await answer(conversation.id);
}

async function answer(conversationId) {
  const conversation = store.get(conversationId);
  const history = conversation.messages.filter((m) => m.content).map(({ role, content }) => ({ role, content }));
  const system = settings.system.trim() ? [{ role: "system", content: settings.system }] : [];
  const message = { role: "assistant", content: "" };
  conversation.messages.push(message);
  const article = messageElement(message);
  $("messages").append(article);
  followScroll();
  const controller = new AbortController();
  generation = { controller, conversationId, message, article };
  setStreaming(true);
  const body = { model: $("model").value, messages: [...system, ...history], temperature: settings.temperature,
    max_tokens: settings.max_tokens };
  const started = performance.now();
  let firstAt = null;
  let timings = null;
  let usage = null;
  let problem = null;
  try {
    for await (const chunks of streamChat(body, apiKey, controller.signal)) {
      for (const chunk of chunks) {
        const delta = chunk.choices?.[0]?.delta ?? {};
        if (delta.reasoning_content) message.reasoning = (message.reasoning ?? "") + delta.reasoning_content;
        if (delta.content) message.content += delta.content;
        if (firstAt === null && (delta.content || delta.reasoning_content)) firstAt = performance.now();
        timings = chunk.timings ?? timings;
        usage = chunk.usage ?? usage;
      }
      fillAssistant(article, message, true);
      followScroll();
    }
    message.stats = lastStats = answerStats(started, firstAt, performance.now(), timings, usage);
  } catch (error) {
    if (error.name === "AbortError") message.stopped = true;
    else problem = describeError(error, Boolean(apiKey));
  } finally {
    generation = null;
    setStreaming(false);
  }
  const unanswered = !message.content && !message.reasoning;
  if (unanswered) conversation.messages.splice(conversation.messages.indexOf(message), 1);  // nothing worth keeping
  store.touch(conversationId);
  const retry = () => {
    const index = conversation.messages.indexOf(message);
    if (index >= 0) conversation.messages.splice(index, 1);
    article.remove();
    answer(conversationId);
  };
  fillAssistant(article, message, false, problem, retry);
  if (unanswered && message.stopped) article.remove();
  if (problem?.key) askForKey(problem.title);
  renderConversations();
  followScroll();
}

function stop() {
  generation?.controller.abort();
}

// --- settings and status ---------------------------------------------------------------------

function openSettings() {
  $("system").value = settings.system;
  $("temperature").value = settings.temperature;
  $("max-tokens").value = settings.max_tokens;
  $("settings-key").value = apiKey;
  $("settings").returnValue = "";
  $("settings").showModal();
}

function closeSettings() {
  if ($("settings").returnValue !== "save") return;
  settings = {
    ...settings,
    system: $("system").value,
    temperature: Number($("temperature").value),
    max_tokens: Math.round(Number($("max-tokens").value)),
  };
  saveSettings(localStorage, settings);
  if ($("settings-key").value.trim() !== apiKey) useKey($("settings-key").value);
}

function resetSettings() {
  $("system").value = DEFAULT_SETTINGS.system;
  $("temperature").value = DEFAULT_SETTINGS.temperature;
  $("max-tokens").value = DEFAULT_SETTINGS.max_tokens;
}

async function refreshStatus() {
  try {
    const status = await getJSON("/v1/status", apiKey);
    const summary = [`Model: ${status.model ?? "none"}`, `${status.waiting} waiting in the queue`];
    if (status.draining) summary.push("shutting down");
    $("status-summary").textContent = summary.join(" · ");
    $("workers").replaceChildren(...status.workers.map((worker) => {
      const row = element("tr");
      row.dataset.worker = worker.id;
      const state = element("td", `state ${worker.state}`, worker.state);
      if (worker.error) state.append(element("div", "detail", worker.error));
      row.append(element("td", "", worker.id), element("td", "", worker.device), element("td", "", worker.engine),
        element("td", "", worker.task), state, element("td", "running", `${worker.running} of ${worker.slots}`),
        element("td", "waiting", String(worker.waiting)));
      return row;
    }));
  } catch (error) {
    const problem = describeError(error, Boolean(apiKey));
    $("status-summary").textContent = `${problem.title} ${problem.detail}`;
  }
  $("status-last").textContent = lastStats ? `Last answer: ${statsText(lastStats)}` : "No answer yet in this page.";
}

function openStatus() {
  refreshStatus();
  statusTimer = setInterval(refreshStatus, 2000);
  $("status").showModal();
}

// --- wiring ----------------------------------------------------------------------------------

function renderAll() {
  renderConversations();
  renderMessages();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && generation && !document.querySelector("dialog[open]")) {
    event.preventDefault();
    stop();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("export").addEventListener("click", exportChats);
$("import").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) importChats(file);
  event.target.value = "";
});
// models come and go while the server runs (added to its folders, loaded, unloaded): fresh states on each look
$("model").addEventListener("focus", () => loadModels({ quiet: true }));
$("model").addEventListener("change", () => {
  settings = { ...settings, model: $("model").value };
  saveSettings(localStorage, settings);
});
$("toggle-sidebar").addEventListener("click", () => showSidebar(!document.body.classList.contains("sidebar-open")));
$("open-settings").addEventListener("click", openSettings);
$("settings").addEventListener("close", closeSettings);
$("reset-settings").addEventListener("click", resetSettings);
$("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));  // not a submit: Enter means "use it"
$("key-dialog").addEventListener("close", () => {
  if ($("key-dialog").returnValue === "save") useKey($("key").value);
});
$("open-status").addEventListener("click", openStatus);
$("status").addEventListener("close", () => clearInterval(statusTimer));

renderAll();
loadModels();
