// Server-sent events from text that arrives in arbitrary pieces (a network read can end mid-line,
// even between a "\r" and its "\n"), as the EventSource spec reads them: `data:` lines joined by
// "\n", `event:` names the event, `:` starts a comment, a blank line ends the event.

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.event = "";
  }

  /** Take the next piece of text; returns the events it completed, each {event, data}. */
  feed(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const end = this.buffer.search(/\r\n|\r|\n/);
      if (end < 0 || (this.buffer[end] === "\r" && end === this.buffer.length - 1)) break;  // a "\n" may follow
      const newline = this.buffer.startsWith("\r\n", end) ? 2 : 1;
      this._line(this.buffer.slice(0, end), events);
      this.buffer = this.buffer.slice(end + newline);
    }
    return events;
  }

  /** The stream ended: the event it left unterminated, if any. */
  end() {
    const events = [];
    if (this.buffer) this._line(this.buffer.replace(/\r$/, ""), events);
    this.buffer = "";
    this._line("", events);
    return events;
  }

  _line(line, events) {
    if (line === "") {
      if (this.data.length) events.push({ event: this.event || "message", data: this.data.join("\n") });
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
  }
}
