// A small Markdown renderer that builds DOM nodes and never parses HTML.
//
// Text only ever reaches the page as text nodes: markup in the source (`<img onerror=…>`)
// is shown as the characters it is. Links keep only http:, https: and mailto: targets;
// images are shown as links, never loaded. Supported: paragraphs (a single newline is a
// line break), headings, emphasis (* _ ** __ ~~), inline code, fenced code blocks, block
// quotes, ordered and unordered lists (nested by indentation), pipe tables, rules, links,
// autolinks, and backslash escapes. Unclosed markup (as in an answer still streaming) is
// shown literally until it is closed.

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const BULLET = /^( {0,3})([-*+])\s+(.*)$/;
const ORDERED = /^( {0,3})(\d{1,9})([.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;

/** Render Markdown `text` into a DocumentFragment of `doc`. */
export function renderMarkdown(text, doc = document) {
  const fragment = doc.createDocumentFragment();
  const lines = String(text ?? "")
    .replace(/\r\n?/g, "\n")
    .split("\n");
  renderBlocks(lines, fragment, doc, 0);
  return fragment;
}

/** Replace the children of `element` with the rendering of `text`. */
export function renderInto(element, text) {
  element.replaceChildren(renderMarkdown(text, element.ownerDocument));
}

/** A URL that is safe to link to, or null. */
export function safeUrl(raw) {
  const text = String(raw ?? "").trim();
  if (!text) return null;
  let url;
  try {
    url = new URL(text);
  } catch {
    return null; // relative or malformed: not linked
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

function el(doc, tag, parent, className) {
  const node = doc.createElement(tag);
  if (className) node.className = className;
  parent.appendChild(node);
  return node;
}

function isBlank(line) {
  return line.trim() === "";
}

function indentOf(line) {
  const match = /^ */.exec(line.replace(/\t/g, "    "));
  return match[0].length;
}

function startsBlock(line) {
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    BULLET.test(line) ||
    ORDERED.test(line)
  );
}

function renderBlocks(lines, parent, doc, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      const fence = match[1];
      const body = [];
      i++;
      while (i < lines.length) {
        const close = lines[i].trim();
        if (close.startsWith(fence[0].repeat(fence.length)) && /^(`+|~+)$/.test(close)) {
          i++;
          break;
        }
        body.push(lines[i]);
        i++;
      }
      const pre = el(doc, "pre", parent);
      const code = el(doc, "code", pre);
      if (match[2]) code.dataset.lang = match[2];
      code.textContent = body.join("\n");
      continue;
    }
    if ((match = HEADING.exec(line))) {
      const level = Math.min(6, match[1].length + 2); // the page's own headings come first
      const heading = el(doc, `h${level}`, parent);
      renderInline(match[2] ?? "", heading, doc);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      el(doc, "hr", parent);
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const quoted = QUOTE.exec(lines[i]);
        body.push(quoted ? quoted[1] : lines[i]);
        i++;
      }
      const quote = el(doc, "blockquote", parent);
      if (depth < 8) renderBlocks(body, quote, doc, depth + 1);
      else quote.textContent = body.join("\n");
      continue;
    }
    if (BULLET.test(line) || ORDERED.test(line)) {
      i = renderList(lines, i, parent, doc, depth);
      continue;
    }
    if (
      line.includes("|") &&
      i + 1 < lines.length &&
      TABLE_RULE.test(lines[i + 1]) &&
      lines[i + 1].includes("-")
    ) {
      i = renderTable(lines, i, parent, doc);
      continue;
    }
    const body = [line];
    i++;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
      body.push(lines[i]);
      i++;
    }
    const paragraph = el(doc, "p", parent);
    body.forEach((text, n) => {
      if (n) paragraph.appendChild(doc.createElement("br"));
      renderInline(text.trim(), paragraph, doc);
    });
  }
}

function listItem(line) {
  let match = BULLET.exec(line);
  if (match) return { ordered: false, indent: match[1].length, marker: match[2], text: match[3] };
  match = ORDERED.exec(line);
  if (match) {
    return {
      ordered: true,
      indent: match[1].length,
      marker: match[3],
      start: Number(match[2]),
      text: match[4],
    };
  }
  return null;
}

function renderList(lines, i, parent, doc, depth) {
  const first = listItem(lines[i]);
  const list = el(doc, first.ordered ? "ol" : "ul", parent);
  if (first.ordered && first.start !== 1) list.start = first.start;
  while (i < lines.length) {
    const item = listItem(lines[i]);
    if (!item || item.ordered !== first.ordered || item.indent > first.indent + 1) break;
    const body = [item.text];
    i++;
    // The item goes on over indented lines and lazy continuation lines.
    while (i < lines.length) {
      const next = lines[i];
      if (isBlank(next)) {
        if (i + 1 < lines.length && indentOf(lines[i + 1]) >= 2 && !listItem(lines[i + 1])) {
          body.push("");
          i++;
          continue;
        }
        if (i + 1 < lines.length && listItem(lines[i + 1])?.indent >= 2) {
          i++;
          continue;
        }
        break;
      }
      const nested = listItem(next);
      if (nested && nested.indent <= first.indent + 1) break;
      if (!nested && indentOf(next) < 2 && startsBlock(next)) break;
      body.push(next.replace(/^ {1,4}/, ""));
      i++;
    }
    const li = el(doc, "li", list);
    if (depth >= 8) {
      li.textContent = body.join("\n");
    } else if (body.length === 1) {
      renderInline(body[0], li, doc);
    } else {
      renderBlocks(body, li, doc, depth + 1);
      // A tight item: its one paragraph's content goes straight into the item.
      const only = li.firstChild;
      if (only && only.nodeName === "P") {
        while (only.firstChild) li.insertBefore(only.firstChild, only);
        only.remove();
      }
    }
    while (i < lines.length && isBlank(lines[i]) && listItem(lines[i + 1] ?? "")) i++;
  }
  return i;
}

function splitRow(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const cells = [];
  let cell = "";
  for (let k = 0; k < text.length; k++) {
    if (text[k] === "\\" && text[k + 1] === "|") {
      cell += "|";
      k++;
    } else if (text[k] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += text[k];
    }
  }
  cells.push(cell.trim());
  return cells;
}

function renderTable(lines, i, parent, doc) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((rule) => {
    const left = rule.startsWith(":");
    const right = rule.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
  const wrap = el(doc, "div", parent, "table-wrap");
  const table = el(doc, "table", wrap);
  const headRow = el(doc, "tr", el(doc, "thead", table));
  head.forEach((text, n) => {
    const th = el(doc, "th", headRow);
    if (aligns[n]) th.style.textAlign = aligns[n];
    renderInline(text, th, doc);
  });
  const tbody = el(doc, "tbody", table);
  i += 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const row = el(doc, "tr", tbody);
    const cells = splitRow(lines[i]);
    head.forEach((_, n) => {
      const td = el(doc, "td", row);
      if (aligns[n]) td.style.textAlign = aligns[n];
      renderInline(cells[n] ?? "", td, doc);
    });
    i++;
  }
  return i;
}

// Inline -----------------------------------------------------------------------------

// Groups: 1 escaped character, 2 code span ticks, 3 link or image opener, 4 <autolink>,
// 5 bare URL, 6 double delimiter (** __ ~~), 7 single delimiter (* _).
const INLINE =
  /\\([!-/:-@[-`{-~])|(`+)|(!?\[)|<((?:https?:\/\/|mailto:)[^\s<>]+)>|(https?:\/\/[^\s<>]*[^\s<>.,:;"')\]!?*_~])|(\*\*|__|~~)|([*_])/g;

const WORD = /[\p{L}\p{N}]/u;

const ENTITIES = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };
const ENTITY = /&(?:#(\d{1,7})|#[xX]([0-9a-fA-F]{1,6})|(amp|lt|gt|quot|apos|nbsp));/g;

/** Character references as the characters they name (they stay text). */
function decodeEntities(text) {
  return text.replace(ENTITY, (whole, dec, hex, name) => {
    if (name) return ENTITIES[name];
    const code = dec ? Number(dec) : parseInt(hex, 16);
    return code > 0 && code <= 0x10ffff && !(code >= 0xd800 && code <= 0xdfff)
      ? String.fromCodePoint(code)
      : whole;
  });
}

function appendText(parent, text, doc) {
  if (!text) return;
  const last = parent.lastChild;
  if (last && last.nodeType === 3) last.appendData(text);
  else parent.appendChild(doc.createTextNode(text));
}

function link(parent, href, doc) {
  const a = el(doc, "a", parent);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

/** The index of the `]` closing the `[` at `open`, or -1. */
function closingBracket(text, open) {
  let depth = 0;
  for (let k = open; k < text.length; k++) {
    const c = text[k];
    if (c === "\\") k++;
    else if (c === "`") {
      const end = text.indexOf("`", k + 1);
      if (end < 0) return -1;
      k = end;
    } else if (c === "[") depth++;
    else if (c === "]" && --depth === 0) return k;
  }
  return -1;
}

/** `(url "title")` at `start`: `{url, end}` (end just past the `)`), or null. */
function linkTarget(text, start) {
  if (text[start] !== "(") return null;
  let depth = 0;
  for (let k = start; k < text.length; k++) {
    const c = text[k];
    if (c === "\\") k++;
    else if (c === "(") depth++;
    else if (c === ")" && --depth === 0) {
      let inner = text.slice(start + 1, k).trim();
      inner = inner.replace(/\s+("[^"]*"|'[^']*')$/, "");
      if (inner.startsWith("<") && inner.endsWith(">")) inner = inner.slice(1, -1);
      return { url: inner, end: k + 1 };
    }
  }
  return null;
}

/** Where the emphasis opened by `delim` at `from` closes, or -1. */
function closingDelimiter(text, delim, from) {
  let k = from;
  while ((k = text.indexOf(delim, k)) >= 0) {
    const before = text[k - 1];
    const after = text[k + delim.length];
    const inner = text.slice(from, k);
    const rightFlanking = before !== undefined && !/\s/.test(before);
    const intraword = delim[0] === "_" && after !== undefined && WORD.test(after);
    const partOfLonger = delim.length === 1 && (after === delim || before === delim);
    if (inner && rightFlanking && !intraword && !partOfLonger) return k;
    k += delim.length;
  }
  return -1;
}

function renderInline(text, parent, doc, depth = 0) {
  if (depth > 16) {
    appendText(parent, text, doc);
    return;
  }
  INLINE.lastIndex = 0;
  let pos = 0;
  while (pos < text.length) {
    INLINE.lastIndex = pos;
    const match = INLINE.exec(text);
    if (!match) break;
    const at = match.index;
    appendText(parent, decodeEntities(text.slice(pos, at)), doc);
    const [whole, escaped, ticks, bracket, autolink, bare, double, single] = match;
    pos = at + whole.length;
    if (escaped !== undefined) {
      appendText(parent, escaped, doc);
    } else if (ticks !== undefined) {
      const close = text.indexOf(ticks, pos);
      let end = close;
      while (end >= 0 && text[end + ticks.length] === "`") end = text.indexOf(ticks, end + 1);
      if (end < 0) {
        appendText(parent, ticks, doc);
      } else {
        const code = el(doc, "code", parent);
        let inner = text.slice(pos, end);
        if (/^ .* $/.test(inner) && inner.trim()) inner = inner.slice(1, -1);
        code.textContent = inner;
        pos = end + ticks.length;
      }
    } else if (bracket !== undefined) {
      const open = at + bracket.length - 1;
      const close = closingBracket(text, open);
      const target = close >= 0 ? linkTarget(text, close + 1) : null;
      if (!target) {
        appendText(parent, bracket, doc);
        pos = open + 1;
      } else {
        const label = text.slice(open + 1, close);
        const href = safeUrl(target.url);
        const isImage = bracket === "!";
        if (href) {
          const a = link(parent, href, doc);
          if (isImage) a.className = "image-link";
          renderInline(label || (isImage ? "image" : href), a, doc, depth + 1);
        } else {
          renderInline(label, parent, doc, depth + 1);
        }
        pos = target.end;
      }
    } else if (autolink !== undefined || bare !== undefined) {
      const raw = autolink ?? bare;
      const href = safeUrl(raw);
      if (href) link(parent, href, doc).textContent = raw;
      else appendText(parent, whole, doc);
    } else {
      const delim = double ?? single;
      const before = text[at - 1];
      const after = text[pos];
      const leftFlanking = after !== undefined && !/\s/.test(after);
      const intraword = delim[0] === "_" && before !== undefined && WORD.test(before);
      const close = leftFlanking && !intraword ? closingDelimiter(text, delim, pos) : -1;
      if (close < 0) {
        appendText(parent, delim, doc);
      } else {
        const tag = delim === "~~" ? "del" : delim.length === 2 ? "strong" : "em";
        renderInline(text.slice(pos, close), el(doc, tag, parent), doc, depth + 1);
        pos = close + delim.length;
      }
    }
  }
  appendText(parent, decodeEntities(text.slice(pos)), doc);
}
