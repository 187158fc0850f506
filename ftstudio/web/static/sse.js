// Server-sent events read from a fetch() response: EventSource can send no header, and every
// request to the studio carries its signature in one.

/** Each event of the stream as {event, id, data}, data parsed from JSON; a comment-only block is skipped. */
export async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      let id = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
        else if (line.startsWith("id: ")) id = line.slice(4);
      }
      if (!data && !id && event === "message") continue;
      yield { event, id, data: data ? JSON.parse(data) : {} };
    }
  }
}
