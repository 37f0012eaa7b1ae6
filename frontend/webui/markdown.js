// A small Markdown renderer that builds DOM nodes and never parses HTML: model output is text, so
// every character of it reaches the page through text nodes (append(string), textContent) and a
// `<script>` or `<img onerror>` in an answer shows as those characters. Links keep only http(s) hrefs.
// Covers what chat answers use: headings, paragraphs, bold, italic, strikethrough, inline code,
// fenced code blocks (with a copy button), lists (nested by indentation), quotes, rules, links.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])(?:\s+(.*))?$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const BLANK = /^\s*$/;

// Inline rules, tried at each point; the earliest match wins, ties go to the first rule.
const INLINE = [
  { re: /\\([\\`*_{}[\]()#+\-.!~>|])/, build: (doc, m) => doc.createTextNode(m[1]) },
  { re: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/, build: (doc, m) => element(doc, "code", m[2].replace(/^ (.*) $/, "$1")) },
  { re: /\[([^\[\]]+)\]\(\s*<?([^\s<>()]+(?:\([^\s<>()]*\)[^\s<>()]*)?)>?(?:\s+"[^"]*")?\s*\)/, build: (doc, m) => link(doc, m[1], m[2]) },
  { re: /<(https?:\/\/[^\s<>]+)>/, build: (doc, m) => link(doc, m[1], m[1], false) },
  { re: /\bhttps?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~]/, build: (doc, m) => link(doc, m[0], m[0], false) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/, build: (doc, m) => nested(doc, "strong", m[1] ?? m[2]) },
  { re: /\*(?=[^\s*])([^*]*?[^\s*])?\*|(?<!\w)_(?=[^\s_])([^_]*?[^\s_])?_(?!\w)/, build: (doc, m) => nested(doc, "em", m[0].slice(1, -1)) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, build: (doc, m) => nested(doc, "del", m[1]) },
];

/** Whether `href` may be a link's target: an absolute http(s) URL; its normalized form, else null. */
export function safeHref(href) {
  try {
    const url = new URL(href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

/** `source` as a DocumentFragment. An unclosed code fence (an answer still streaming) runs to the end. */
export function renderMarkdown(source, doc = document) {
  const fragment = doc.createDocumentFragment();
  renderBlocks(doc, fragment, String(source).replace(/\r\n?/g, "\n").split("\n"));
  return fragment;
}

function renderBlocks(doc, parent, lines) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (BLANK.test(line)) {
      i++;
    } else if ((m = line.match(FENCE))) {
      const body = [];
      const indent = line.match(/^ */)[0].length;
      for (i++; i < lines.length && !closesFence(lines[i], m[1]); i++) body.push(stripSpaces(lines[i], indent));
      i++;
      parent.append(codeBlock(doc, body.join("\n"), m[2]));
    } else if ((m = line.match(HEADING))) {
      parent.append(inline(doc, element(doc, `h${m[1].length}`), m[2] || ""));
      i++;
    } else if (RULE.test(line)) {
      parent.append(doc.createElement("hr"));
      i++;
    } else if (LIST_ITEM.test(line)) {
      i = renderList(doc, parent, lines, i);
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) body.push(m[1]);
      const quote = doc.createElement("blockquote");
      renderBlocks(doc, quote, body);
      parent.append(quote);
    } else {
      const paragraph = doc.createElement("p");
      for (let first = true; i < lines.length && !BLANK.test(lines[i]) && (first || !startsBlock(lines[i])); i++, first = false) {
        if (!first) paragraph.append(doc.createElement("br"));
        inline(doc, paragraph, lines[i].trim());
      }
      parent.append(paragraph);
    }
  }
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || LIST_ITEM.test(line) || QUOTE.test(line);
}

function closesFence(line, fence) {
  const m = line.match(/^ {0,3}(`{3,}|~{3,})\s*$/);
  return m !== null && m[1][0] === fence[0] && m[1].length >= fence.length;
}

function leadingSpaces(line) {
  return line.match(/^\s*/)[0].length;
}

function stripSpaces(line, count) {
  return line.slice(Math.min(count, leadingSpaces(line)));
}

// A list from line `i`: items at its first item's indentation and kind; a more indented line
// belongs to the item above it (a nested list, or more of its text). Returns the next line's index.
function renderList(doc, parent, lines, i) {
  const first = lines[i].match(LIST_ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = doc.createElement(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(LIST_ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = indent + m[2].length + 1;
    const body = [m[3] || ""];
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      if (BLANK.test(line)) {
        let next = i + 1;
        while (next < lines.length && BLANK.test(lines[next])) next++;
        if (next < lines.length && leadingSpaces(lines[next]) > indent) {
          body.push("");
          continue;
        }
        i = next < lines.length && sameList(lines[next], indent, ordered) ? next : i;
        break;
      }
      if (leadingSpaces(line) <= indent && startsBlock(line)) break;
      body.push(stripSpaces(line, contentIndent));
    }
    const item = doc.createElement("li");
    renderBlocks(doc, item, body);
    if (item.firstChild && item.firstChild.nodeName === "P") item.firstChild.replaceWith(...item.firstChild.childNodes);
    list.append(item);
  }
  parent.append(list);
  return i;
}

function sameList(line, indent, ordered) {
  const m = line.match(LIST_ITEM);
  return m !== null && m[1].length === indent && /\d/.test(m[2]) === ordered;
}

function element(doc, name, text) {
  const node = doc.createElement(name);
  if (text !== undefined) node.textContent = text;
  return node;
}

function nested(doc, name, text) {
  return inline(doc, doc.createElement(name), text);
}

function link(doc, text, href, markdown = true) {
  const target = safeHref(href);
  if (target === null) return doc.createTextNode(text);  // javascript:, data:, relative: shown, not linked
  const anchor = markdown ? inline(doc, doc.createElement("a"), text) : element(doc, "a", text);  // a URL as it is
  anchor.href = target;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  return anchor;
}

/** Append `text`'s inline Markdown to `parent` (text nodes and the few inline elements); returns `parent`. */
function inline(doc, parent, text) {
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { rule, m };
    }
    if (best === null) {
      parent.append(rest);
      break;
    }
    if (best.m.index > 0) parent.append(rest.slice(0, best.m.index));
    parent.append(best.rule.build(doc, best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  return parent;
}

function codeBlock(doc, code, language) {
  const block = element(doc, "div");
  block.className = "code-block";
  const bar = element(doc, "div");
  bar.className = "code-bar";
  const label = element(doc, "span", language || "code");
  const copy = element(doc, "button", "Copy");
  copy.type = "button";
  copy.className = "copy";
  copy.setAttribute("aria-label", `Copy the ${language || "code"} block`);
  copy.addEventListener("click", () => copyText(code, copy));
  bar.append(label, copy);
  const pre = element(doc, "pre");
  const body = element(doc, "code", code);
  if (language) body.dataset.language = language;
  pre.append(body);
  block.append(bar, pre);
  return block;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {  // no clipboard API outside a secure context (a LAN address over http): the old way
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    button.textContent = document.execCommand("copy") ? "Copied" : "Select and copy";
    area.remove();
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}
